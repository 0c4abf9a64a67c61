"""What convert's guest conversion and its pre-flight inspection share: the guest as the converter sees
it, the blocking converter on a worker thread with heartbeats and throttled progress in the VM's state,
the tool logs kept in the object store, and failures turned into causes a human can act on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import msgspec

from vmferry.adapters.conversion import (
    ConversionError,
    ConvertedRecord,
    Firmware,
    GuestSpec,
    Inspection,
    Progress,
    SourceDisk,
    SourceNic,
)
from vmferry.adapters.openstack import clones
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.clones import DiskVolume
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.bus.function import StepContext
from vmferry.bus.handles import BusHandle
from vmferry.bus.state import Mutation
from vmferry.schemas.events import GuestInspection, VmSynced
from vmferry.schemas.request import DestinationRef, MigrationPlan
from vmferry.schemas.state import StepProgress, VmState

log = logging.getLogger(__name__)

T = TypeVar("T")
#: an adapter for a configured destination (clouds.yaml entry, project, region)
AdapterFactory = Callable[[DestinationRef], Awaitable[OpenStackAdapter]]
#: the server id of the conversion host (the machine this process runs on) for a plan's destination
ConversionHost = Callable[[MigrationPlan], str]
#: where the conversion host's /dev is seen from this process: "/" in production
DeviceRoot = Callable[[str], Path]
#: a blocking converter call: it reports progress through the callback and stops when the event is set
BlockingJob = Callable[[Callable[[Progress], None], threading.Event], T]

#: longer roots push the sockets nbdkit/libguestfs make in <root>/<attempt>/scratch/v2v.XXXXXX/ past
#: the 107-byte limit of Unix socket paths ("nbdkit: -U: path too long")
MAX_WORK_ROOT = 64
_MAX_CAUSE = 3800  # migration.failed's cause holds 4096 characters
_MAX_LINE = 300


def production_root(_server_id: str) -> Path:
    """The conversion host is the machine this process runs on: its devices are under /."""
    return Path("/")


# ---------------------------------------------------------------------------------------------------------
# The guest as the converter sees it


def _nics(synced: VmSynced) -> tuple[SourceNic, ...]:
    return tuple(
        SourceNic(mac=nic.mac, model=nic.adapter_type or "vmxnet3", network=nic.network or "VM Network")
        for nic in synced.vm.nics
    )


def check_guest_facts(synced: VmSynced) -> None:
    """Bad facts fail before anything is cloned."""
    try:
        _nics(synced)
    except ValueError as error:
        raise PermanentError(
            f"the inventory of {synced.vm_key} has a NIC the converter cannot use: {error}",
            "re-run discovery; report it if vSphere really shows this MAC",
        ) from error


def check_work_root(work_root: Path) -> None:
    """A work root too long for the Unix sockets below it fails before anything is cloned."""
    if len(str(work_root)) > MAX_WORK_ROOT:
        raise PermanentError(
            f"the conversion work folder {work_root} is longer than {MAX_WORK_ROOT} characters:"
            " nbdkit and libguestfs create Unix sockets below it, whose paths may not exceed 107 bytes",
            "set the conversion host's work_dir to a shorter path",
        )


def guest_spec(synced: VmSynced, disks: Sequence[DiskVolume], paths: Sequence[Path]) -> GuestSpec:
    """The converter's view of the VM: every disk (in disk order, as attached devices), NICs, firmware."""
    vm = synced.vm
    guest = vm.guest_id.lower()
    return GuestSpec(
        name=vm.identity.name,
        disks=tuple(
            SourceDisk(path, "raw", identity=disk.volume_id) for disk, path in zip(disks, paths, strict=True)
        ),
        nics=_nics(synced),
        firmware=Firmware.UEFI if vm.firmware == "efi" else Firmware.BIOS,
        memory_mib=vm.memory_mib,
        vcpus=vm.cpus,
        os_hint="windows" if guest.startswith("win") else ("linux" if guest else None),
    )


def guest_inspection(inspection: Inspection) -> GuestInspection:
    """The event's inspection from the converter's."""
    return GuestInspection(
        os_type=inspection.os_type,
        distro=inspection.distribution,
        version=f"{inspection.major_version}.{inspection.minor_version}",
        product_name=inspection.product_name,
        firmware="efi" if inspection.firmware is Firmware.UEFI else "bios",
        root_device=inspection.root_device,
    )


# ---------------------------------------------------------------------------------------------------------
# Failures


def failure_cause(error: ConversionError, log_ref: str | None, headline: str = "") -> str:
    """The tool's message and decisive lines (each once), where the full log is; within the event's
    limit. ``headline`` goes first (e.g. what was being done when it failed)."""
    message = error.args[0] if error.args else str(error)
    if log_ref:
        where = f"full log: {log_ref}"
    elif error.log_path is not None:
        where = f"full log on the conversion host: {error.log_path}"
    else:
        where = "no tool ran"
    lines = [line[:_MAX_LINE] for line in error.decisive_lines if line[:_MAX_LINE] not in message]
    cause = "\n".join([*([headline] if headline else []), str(message), *lines, where])
    if len(cause) > _MAX_CAUSE:
        keep = _MAX_CAUSE - len(where) - 5
        cause = cause[:keep] + " ...\n" + where
    return cause


def conversion_failure(error: ConversionError, log_ref: str | None, in_place: bool) -> FerryError:
    """The runner's error for a failed conversion: the tool's decisive lines, the hint, the log."""
    cause = failure_cause(error, log_ref)
    fix = error.hint or "see the decisive lines and the full log of the run"
    if not in_place:
        fix += "; the replica volumes are untouched, a retry converts fresh clones"
    if error.retryable:
        return RetryableError(cause, fix)
    return PermanentError(cause, fix)


# ---------------------------------------------------------------------------------------------------------
# Attempts, their work folders and logs


def new_attempt() -> str:
    """A readable, unique id of one attempt (names its logs, work folder and volume marks)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def work_dir(work_root: Path, attempt: str) -> Path:
    """The attempt's folder: short on purpose, nbdkit and libguestfs put Unix sockets below it."""
    return work_root / attempt.rsplit("-", 1)[-1]


def combine_logs(logs: Path, target: Path) -> bool:
    """Concatenate the tool logs of one attempt (in the order they ran) into ``target``."""
    files = sorted(logs.glob("*.log"), key=lambda path: path.stat().st_mtime) if logs.is_dir() else []
    if not files:
        return False
    with target.open("wb") as out:
        for path in files:
            out.write(f"===== {path.name} ({path.stat().st_size} bytes) =====\n".encode())
            with path.open("rb") as source:
                shutil.copyfileobj(source, out)
            out.write(b"\n")
    return True


async def store_logs(bus: BusHandle, work: Path, combined: str, name: str) -> str | None:
    """Keep every tool log of the attempt in the object store as one file (``name`` there, ``combined``
    in ``work``); its reference, or None when there is nothing to store or the store failed (the files
    then stay on the host)."""
    target = work / combined
    if not await asyncio.to_thread(combine_logs, work / "logs", target):
        return None
    try:
        return await bus.store_log(name, target)
    except Exception:
        log.exception("could not store the tool log %s; it stays on this host", target)
        return None


async def clean_work(work: Path, log_ref: str | None, keep: bool = False) -> None:
    """Remove the attempt's folder once its logs are safe (it holds scratch files and logs only)."""
    if log_ref is not None and not keep:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)


async def release_quietly(adapter: OpenStackAdapter, server_id: str, volume_ids: Sequence[str]) -> None:
    """Detach after a failure without hiding it (the next attempt detaches leftovers anyway)."""
    for volume_id in volume_ids:
        try:
            await clones.release(adapter, server_id, volume_id)
        except Exception:
            log.exception("could not detach %s from the conversion host after a failure", volume_id)


# ---------------------------------------------------------------------------------------------------------
# Progress in the VM's state, and the blocking converter on a worker thread


def with_progress(vm_key: str, request_id: str, progress: StepProgress, step: str = "convert") -> Mutation:
    """A pure state mutation that records a step's progress (an older report changes nothing)."""

    def mutate(state: VmState | None) -> VmState | None:
        state = state or VmState(key=vm_key, request_id=request_id)
        current = state.progress.get(step)
        if current is not None and current.at and progress.at and current.at > progress.at:
            return state
        return msgspec.structs.replace(state, progress={**state.progress, step: progress})

    return mutate


@dataclass
class ProgressReporter:
    """Turns progress reports into VmState.progress[step], written at most every ``every`` s."""

    bus: BusHandle
    vm_key: str
    request_id: str
    every: float
    step: str = "convert"
    pending: StepProgress | None = None
    written_at: float = field(default=-1e9)

    def offer(self, percent: float, detail: str) -> None:
        """Remember the newest report (called on the event loop)."""
        self.pending = StepProgress(
            percent=round(min(max(percent, 0.0), 100.0), 1), detail=detail[:200], at=datetime.now(UTC)
        )

    async def report(self, percent: float, detail: str, force: bool = False) -> None:
        """Offer and write (if due, or at once with ``force``)."""
        self.offer(percent, detail)
        await self.flush(force)

    async def flush(self, force: bool = False) -> None:
        """Write the newest report if one is pending and the last write is old enough."""
        if self.pending is None or (not force and time.monotonic() - self.written_at < self.every):
            return
        progress, self.pending = self.pending, None
        self.written_at = time.monotonic()
        mutation = with_progress(self.vm_key, self.request_id, progress, self.step)
        try:
            await self.bus.state.update(self.vm_key, mutation)
        except Exception:  # progress is informative: never fail a conversion over it
            log.warning("could not record %s progress of %s", self.step, self.vm_key, exc_info=True)


@dataclass(frozen=True)
class Heartbeats:
    """How the handler keeps the message alive and the progress current while a tool runs."""

    context: StepContext
    progress: ProgressReporter
    heartbeat_every: float
    #: the share of the progress bar the tool's own reports fill
    span: tuple[float, float] = (5.0, 95.0)


async def run_blocking(job: BlockingJob[T], beats: Heartbeats) -> T:
    """Run ``job`` on a worker thread; heartbeat and write its progress meanwhile. Leaving early (a
    cancelled task) sets the job's cancel event: the tool's whole process group is stopped."""
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    start, end = beats.span

    def on_progress(report: Progress) -> None:  # on the worker thread
        percent = start + (end - start) * report.fraction
        loop.call_soon_threadsafe(beats.progress.offer, percent, f"{report.stage}: {report.message}")

    work = asyncio.ensure_future(asyncio.to_thread(job, on_progress, cancel))
    tick = max(min(1.0, beats.progress.every / 2), 0.05)
    next_beat = time.monotonic() + beats.heartbeat_every
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=tick)
            await beats.progress.flush()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + beats.heartbeat_every
                with contextlib.suppress(Exception):  # the runner's own heartbeats go on regardless
                    await beats.context.heartbeat()
    except BaseException:
        cancel.set()
        raise
    return work.result()


class RunLedger:
    """The converter's ledger for one call: the durable record is the volumes' metadata, checked
    before the converter runs, so here nothing is known converted and the record is only kept."""

    def __init__(self) -> None:
        self.records: list[ConvertedRecord] = []

    def get(self, key: str) -> ConvertedRecord | None:
        """Nothing converted (the handler checked the volumes' marks)."""
        return None

    def put(self, record: ConvertedRecord) -> None:
        """Keep the record of this run."""
        self.records.append(record)
