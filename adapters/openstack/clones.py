"""Cinder clones of replica volumes for guest conversion and pre-flight inspection, and the conversion
marks kept on volumes.

In clone mode the replica (the volume the copy keeps in sync) is never written: conversion works on a
Cinder clone of it, found again by identity metadata (VM, disk and role ``converted``), never by name.
A successful conversion marks the converted volumes (state ``done``, the inspection and the log
reference), so a redelivery finds them converted and never runs virt-v2v twice: it is not idempotent.
A clone that is not marked done is only a leftover of a failed attempt and is deleted and made again,
so every attempt starts from a pristine copy of the replica.

The pre-flight inspection of a warm migration works on clones of role ``inspection``, made while later
copy passes may still write the replicas: ``ReplicaState`` tells whether a replica is at rest (detached,
holding a recorded pass) and whether it stayed so while it was cloned.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from vmferry.adapters.openstack import compute
from vmferry.adapters.openstack.client import OpenStackAdapter, wait_until
from vmferry.adapters.openstack.model import (
    DISK_KEY,
    MANAGED_KEY,
    PASS_KEY,
    REQUEST_KEY,
    ROLE_KEY,
    VM_KEY,
)
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.schemas.events import GuestInspection, SyncedVolume

CONVERTED_ROLE = "converted"
#: clones the pre-flight inspection reads (and deletes again); never converted, never launched
INSPECTION_ROLE = "inspection"
#: how far the conversion of a volume got (see ConversionState)
STATE_KEY = "vmferry_conversion"
#: the attempt that made (clone mode) or started converting (in-place mode) the volume
ATTEMPT_KEY = "vmferry_conversion_attempt"
#: which replica, at which copy pass, a clone was made from
SOURCE_KEY = "vmferry_source_volume"
SOURCE_PASS_KEY = "vmferry_source_pass"  # noqa: S105 - the copy pass number, not a password
INSPECTION_KEY = "vmferry_inspection"
LOG_KEY = "vmferry_conversion_log"

#: Cinder refuses metadata values longer than this
MAX_VALUE = 255
CLONE_TIMEOUT = 6 * 3600.0
_SETTLED = {"available", "in-use"}
_GONE_TIMEOUT = 600.0


class ConversionState(StrEnum):
    """Where a volume stands; missing means "never touched by conversion"."""

    PENDING = "pending"  # a fresh clone, not converted
    RUNNING = "running"  # in-place conversion started on it (the guest may be partly converted)
    DONE = "done"


@dataclass(frozen=True)
class ConvertedMark:
    """What a successful conversion leaves on each converted volume."""

    attempt: str
    inspection: GuestInspection
    log_ref: str | None = None

    def metadata(self) -> dict[str, str]:
        """The metadata keys of the mark (values within Cinder's 255 characters)."""
        meta = {
            STATE_KEY: ConversionState.DONE.value,
            ATTEMPT_KEY: self.attempt,
            INSPECTION_KEY: _inspection_text(self.inspection),
        }
        if self.log_ref and len(self.log_ref) <= MAX_VALUE:
            meta[LOG_KEY] = self.log_ref
        return meta

    @classmethod
    def of(cls, metadata: Mapping[str, str]) -> ConvertedMark | None:
        """The mark a volume carries, or None when it is not marked converted."""
        if metadata.get(STATE_KEY) != ConversionState.DONE.value:
            return None
        try:
            inspection = msgspec.json.decode(metadata.get(INSPECTION_KEY, "{}"), type=GuestInspection)
        except msgspec.DecodeError:
            inspection = GuestInspection()  # an operator edited it: the mark itself still counts
        return cls(metadata.get(ATTEMPT_KEY, ""), inspection, metadata.get(LOG_KEY) or None)


def _inspection_text(inspection: GuestInspection) -> str:
    text = msgspec.json.encode(inspection).decode()
    while len(text) > MAX_VALUE and inspection.product_name:
        inspection = msgspec.structs.replace(inspection, product_name=inspection.product_name[:-16])
        text = msgspec.json.encode(inspection).decode()
    return text[:MAX_VALUE]


@dataclass(frozen=True)
class DiskVolume:
    """The volume that holds (or will hold) one disk's converted data."""

    disk_key: int
    volume_id: str
    metadata: Mapping[str, str]

    @property
    def state(self) -> str:
        """The conversion state recorded on the volume ('' when none)."""
        return self.metadata.get(STATE_KEY, "")

    @property
    def mark(self) -> ConvertedMark | None:
        """The conversion mark, when the volume is converted."""
        return ConvertedMark.of(self.metadata)

    @classmethod
    def of(cls, disk_key: int, volume: Any) -> DiskVolume:
        """From an openstacksdk volume."""
        return cls(disk_key, str(volume.id), dict(volume.metadata or {}))


def clone_identity(vm_key: str, disk_key: int, role: str = CONVERTED_ROLE) -> dict[str, str]:
    """The metadata that says "the conversion (or inspection) clone of this disk of this VM"."""
    return {VM_KEY: vm_key, DISK_KEY: str(disk_key), MANAGED_KEY: "true", ROLE_KEY: role}


async def find_clones(
    adapter: OpenStackAdapter, vm_key: str, disk_key: int, role: str = CONVERTED_ROLE
) -> list[Any]:
    """Every clone of one disk in ``role`` (normally none or one), by identity metadata."""
    bs = adapter.conn.block_storage
    wanted = clone_identity(vm_key, disk_key, role)
    return await adapter.call(
        f"looking up {role} clones by identity metadata",
        lambda: [
            v
            for v in bs.volumes(details=True, properties=json.dumps(wanted))
            if all((v.metadata or {}).get(k) == val for k, val in wanted.items())
        ],
    )


async def read_volumes(adapter: OpenStackAdapter, replicas: Sequence[SyncedVolume]) -> list[DiskVolume]:
    """The replicas themselves, fresh from Cinder (in-place mode converts these)."""
    bs = adapter.conn.block_storage
    found = []
    for replica in replicas:
        volume = await adapter.call("reading a replica volume", bs.get_volume, replica.volume_id)
        found.append(DiskVolume.of(replica.disk_key, volume))
    return found


async def converted_clones(
    adapter: OpenStackAdapter, vm_key: str, replicas: Sequence[SyncedVolume], pass_no: int
) -> tuple[list[DiskVolume] | None, list[Any]]:
    """The converted clones of every disk in disk order, or None when no disk has one; also every clone
    found (the leftovers to remove when nothing is converted)."""
    found = {r.disk_key: await find_clones(adapter, vm_key, r.disk_key) for r in replicas}
    every = [volume for volumes in found.values() for volume in volumes]
    attempts = {mark.attempt for v in every if (mark := ConvertedMark.of(v.metadata or {})) is not None}
    if not attempts:
        return None, every
    if len(attempts) > 1:
        raise _mixed(vm_key, f"clones of {len(attempts)} different conversions are marked converted")
    attempt = attempts.pop()
    chosen: list[DiskVolume] = []
    for replica in replicas:
        ours = [v for v in found[replica.disk_key] if (v.metadata or {}).get(ATTEMPT_KEY) == attempt]
        if len(ours) != 1:
            raise _mixed(vm_key, f"disk {replica.disk_key} has {len(ours)} clone(s) of the converted attempt")
        disk = DiskVolume.of(replica.disk_key, ours[0])
        _check_source(vm_key, disk, replica, pass_no)
        chosen.append(disk)
    return await complete_marks(adapter, vm_key, chosen), every


async def complete_marks(
    adapter: OpenStackAdapter, vm_key: str, disks: Sequence[DiskVolume]
) -> list[DiskVolume] | None:
    """The disks with their conversion mark when the VM was converted, else None.

    A conversion covers all disks at once, so the marks are all-or-nothing: a volume of the same attempt
    as a marked one was converted with it (marking was interrupted) and is marked now. Anything else
    mixed is an inconsistency a human must resolve.
    """
    marks = [disk.mark for disk in disks if disk.mark is not None]
    if not marks:
        return None
    mark = marks[0]
    for disk in disks:
        if disk.metadata.get(ATTEMPT_KEY) != mark.attempt:
            raise _mixed(vm_key, f"disk {disk.disk_key} is not part of the conversion marked done")
    for disk in disks:
        if disk.mark is None:
            await set_mark(adapter, disk.volume_id, mark)
    return [DiskVolume(d.disk_key, d.volume_id, {**d.metadata, **mark.metadata()}) for d in disks]


def _mixed(vm_key: str, what: str) -> PermanentError:
    return PermanentError(
        f"the converted volumes of {vm_key} are inconsistent: {what} (a conversion covers all disks"
        " together)",
        f"delete the VM's volumes with {ROLE_KEY}={CONVERTED_ROLE} (copies: the replicas stay), or"
        " re-sync the replicas after an in-place conversion, and replay the vm.synced event",
    )


def _check_source(vm_key: str, disk: DiskVolume, replica: SyncedVolume, pass_no: int) -> None:
    source = disk.metadata.get(SOURCE_KEY)
    source_pass = disk.metadata.get(SOURCE_PASS_KEY)
    if source == replica.volume_id and source_pass == str(pass_no):
        return
    raise PermanentError(
        f"converted clone {disk.volume_id} of disk {disk.disk_key} of {vm_key} was made from volume"
        f" {source} at pass {source_pass}, but this event's replica is {replica.volume_id} at pass {pass_no}",
        f"to convert the newer data, delete the VM's volumes with {ROLE_KEY}={CONVERTED_ROLE} and replay",
    )


async def remove_clone(adapter: OpenStackAdapter, volume: Any, server_id: str) -> None:
    """Delete a clone (detaching it from the conversion host first) and wait until it is gone."""
    bs = adapter.conn.block_storage
    volume = await wait_settled(adapter, str(volume.id))
    if volume is None:
        return
    attached = [a.get("server_id") for a in volume.attachments or []]
    if attached:
        if attached != [server_id]:
            raise PermanentError(
                f"clone {volume.id} is attached to {', '.join(map(str, attached))}, not to the conversion"
                " host",
                "detach it there (it is only a copy of the replica), then retry",
            )
        await compute.detach(adapter, server_id, volume.id)
    await adapter.call("deleting a clone of a replica", bs.delete_volume, volume.id, ignore_missing=True)

    async def gone() -> bool | None:
        found: Any = await adapter.call("reading a volume", bs.find_volume, volume.id, ignore_missing=True)
        if found is not None and found.status == "error_deleting":
            raise RetryableError(
                f"Cinder could not delete clone {volume.id}", "see cinder-volume's log; retry"
            )
        return True if found is None else None

    await wait_until(f"volume {volume.id} to be deleted", gone, _GONE_TIMEOUT)


async def wait_settled(
    adapter: OpenStackAdapter, volume_id: str, timeout: float = CLONE_TIMEOUT
) -> Any | None:
    """Wait until a volume is no longer busy (creating, attaching, ...); None once it is gone."""
    bs = adapter.conn.block_storage

    async def probe() -> tuple[Any] | None:
        volume: Any = await adapter.call("reading a volume", bs.find_volume, volume_id, ignore_missing=True)
        if volume is None or volume.status in _SETTLED or volume.status.startswith("error"):
            return (volume,)
        return None

    (found,) = await wait_until(f"volume {volume_id} to settle", probe, timeout, first=1.0, cap=15.0)
    return found


async def create_clones(
    adapter: OpenStackAdapter,
    vm_key: str,
    replicas: Sequence[SyncedVolume],
    pass_no: int,
    attempt: str,
    timeout: float = CLONE_TIMEOUT,
    role: str = CONVERTED_ROLE,
) -> list[DiskVolume]:
    """Clone every replica (in parallel) and wait until the clones are available; disk order kept.
    Conversion clones start ``pending``; inspection clones carry no conversion state."""
    bs = adapter.conn.block_storage

    async def clone(replica: SyncedVolume) -> DiskVolume:
        source = await adapter.call("reading a replica volume", bs.get_volume, replica.volume_id)
        metadata = clone_identity(vm_key, replica.disk_key, role) | {
            ATTEMPT_KEY: attempt,
            SOURCE_KEY: replica.volume_id,
            SOURCE_PASS_KEY: str(pass_no),
        }
        if role == CONVERTED_ROLE:
            metadata[STATE_KEY] = ConversionState.PENDING.value
        made = await adapter.call(
            "cloning a replica volume",
            bs.create_volume,
            size=source.size,
            source_volume_id=replica.volume_id,
            name=f"{source.name or replica.volume_id}-{role}"[:255],
            description=f"vmferry {role} clone of disk {replica.disk_key} of {vm_key}",
            metadata=metadata,
        )
        ready = await wait_settled(adapter, str(made.id), timeout)
        if ready is None or ready.status != "available":
            status = ready.status if ready is not None else "deleted"
            raise RetryableError(
                f"clone {made.id} of replica {replica.volume_id} went to {status}",
                "see cinder-volume's log; the failed clone is deleted and made again on retry",
            )
        return DiskVolume.of(replica.disk_key, ready)

    return list(await asyncio.gather(*(clone(replica) for replica in replicas)))


async def set_mark(adapter: OpenStackAdapter, volume_id: str, mark: ConvertedMark) -> None:
    """Mark a volume converted (other metadata untouched)."""
    bs = adapter.conn.block_storage
    await adapter.call("marking a volume converted", bs.set_volume_metadata, volume_id, **mark.metadata())


async def set_state(adapter: OpenStackAdapter, volume_id: str, state: ConversionState, attempt: str) -> None:
    """Record how far the conversion of a volume got (in-place mode marks the replica running)."""
    bs = adapter.conn.block_storage
    meta = {STATE_KEY: state.value, ATTEMPT_KEY: attempt}
    await adapter.call("recording the conversion state", bs.set_volume_metadata, volume_id, **meta)


async def release(adapter: OpenStackAdapter, server_id: str, volume_id: str) -> None:
    """Detach a volume from the conversion host if (and only if) it is attached there."""
    bs = adapter.conn.block_storage
    volume = await adapter.call("reading a volume", bs.get_volume, volume_id)
    if any(a.get("server_id") == server_id for a in volume.attachments or []):
        await compute.detach(adapter, server_id, volume_id)


async def remove_clones(
    adapter: OpenStackAdapter, vm_key: str, disk_keys: Sequence[int], server_id: str, role: str
) -> list[str]:
    """Detach and delete every clone of the VM's disks in ``role`` (found by identity); their ids."""
    removed: list[str] = []
    for disk_key in disk_keys:
        for volume in await find_clones(adapter, vm_key, disk_key, role):
            await remove_clone(adapter, volume, server_id)
            removed.append(str(volume.id))
    return removed


@dataclass(frozen=True)
class ReplicaState:
    """What a clone of a replica depends on: whether something has it attached (a copy pass writing it,
    an in-place conversion), which pass it holds, and Cinder's last change of it."""

    volume_id: str
    status: str
    attached_to: tuple[str, ...]
    request_id: str
    pass_no: int
    conversion: str
    #: Cinder changes it on every attach and detach (not on cloning or metadata writes)
    updated_at: str

    @classmethod
    def of(cls, volume: Any) -> ReplicaState:
        """From an openstacksdk volume."""
        meta = dict(volume.metadata or {})
        recorded = str(meta.get(PASS_KEY) or "0")
        return cls(
            volume_id=str(volume.id),
            status=str(volume.status),
            attached_to=tuple(str(a.get("server_id")) for a in volume.attachments or []),
            request_id=str(meta.get(REQUEST_KEY) or ""),
            pass_no=int(recorded) if recorded.isdigit() else 0,
            conversion=str(meta.get(STATE_KEY) or ""),
            updated_at=str(volume.updated_at or ""),
        )

    def busy_because(self, request_id: str, pass_no: int) -> str | None:
        """Why a clone made now might not hold a whole copy pass of ``request_id`` (None: at rest)."""
        if self.status != "available" or self.attached_to:
            return f"replica {self.volume_id} is {self.status} (a later copy pass or a conversion uses it)"
        if self.conversion:
            return f"replica {self.volume_id} is being converted in place ({self.conversion})"
        if self.request_id != request_id:
            return f"replica {self.volume_id} holds a pass of request {self.request_id or 'unknown'}"
        if self.pass_no < pass_no:
            return f"replica {self.volume_id} records pass {self.pass_no}, not pass {pass_no} or later"
        return None


async def replica_states(adapter: OpenStackAdapter, replicas: Sequence[SyncedVolume]) -> list[ReplicaState]:
    """The replicas as Cinder sees them now, in disk order."""
    bs = adapter.conn.block_storage
    found = []
    for replica in replicas:
        volume = await adapter.call("reading a replica volume", bs.get_volume, replica.volume_id)
        found.append(ReplicaState.of(volume))
    return found
