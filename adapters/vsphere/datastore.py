"""What a disk copy needs to read a VM's disk files from a datastore: the inventory path of the VM's
datacenter (the ``dcPath`` of datastore ``/folder`` URLs) and the disk files a snapshot froze.

Reads go through the PropertyCollector only (see ``client``), one parent at a time.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vim

from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import unescape_name
from vmferry.adapters.vsphere.snapshots import DiskState, snapshot_disks
from vmferry.bus.errors import PermanentError

#: a VM sits at most this deep in folders, vApps and resource pools (vSphere's own limit is lower)
_MAX_DEPTH = 64


def _parent(client: VsphereClient, obj: Any) -> Any:
    paths = ["parent", "parentVApp"] if isinstance(obj, vim.VirtualMachine) else ["parent"]
    record = client.read(obj, paths, f"reading the parent of {obj._moId}")
    return record.get("parent") or record.get("parentVApp")


def datacenter_path(client: VsphereClient, vm_moref: str) -> str:
    """The inventory path of the VM's datacenter below the root folder, e.g. ``DC0`` or ``emea/DC1``
    (names unescaped; the URL encoding is the caller's)."""
    current: Any = client.bind(vim.VirtualMachine, vm_moref)
    for _ in range(_MAX_DEPTH):
        current = _parent(client, current)
        if current is None:
            break
        if isinstance(current, vim.Datacenter):
            return _path_to_root(client, current)
    raise PermanentError(
        f"VM {vm_moref} on {client.where} is not inside a datacenter",
        "is the VM registered? (templates and orphaned VMs cannot be copied)",
    )


def _path_to_root(client: VsphereClient, datacenter: vim.Datacenter) -> str:
    names: list[str] = []
    current: Any = datacenter
    for _ in range(_MAX_DEPTH):
        record = client.read(current, ["name", "parent"], f"reading the path of {current._moId}")
        parent = record.get("parent")
        if parent is None:  # the root folder has no parent and no place in the path
            break
        names.append(unescape_name(str(record.get("name", ""))))
        current = parent
    return "/".join(reversed(names))


def frozen_disk(client: VsphereClient, snapshot_moref: str, disk_key: int) -> DiskState:
    """One disk as the snapshot froze it: its backing file (a base disk, or a delta when older
    snapshots exist) and its changeId at the snapshot."""
    for disk in snapshot_disks(client, snapshot_moref):
        if disk.key == disk_key:
            return disk
    raise PermanentError(
        f"snapshot {snapshot_moref} on {client.where} has no disk with key {disk_key}",
        "the VM's disks changed since the snapshot: run the pass again from discovery",
    )
