"""Volumes found or created by identity metadata (never by name), CBT state and guest image metadata."""

from __future__ import annotations

import json
from typing import Any

from vmferry.adapters.openstack.client import OpenStackAdapter, wait_until
from vmferry.adapters.openstack.model import (
    CHANGE_ID_KEY,
    DISK_KEY,
    MANAGED_KEY,
    PASS_KEY,
    REQUEST_KEY,
    ROLE_KEY,
    VM_KEY,
    VmSpec,
    gib_for,
)
from vmferry.bus.errors import PermanentError
from vmferry.schemas.events import DiskInfo
from vmferry.schemas.request import MigrationPlan

VOLUME_TIMEOUT = 600.0


def identity(vm_key: str, disk_key: int) -> dict[str, str]:
    """The metadata that says which source disk a volume holds."""
    return {VM_KEY: vm_key, DISK_KEY: str(disk_key), MANAGED_KEY: "true"}


def volume_type_for(plan: MigrationPlan, disk: DiskInfo) -> str | None:
    """The Cinder volume type of a disk: by datastore, else the default, else the cloud's default."""
    return plan.mappings.volume_types.get(disk.datastore) or plan.mappings.default_volume_type


def guest_image_metadata(spec: VmSpec, plan: MigrationPlan) -> dict[str, str]:
    """Image properties so Nova boots the guest the way the source did."""
    meta: dict[str, str] = {}
    if spec.firmware == "efi":
        meta |= {"hw_firmware_type": "uefi", "hw_machine_type": "q35"}
        if spec.secure_boot:
            meta["os_secure_boot"] = "required"
    if plan.options.disk_bus == "virtio-scsi":
        meta |= {"hw_disk_bus": "scsi", "hw_scsi_model": "virtio-scsi"}
    else:
        meta["hw_disk_bus"] = "virtio"
    if spec.os_type:
        meta["os_type"] = spec.os_type
    return meta


async def vm_volumes(adapter: OpenStackAdapter, vm_key: str) -> list[Any]:
    """Every volume vmferry made for a VM."""
    bs = adapter.conn.block_storage
    return await adapter.call(
        "listing the VM's volumes",
        lambda: list(bs.volumes(details=True, properties=json.dumps({VM_KEY: vm_key, MANAGED_KEY: "true"}))),
    )


async def find_volume(adapter: OpenStackAdapter, vm_key: str, disk_key: int) -> Any | None:
    """The volume of one disk, by identity metadata; more than one is an error a human must resolve."""
    bs = adapter.conn.block_storage
    wanted = identity(vm_key, disk_key)
    found = await adapter.call(
        "looking up a volume by identity metadata",
        lambda: [
            v
            for v in bs.volumes(details=True, properties=json.dumps(wanted))
            if all(v.metadata.get(k) == val for k, val in wanted.items())
            # converted clones carry the same identity plus a role; the replica has none
            and not v.metadata.get(ROLE_KEY)
        ],
    )
    if len(found) > 1:
        ids = ", ".join(v.id for v in found)
        raise PermanentError(
            f"{len(found)} volumes carry the identity of disk {disk_key} of {vm_key}: {ids}",
            "delete the stray ones (or clear their vmferry_* metadata) and retry",
        )
    return found[0] if found else None


async def ensure_volume(adapter: OpenStackAdapter, spec: VmSpec, disk: DiskInfo, plan: MigrationPlan) -> Any:
    """The volume for a disk: found by identity, or created (type and AZ from the plan) and awaited."""
    volume = await find_volume(adapter, spec.vm_key, disk.key)
    if volume is None:
        volume = await _create_volume(adapter, spec, disk, plan)
    return await wait_for_volume(adapter, volume.id, {"available", "in-use"})


async def _create_volume(adapter: OpenStackAdapter, spec: VmSpec, disk: DiskInfo, plan: MigrationPlan) -> Any:
    bs = adapter.conn.block_storage
    attrs: dict[str, Any] = {
        "size": gib_for(disk.capacity_bytes),
        "name": f"{spec.name}-disk{disk.key}"[:255],
        "metadata": identity(spec.vm_key, disk.key),
    }
    if (vtype := volume_type_for(plan, disk)) is not None:
        attrs["volume_type"] = vtype
    if plan.mappings.availability_zone:
        attrs["availability_zone"] = plan.mappings.availability_zone
    return await adapter.call("creating a volume", bs.create_volume, **attrs)


async def wait_for_volume(
    adapter: OpenStackAdapter, volume_id: str, statuses: set[str], timeout: float = VOLUME_TIMEOUT
) -> Any:
    """Wait (with backoff) for a volume to reach one of ``statuses``; its error state is permanent."""
    bs = adapter.conn.block_storage

    async def probe() -> Any | None:
        volume = await adapter.call("reading a volume", bs.get_volume, volume_id)
        if volume.status.startswith("error"):
            raise PermanentError(
                f"volume {volume_id} went to {volume.status}", "see cinder-volume's log; delete and retry"
            )
        return volume if volume.status in statuses else None

    return await wait_until(f"volume {volume_id} to be {'/'.join(sorted(statuses))}", probe, timeout)


async def record_pass(
    adapter: OpenStackAdapter,
    volume_id: str,
    change_id: str | None,
    pass_no: int,
    request_id: str | None = None,
) -> None:
    """Keep the CBT changeId and pass number (and the request, if given) beside the identity keys
    (other keys untouched)."""
    bs = adapter.conn.block_storage
    meta = {CHANGE_ID_KEY: change_id or "", PASS_KEY: str(pass_no)}
    if request_id is not None:
        meta[REQUEST_KEY] = request_id
    await adapter.call("recording the copy pass on the volume", bs.set_volume_metadata, volume_id, **meta)


async def prepare_boot(adapter: OpenStackAdapter, volume_id: str, spec: VmSpec, plan: MigrationPlan) -> None:
    """Mark the root volume bootable and give it the guest's image metadata."""
    bs = adapter.conn.block_storage
    await adapter.call("marking the root volume bootable", bs.set_volume_bootable_status, volume_id, True)
    meta = guest_image_metadata(spec, plan)
    await adapter.call(
        "setting the root volume's image metadata", bs.set_volume_image_metadata, volume_id, **meta
    )
