"""Snapshots and changed block tracking (CBT), the vSphere half of every copy pass.

* One VM-wide snapshot per pass, named ``vmferry-<request id>-pass<N>`` (memory off, quiesce
  optional), found again by name on a retry instead of being taken twice; the changeId of every
  disk at that snapshot is read back from the snapshot's own configuration.
* A pass's snapshot is removed only when the caller says its data is recorded (``release_pass``);
  whatever a failed call created is removed before the error propagates; ``sweep`` removes
  vmferry snapshots left behind by crashed runs.
* ``enable_cbt`` turns CBT on and runs a create/remove snapshot cycle so tracking becomes active.
* ``changed_areas`` pages QueryChangedDiskAreas to the end of the disk, checks and merges the answer,
  and reports a CBT reset (another changeId epoch, or ESXi's "cannot get changes") as a full copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pyVmomi import vim

from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.faults import fault_keys, translate_error
from vmferry.adapters.vsphere.inventory import (
    VMFERRY_SNAPSHOT_PREFIX,
    SnapshotNode,
    snapshot_nodes,
    unescape_name,
)
from vmferry.adapters.vsphere.vmomi import moref_of, new
from vmferry.bus.errors import FerryError, PermanentError

log = logging.getLogger(__name__)

#: ESXi message keys of QueryChangedDiskAreas faults
CBT_NO_TRACK = "vim.hostd.vmsvc.cbt.noTrack"
CBT_CANNOT_GET_CHANGES = "vim.hostd.vmsvc.cbt.cannotGetChanges"
ALL_ALLOCATED = "*"


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each kind of vSphere task (removal consolidates and can take long)."""

    create: float = 1800.0
    remove: float = 6 * 3600.0
    reconfigure: float = 600.0


def snapshot_name(request_id: str, pass_no: int) -> str:
    """The recognisable name of a pass snapshot."""
    return f"{VMFERRY_SNAPSHOT_PREFIX}{request_id}-pass{pass_no}"


def snapshot_description(vm_key: str, request_id: str, pass_no: int) -> str:
    """What a pass snapshot carries in its description (parsed back by ``parse_description``)."""
    return f"vmferry vm={vm_key} request={request_id} pass={pass_no}"


def parse_description(text: str) -> dict[str, str]:
    """``{"vm": ..., "request": ..., "pass": ...}`` of a vmferry snapshot description ({} otherwise)."""
    words = text.split()
    if not words or words[0] != "vmferry":
        return {}
    return dict(w.split("=", 1) for w in words[1:] if "=" in w)


@dataclass(frozen=True)
class DiskState:
    """A disk as frozen in a snapshot: its file and changeId there (None without CBT)."""

    key: int
    backing_file: str
    capacity_bytes: int
    change_id: str | None


@dataclass(frozen=True)
class PassSnapshot:
    """The snapshot of one pass and the state of every disk in it."""

    vm_moref: str
    snapshot_moref: str
    name: str
    request_id: str
    pass_no: int
    disks: tuple[DiskState, ...]
    #: False when an existing snapshot of this pass was found and reused (a retry)
    created: bool

    def disk(self, key: int) -> DiskState:
        """The state of one disk, by device key."""
        for disk in self.disks:
            if disk.key == key:
                return disk
        raise PermanentError(f"disk {key} is not in snapshot {self.name} ({self.snapshot_moref})")


@dataclass(frozen=True)
class VmferrySnapshot:
    """A vmferry snapshot somewhere in the inventory (for listing and sweeping)."""

    vm_moref: str
    vm_name: str
    snapshot_moref: str
    name: str
    description: str
    created: datetime | None


# ---------------------------------------------------------------------------------------------
# Reading snapshots


def snapshots_of(client: VsphereClient, vm_moref: str) -> list[SnapshotNode]:
    """Every snapshot of a VM, oldest first."""
    vm = client.bind(vim.VirtualMachine, vm_moref)
    return snapshot_nodes(
        client.read(vm, ["snapshot"], f"listing the snapshots of {vm_moref}").get("snapshot")
    )


def _capacity(disk: Any) -> int:
    in_bytes = int(disk.capacityInBytes or 0)
    return in_bytes if in_bytes else int(disk.capacityInKB or 0) * 1024


def snapshot_disks(client: VsphereClient, snapshot_moref: str) -> tuple[DiskState, ...]:
    """The disks of a snapshot as it froze them, with their changeIds."""
    snapshot = client.bind(vim.vm.Snapshot, snapshot_moref)
    doing = f"reading the disks of snapshot {snapshot_moref}"
    devices = client.read(snapshot, ["config.hardware.device"], doing).get("config.hardware.device", [])
    disks: list[Any] = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    return tuple(
        DiskState(
            key=d.key,
            backing_file=str(getattr(d.backing, "fileName", "") or ""),
            capacity_bytes=_capacity(d),
            change_id=str(d.backing.changeId) if getattr(d.backing, "changeId", None) else None,
        )
        for d in sorted(disks, key=lambda d: d.key)
    )


# ---------------------------------------------------------------------------------------------
# Creating and removing


def remove_snapshot(client: VsphereClient, snapshot_moref: str, timeouts: Timeouts = Timeouts()) -> bool:
    """Remove one snapshot (consolidating); False if it was already gone."""
    snapshot = client.bind(vim.vm.Snapshot, snapshot_moref)
    doing = f"removing snapshot {snapshot_moref}"
    try:
        client.run_task(
            doing,
            lambda: snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
            timeouts.remove,
        )
    except PermanentError as error:
        if "ManagedObjectNotFound" in error.cause:
            return False
        raise
    return True


def _create(
    client: VsphereClient, vm_moref: str, name: str, description: str, quiesce: bool, timeouts: Timeouts
) -> str:
    vm = client.bind(vim.VirtualMachine, vm_moref)
    result = client.run_task(
        f"creating snapshot {name} of {vm_moref}",
        lambda: vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=quiesce),
        timeouts.create,
    )
    return moref_of(result)


def _remove_named(
    client: VsphereClient, vm_moref: str, name: str, timeouts: Timeouts, keep: str = ""
) -> None:
    """Best effort: remove every snapshot of the VM with this name (except ``keep``), logging failures."""
    try:
        nodes = [n for n in snapshots_of(client, vm_moref) if n.name == name and n.moref != keep]
    except FerryError as error:
        log.warning("cleanup: cannot list snapshots of %s: %s", vm_moref, error)
        return
    for node in nodes:
        try:
            remove_snapshot(client, node.moref, timeouts)
            log.info("cleanup: removed snapshot %s (%s) of %s", node.name, node.moref, vm_moref)
        except FerryError as error:
            log.warning("cleanup: snapshot %s (%s) of %s is left: %s", node.name, node.moref, vm_moref, error)


def _created_or_existing(
    client: VsphereClient, vm_moref: str, name: str, description: str, quiesce: bool, timeouts: Timeouts
) -> tuple[str, bool]:
    existing = [n for n in snapshots_of(client, vm_moref) if n.name == name]
    if existing:
        log.info("snapshot %s of %s exists (%s): reusing it", name, vm_moref, existing[0].moref)
        return existing[0].moref, False
    try:
        moref = _create(client, vm_moref, name, description, quiesce, timeouts)
    except BaseException:
        _remove_named(client, vm_moref, name, timeouts)
        raise
    # Two deliveries racing may each have made one: converge on the oldest.
    twins = [n for n in snapshots_of(client, vm_moref) if n.name == name]
    if len(twins) > 1 and twins[0].moref != moref:
        _remove_named(client, vm_moref, name, timeouts, keep=twins[0].moref)
        return twins[0].moref, False
    return moref, True


def take_pass_snapshot(
    client: VsphereClient,
    vm_moref: str,
    *,
    request_id: str,
    vm_key: str,
    pass_no: int,
    quiesce: bool = False,
    require_change_ids: bool = False,
    previous_recorded: bool = False,
    check: Callable[[PassSnapshot], None] | None = None,
    timeouts: Timeouts = Timeouts(),
) -> PassSnapshot:
    """Take (or find again) the one snapshot of pass ``pass_no`` covering all disks; read its changeIds.

    ``require_change_ids``: every non-RDM disk must have a changeId (CBT active), else the snapshot
    is removed and a PermanentError says which disks. ``check`` may veto the snapshot (raise); it
    is removed then too. ``previous_recorded``: the data of pass ``pass_no - 1`` is durably copied,
    so its snapshot is removed once this one exists.
    """
    name = snapshot_name(request_id, pass_no)
    description = snapshot_description(vm_key, request_id, pass_no)
    moref, created = _created_or_existing(client, vm_moref, name, description, quiesce, timeouts)
    try:
        taken = PassSnapshot(
            vm_moref, moref, name, request_id, pass_no, snapshot_disks(client, moref), created
        )
        if require_change_ids:
            untracked = [d for d in taken.disks if d.change_id is None]
            if untracked:
                keys = ", ".join(str(d.key) for d in untracked)
                raise PermanentError(
                    f"changed block tracking is not active on disk(s) {keys} of {vm_moref}"
                    f" in snapshot {name}",
                    "enable CBT for the VM and every disk (vmferry does when options.enable_cbt is true),"
                    " then retry",
                )
        if check is not None:
            check(taken)
    except BaseException:
        log.info("snapshot %s of %s is unusable: removing it", name, vm_moref)
        _remove_named(client, vm_moref, name, timeouts)
        raise
    if previous_recorded and pass_no > 0:
        release_pass(client, vm_moref, request_id, pass_no - 1, timeouts)
    return taken


def release_pass(
    client: VsphereClient, vm_moref: str, request_id: str, pass_no: int, timeouts: Timeouts = Timeouts()
) -> int:
    """Remove the snapshot of a pass whose data is recorded; returns how many were removed (0 if none)."""
    name = snapshot_name(request_id, pass_no)
    removed = 0
    for node in snapshots_of(client, vm_moref):
        if node.name == name and remove_snapshot(client, node.moref, timeouts):
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# Changed block tracking on/off


def cbt_status(client: VsphereClient, vm_moref: str) -> tuple[bool, list[str]]:
    """(VM-level CBT on, extraConfig keys of disks whose tracking is explicitly off)."""
    vm = client.bind(vim.VirtualMachine, vm_moref)
    record = client.read(
        vm, ["config.changeTrackingEnabled", "config.extraConfig"], f"reading CBT of {vm_moref}"
    )
    off = [
        str(o.key)
        for o in record.get("config.extraConfig", [])
        if str(o.key).endswith(".ctkEnabled") and ":" in str(o.key) and str(o.value).lower() == "false"
    ]
    return bool(record.get("config.changeTrackingEnabled", False)), off


def enable_cbt(
    client: VsphereClient, vm_moref: str, request_id: str, timeouts: Timeouts = Timeouts()
) -> bool:
    """Turn CBT on for the VM and every disk, then cycle a snapshot so tracking starts (ESXi only
    starts tracking at the next "stun"). Returns False if it was already on everywhere."""
    enabled, off = cbt_status(client, vm_moref)
    if enabled and not off:
        return False
    vm = client.bind(vim.VirtualMachine, vm_moref)
    spec = new(
        vim.vm.ConfigSpec,
        changeTrackingEnabled=True,
        extraConfig=[new(vim.option.OptionValue, key=key, value="TRUE") for key in off],
    )
    client.run_task(
        f"enabling changed block tracking on {vm_moref}",
        lambda: vm.ReconfigVM_Task(spec),
        timeouts.reconfigure,
    )
    name = f"{VMFERRY_SNAPSHOT_PREFIX}{request_id}-cbt-init"
    try:
        moref = _create(client, vm_moref, name, "vmferry: activates changed block tracking", False, timeouts)
        remove_snapshot(client, moref, timeouts)
    except BaseException:
        _remove_named(client, vm_moref, name, timeouts)
        raise
    log.info("changed block tracking enabled on %s", vm_moref)
    return True


# ---------------------------------------------------------------------------------------------
# Sweeping


def list_vmferry_snapshots(client: VsphereClient, request_id: str | None = None) -> list[VmferrySnapshot]:
    """Every vmferry snapshot of every VM (of one request, if given), in one traversal."""
    prefix = (
        snapshot_name(request_id, 0).rsplit("-pass", 1)[0] + "-" if request_id else VMFERRY_SNAPSHOT_PREFIX
    )
    found: list[VmferrySnapshot] = []
    for record in client.read_all(
        {vim.VirtualMachine: ["name", "snapshot"]}, doing="listing vmferry snapshots"
    ):
        for node in snapshot_nodes(record.get("snapshot")):
            if node.name.startswith(prefix):
                found.append(
                    VmferrySnapshot(
                        record.moref,
                        unescape_name(str(record.get("name", ""))),
                        node.moref,
                        node.name,
                        node.description,
                        node.created,
                    )
                )
    return found


def sweep(
    client: VsphereClient,
    *,
    request_id: str | None = None,
    older_than: timedelta | None = None,
    keep: Iterable[str] = (),
    timeouts: Timeouts = Timeouts(),
) -> list[VmferrySnapshot]:
    """Remove stale vmferry snapshots (of one request, older than a limit, except morefs in ``keep``).

    Tries every snapshot; if some could not be removed, raises one error naming them after the rest.
    """
    kept = set(keep)
    now = datetime.now(UTC)
    removed: list[VmferrySnapshot] = []
    failures: list[str] = []
    for snap in list_vmferry_snapshots(client, request_id):
        if snap.snapshot_moref in kept:
            continue
        if older_than is not None and snap.created is not None and now - snap.created < older_than:
            continue
        try:
            remove_snapshot(client, snap.snapshot_moref, timeouts)
            removed.append(snap)
        except FerryError as error:
            failures.append(f"{snap.name} of {snap.vm_name!r} ({snap.vm_moref}): {error.cause}")
    if failures:
        raise PermanentError(
            f"could not remove {len(failures)} vmferry snapshot(s): {'; '.join(failures)}",
            "look at the VMs' tasks in vSphere (a running backup or consolidation?) and sweep again",
        )
    return removed


# ---------------------------------------------------------------------------------------------
# Changed areas


Extent = tuple[int, int]


@dataclass(frozen=True)
class ChangedAreas:
    """What to copy of one disk for one pass.

    ``full_copy`` means the destination cannot be trusted to hold the previous pass: the areas are
    then everything allocated (or the whole disk), and everything outside them must be written as
    zeroes unless the destination is known to read as zeroes.
    """

    disk_key: int
    capacity_bytes: int
    #: the disk's changeId at this pass's snapshot: record it once the areas are durably copied
    change_id: str | None
    #: the changeId the areas are relative to ("*" = since the disk was empty)
    base_change_id: str | None
    areas: tuple[Extent, ...]
    full_copy: bool
    reason: str = ""

    @property
    def total_bytes(self) -> int:
        """Bytes to copy."""
        return sum(length for _, length in self.areas)


def change_id_epoch(change_id: str) -> str:
    """The tracking epoch of a changeId (before the last '/'): it changes when CBT is reset."""
    return change_id.rsplit("/", 1)[0]


def _invalid(disk_key: int, what: str) -> PermanentError:
    return PermanentError(
        f"QueryChangedDiskAreas for disk {disk_key} returned an inconsistent answer: {what}",
        "copy this disk in full (treat it as a CBT reset) and report the ESXi build",
    )


def _page_areas(
    info: Any, offset: int, capacity: int, disk_key: int, last_end: int
) -> tuple[list[Extent], int]:
    start, length = int(info.startOffset), int(info.length)
    if length <= 0 or not start <= offset < start + length:
        raise _invalid(disk_key, f"page [{start}, +{length}) does not continue at offset {offset}")
    areas: list[Extent] = []
    for area in info.changedArea or []:
        a_start, a_length = int(area.start), int(area.length)
        if a_length <= 0 or a_start < 0 or a_start + a_length > capacity:
            raise _invalid(disk_key, f"area [{a_start}, +{a_length}) is outside the {capacity}-byte disk")
        if a_start < start or a_start + a_length > start + length:
            raise _invalid(
                disk_key, f"area [{a_start}, +{a_length}) is outside its page [{start}, +{length})"
            )
        if a_start < last_end:
            raise _invalid(disk_key, f"area [{a_start}, +{a_length}) overlaps or precedes the previous one")
        areas.append((a_start, a_length))
        last_end = a_start + a_length
    return areas, start + length


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Sorted extents with touching neighbours joined."""
    merged: list[Extent] = []
    for start, length in sorted(extents):
        if merged and merged[-1][0] + merged[-1][1] >= start:
            end = max(merged[-1][0] + merged[-1][1], start + length)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((start, length))
    return merged


def query_changed_areas(
    client: VsphereClient, vm_moref: str, snapshot_moref: str, disk_key: int, capacity: int, change_id: str
) -> list[Extent]:
    """QueryChangedDiskAreas from ``change_id`` paged to the end of the disk; validated and merged."""
    vm = client.bind(vim.VirtualMachine, vm_moref)
    snapshot = client.bind(vim.vm.Snapshot, snapshot_moref)
    offset, last_end = 0, 0
    areas: list[Extent] = []
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(
            snapshot=snapshot, deviceKey=disk_key, startOffset=offset, changeId=change_id
        )
        page, offset = _page_areas(info, offset, capacity, disk_key, last_end)
        areas.extend(page)
        last_end = page[-1][0] + page[-1][1] if page else last_end
    return merge_extents(areas)


def _reset_kind(error: BaseException) -> str:
    """ "reset", "untracked" or "" for a QueryChangedDiskAreas fault."""
    if isinstance(error, vim.fault.FileFault):
        keys = fault_keys(error)
        if CBT_CANNOT_GET_CHANGES in keys:
            return "reset"
        if CBT_NO_TRACK in keys:
            return "untracked"
    return ""


def changed_areas(
    client: VsphereClient, vm_moref: str, snapshot_moref: str, disk: DiskState, base_change_id: str | None
) -> ChangedAreas:
    """What of ``disk`` to copy in the pass of ``snapshot_moref``, given the changeId the destination holds.

    * no changeId at the snapshot (CBT off): the whole disk, full copy;
    * no base (first pass) or ``*``: the allocated areas, full copy;
    * base from another epoch, or ESXi cannot answer from it (CBT reset): allocated areas, full copy;
    * otherwise: the areas changed since the base.
    """
    where = f"changed areas of disk {disk.key} of {vm_moref}"
    whole = ((0, disk.capacity_bytes),) if disk.capacity_bytes else ()

    def result(areas: Sequence[Extent], full: bool, reason: str, base: str | None) -> ChangedAreas:
        return ChangedAreas(disk.key, disk.capacity_bytes, disk.change_id, base, tuple(areas), full, reason)

    def allocated(reason: str) -> ChangedAreas:
        try:
            areas = query_changed_areas(
                client, vm_moref, snapshot_moref, disk.key, disk.capacity_bytes, ALL_ALLOCATED
            )
        except FerryError:
            raise
        except Exception as exc:
            if _reset_kind(exc):
                return result(whole, True, f"{reason}; allocated areas unknown: whole disk", None)
            raise translate_error(exc, f"querying {where}", client.where) from exc
        return result(areas, True, reason, ALL_ALLOCATED)

    if disk.change_id is None:
        return result(whole, True, "CBT is off for this disk at the snapshot: whole disk", None)
    if base_change_id is None or base_change_id == ALL_ALLOCATED:
        return allocated("first copy: allocated areas")
    if change_id_epoch(base_change_id) != change_id_epoch(disk.change_id):
        return allocated(
            f"CBT was reset (changeId epoch {change_id_epoch(base_change_id)!r} is now"
            f" {change_id_epoch(disk.change_id)!r}): full copy needed"
        )
    try:
        areas = query_changed_areas(
            client, vm_moref, snapshot_moref, disk.key, disk.capacity_bytes, base_change_id
        )
    except FerryError:
        raise
    except Exception as exc:
        kind = _reset_kind(exc)
        if kind == "reset":
            return allocated(
                f"ESXi cannot give the changes since {base_change_id!r} (CBT reset): full copy needed"
            )
        if kind == "untracked":
            return result(whole, True, "CBT is not tracking this disk: whole disk", None)
        raise translate_error(exc, f"querying {where}", client.where) from exc
    return result(areas, False, f"changes since {base_change_id}", base_change_id)
