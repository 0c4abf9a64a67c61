"""Clean-up of what a chain test made in the lab, with vmferry's own teardown (found by identity)."""

from __future__ import annotations

from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec
from vmferry.adapters.openstack.teardown import Removal, teardown
from vmferry.cli.oslab import OpenStackLab


async def removed_from_lab(lab: OpenStackLab, vm_key: str, name: str) -> list[Removal]:
    """Remove the VM's server, ports and volumes; returns what was removed."""
    adapter = OpenStackAdapter(CloudAuth(cloud=lab.admin_cloud, clouds_yaml=lab.clouds_yaml))
    try:
        return await teardown(adapter, VmSpec(vm_key=vm_key, name=name, cpus=1, memory_mib=1))
    finally:
        adapter.close()
