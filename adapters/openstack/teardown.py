"""Removes exactly what vmferry created for one VM (found by identity), with a dry-run listing.

Order: server (waits until gone), ports, volumes (after they detach), images (uploaded disks of the
Glance path), the VM's own flavor. Nothing without vmferry's identity marks is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from vmferry.adapters.openstack import compute, flavors, images, network, volumes
from vmferry.adapters.openstack.client import OpenStackAdapter, wait_until
from vmferry.adapters.openstack.model import VmSpec


@dataclass(frozen=True)
class Removal:
    """One resource teardown removes (or would remove)."""

    kind: str
    id: str
    name: str


async def plan_teardown(adapter: OpenStackAdapter, spec: VmSpec) -> list[Removal]:
    """What teardown would remove, in removal order."""
    removals: list[Removal] = []
    server = await compute.find_server(adapter, spec.vm_key, spec.name)
    if server is not None:
        removals.append(Removal("server", server.id, server.name))
    removals += [Removal("port", p.id, p.name) for p in await network.vm_ports(adapter, spec.vm_key)]
    removals += [Removal("volume", v.id, v.name) for v in await volumes.vm_volumes(adapter, spec.vm_key)]
    removals += [Removal("image", i.id, i.name) for i in await images.vm_images(adapter, spec.vm_key)]
    compute_api = adapter.conn.compute
    name = flavors.vm_flavor_name(spec)
    flavor = await adapter.call("finding the VM's flavor", compute_api.find_flavor, name)
    if flavor is not None:
        removals.append(Removal("flavor", flavor.id, name))
    return removals


async def teardown(adapter: OpenStackAdapter, spec: VmSpec, dry_run: bool = False) -> list[Removal]:
    """Remove (or with ``dry_run`` only list) what vmferry made for the VM."""
    removals = await plan_teardown(adapter, spec)
    if dry_run:
        return removals
    conn = adapter.conn
    for item in removals:
        if item.kind == "server":
            await adapter.call(
                "deleting the server", conn.compute.delete_server, item.id, ignore_missing=True
            )
            await wait_until(
                f"server {item.id} to be deleted",
                partial(_gone, adapter, item.id),
                compute.SERVER_TIMEOUT,
            )
        elif item.kind == "port":
            await adapter.call("deleting a port", conn.network.delete_port, item.id, ignore_missing=True)
        elif item.kind == "volume":
            # A deleted server detaches its volumes asynchronously.
            await wait_until(
                f"volume {item.id} to detach",
                partial(_deletable, adapter, item.id),
                compute.SERVER_TIMEOUT,
            )
            await adapter.call(
                "deleting a volume", conn.block_storage.delete_volume, item.id, ignore_missing=True
            )
        elif item.kind == "image":
            await adapter.call("deleting an image", conn.image.delete_image, item.id, ignore_missing=True)
        elif item.kind == "flavor":
            await adapter.call(
                "deleting the VM's flavor", conn.compute.delete_flavor, item.id, ignore_missing=True
            )
    return removals


async def _gone(adapter: OpenStackAdapter, server_id: str) -> bool | None:
    found = await adapter.call("reading the server", adapter.conn.compute.find_server, server_id)
    return True if found is None else None


async def _deletable(adapter: OpenStackAdapter, volume_id: str) -> bool | None:
    volume = await adapter.call("reading a volume", adapter.conn.block_storage.get_volume, volume_id)
    return True if volume.status == "available" or volume.status.startswith("error") else None
