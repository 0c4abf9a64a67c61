"""convert: makes a VM's synced disks boot on KVM with virt-v2v-in-place and emits ``conversion.done``.

It consumes ``vm.synced`` and acts on the final pass only. ``plan.options.conversion`` decides how:

* ``clone`` (default): every replica is cloned in Cinder, the clones are attached to the conversion
  host and converted there, all disks at once; the replicas are never written, so a failed attempt
  is retried on fresh clones without copying anything from the source again.
* ``in-place``: the replica volumes themselves are converted.
* ``skip``: nothing is converted; the replicas go on to launch as they are.

Converted volumes are marked in their metadata (with the inspection and the log reference), so a
redelivery emits ``conversion.done`` again without running virt-v2v a second time. The full tool logs
of every attempt go to the object store; the converter's progress goes to the VM's state.
"""

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

import msgspec

from vmferry.adapters.conversion import (
    BlockDriver,
    ConversionError,
    ConversionOptions,
    ConversionResult,
    ConvertedRecord,
    Converter,
    FailureKind,
    Firmware,
    GuestSpec,
    HostConfig,
    Inspection,
    Progress,
    SourceDisk,
    SourceNic,
)
from vmferry.adapters.openstack import clones, compute
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.clones import ConversionState, ConvertedMark, DiskVolume
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.bus.function import Emit, FunctionDef, RetryPolicy, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.bus.state import Mutation
from vmferry.functions.guards import is_cancelled
from vmferry.schemas.events import ConversionDone, GuestInspection, VmSynced
from vmferry.schemas.request import DestinationRef, MigrationPlan
from vmferry.schemas.state import StepProgress, VmState

log = logging.getLogger(__name__)

STEP = "convert"
#: an adapter for a configured destination (clouds.yaml entry, project, region)
AdapterFactory = Callable[[DestinationRef], Awaitable[OpenStackAdapter]]
#: the server id of the conversion host (the machine this process runs on) for a plan's destination
ConversionHost = Callable[[MigrationPlan], str]
#: where the conversion host's /dev is seen from this process: "/" in production
DeviceRoot = Callable[[str], Path]

#: failures that stop virt-v2v before it writes to the guest: an in-place replica is still intact
#: (not APPLIANCE_FAILED: it also covers a qemu killed part-way through the conversion)
_NOTHING_WRITTEN = frozenset(
    {
        FailureKind.NO_ROOT_DEVICE,
        FailureKind.ENCRYPTED_DISK,
        FailureKind.UNSUPPORTED_FILESYSTEM,
        FailureKind.MULTI_BOOT,
        FailureKind.MISSING_VIRTIO_WIN,
        FailureKind.MISSING_WINDOWS_FIRSTBOOT_TOOL,
        FailureKind.UNSUPPORTED_BLOCK_DRIVER,
        FailureKind.TOOL_MISSING,
    }
)
#: longer roots push the sockets nbdkit/libguestfs make in <root>/<attempt>/scratch/v2v.XXXXXX/ past
#: the 107-byte limit of Unix socket paths ("nbdkit: -U: path too long")
MAX_WORK_ROOT = 64
_MAX_CAUSE = 3800  # migration.failed's cause holds 4096 characters
_MAX_LINE = 300
# Share of the progress bar outside the converter's own reports.
_CONVERT_START, _CONVERT_END = 5.0, 95.0


def _production_root(_server_id: str) -> Path:
    return Path("/")


@dataclass(frozen=True)
class Convert:
    """The handler; dependencies are injected by whoever builds the registry."""

    adapters: AdapterFactory
    bus: BusHandle
    host: HostConfig
    #: per-attempt working folders (scratch, tool logs) go below this, on the conversion host
    work_root: Path
    conversion_host: ConversionHost
    device_root: DeviceRoot = _production_root
    timeout_s: float = 4 * 3600.0
    clone_timeout: float = clones.CLONE_TIMEOUT
    progress_every: float = 2.0
    heartbeat_every: float = 15.0
    keep_work_dirs: bool = False

    async def __call__(self, event: CloudEvent[VmSynced], context: StepContext) -> Sequence[Emit]:
        """Convert the final pass's volumes (or find them converted) and emit conversion.done."""
        synced = event.data
        if not synced.final or await is_cancelled(self.bus, synced.vm_key, synced.request_id, "convert"):
            return []
        mode = synced.plan.options.conversion
        if mode == "skip":
            return [done_event(synced, [v.volume_id for v in synced.volumes], GuestInspection(), None)]
        _check_guest_facts(synced)
        self._check_work_root()
        adapter = await self.adapters(synced.plan.destination)
        server_id = self.conversion_host(synced.plan)
        progress = ProgressReporter(self.bus, synced.vm_key, synced.request_id, self.progress_every)
        attempt = _new_attempt()
        if mode == "clone":
            disks = await self._clones(adapter, synced, server_id, attempt, progress)
        else:
            disks = await self._replicas(adapter, synced, attempt)
        if disks and disks[0].mark is not None:
            return await self._already_converted(adapter, synced, server_id, disks, progress)
        await progress.report(_CONVERT_START / 2, f"attaching {len(disks)} volume(s) to the conversion host")
        root = self.device_root(server_id)
        try:
            paths = [await compute.attach(adapter, server_id, d.volume_id, root) for d in disks]
            mark = await self._convert(adapter, synced, disks, paths, attempt, context, progress)
        except Exception:  # a cancelled task (shutdown) leaves this to the next attempt
            await _release_quietly(adapter, server_id, disks)
            raise
        for disk in disks:
            await clones.set_mark(adapter, disk.volume_id, mark)
        for disk in disks:
            await clones.release(adapter, server_id, disk.volume_id)
        await progress.report(100.0, "converted", force=True)
        return [done_event(synced, [d.volume_id for d in disks], mark.inspection, mark.log_ref)]

    def _check_work_root(self) -> None:
        if len(str(self.work_root)) > MAX_WORK_ROOT:
            raise PermanentError(
                f"the conversion work folder {self.work_root} is longer than {MAX_WORK_ROOT} characters:"
                " nbdkit and libguestfs create Unix sockets below it, whose paths may not exceed 107 bytes",
                "set the conversion host's work_dir to a shorter path",
            )

    async def _clones(
        self,
        adapter: OpenStackAdapter,
        synced: VmSynced,
        server_id: str,
        attempt: str,
        progress: ProgressReporter,
    ) -> list[DiskVolume]:
        """The converted clones, or fresh clones of the replicas (leftovers of failed attempts removed)."""
        converted, leftovers = await clones.converted_clones(
            adapter, synced.vm_key, synced.volumes, synced.pass_no
        )
        if converted is not None:
            return converted
        await progress.report(0.0, f"cloning {len(synced.volumes)} replica volume(s)", force=True)
        for volume in leftovers:
            await clones.remove_clone(adapter, volume, server_id)
        return await clones.create_clones(
            adapter, synced.vm_key, synced.volumes, synced.pass_no, attempt, self.clone_timeout
        )

    async def _replicas(self, adapter: OpenStackAdapter, synced: VmSynced, attempt: str) -> list[DiskVolume]:
        """In-place mode: the replicas (found converted, or refused when an earlier run stopped part-way)."""
        disks = await clones.read_volumes(adapter, synced.volumes)
        converted = await clones.complete_marks(adapter, synced.vm_key, disks)
        if converted is not None:
            return converted
        started = [d.volume_id for d in disks if d.state == ConversionState.RUNNING]
        if started:
            raise PermanentError(
                f"an earlier in-place conversion of {synced.vm_key} stopped part-way on {', '.join(started)};"
                " the guest on these replicas may be partly converted, and virt-v2v must not run twice",
                "re-sync the disks from the source (a new final pass) and clear the vmferry_conversion"
                " metadata of the replicas, or use conversion 'clone'",
            )
        return disks

    async def _already_converted(
        self,
        adapter: OpenStackAdapter,
        synced: VmSynced,
        server_id: str,
        disks: Sequence[DiskVolume],
        progress: ProgressReporter,
    ) -> list[Emit]:
        """A redelivery after success: detach what is still attached and report the recorded result."""
        mark = disks[0].mark
        assert mark is not None  # noqa: S101 -- the caller checked
        for disk in disks:
            await clones.release(adapter, server_id, disk.volume_id)
        await progress.report(100.0, "converted (found converted before)", force=True)
        return [done_event(synced, [d.volume_id for d in disks], mark.inspection, mark.log_ref)]

    async def _convert(
        self,
        adapter: OpenStackAdapter,
        synced: VmSynced,
        disks: Sequence[DiskVolume],
        paths: Sequence[Path],
        attempt: str,
        context: StepContext,
        progress: ProgressReporter,
    ) -> ConvertedMark:
        """Run the converter over all disks at once; store its logs; map its failures."""
        # Short on purpose: nbdkit and libguestfs put Unix sockets in the scratch folder below it.
        work = self.work_root / attempt.rsplit("-", 1)[-1]
        guest = guest_spec(synced, disks, paths)
        options = ConversionOptions(
            work_dir=work,
            block_driver=BlockDriver(synced.plan.options.disk_bus),
            in_place=True,  # on the clones (the clone is the copy) or, in in-place mode, on the replicas
            timeout_s=self.timeout_s,
        )
        in_place = synced.plan.options.conversion == "in-place"
        if in_place:  # from here until the mark, a stop may leave the replicas partly converted
            for disk in disks:
                await clones.set_state(adapter, disk.volume_id, ConversionState.RUNNING, attempt)
        try:
            result = await self._run(guest, options, context, progress)
        except ConversionError as error:
            log_ref = await self._store_logs(work, synced.vm_key, attempt)
            if in_place and error.kind in _NOTHING_WRITTEN:
                for disk in disks:
                    await clones.set_state(adapter, disk.volume_id, ConversionState.PENDING, attempt)
            await self._clean(work, log_ref)
            raise conversion_failure(error, log_ref, in_place) from error
        except ValueError as error:  # options the converter refuses: a configuration mistake
            raise PermanentError(
                f"conversion of {synced.vm_key} refused: {error}", "fix the request"
            ) from error
        except Exception:
            log_ref = await self._store_logs(work, synced.vm_key, attempt)
            log.exception("conversion of %s failed unexpectedly; logs: %s", synced.vm_key, log_ref or work)
            raise
        await progress.report(_CONVERT_END + 2, "storing the conversion logs")
        log_ref = await self._store_logs(work, synced.vm_key, attempt)
        await self._clean(work, log_ref)
        return ConvertedMark(attempt, guest_inspection(result.inspection), log_ref)

    async def _run(
        self,
        guest: GuestSpec,
        options: ConversionOptions,
        context: StepContext,
        progress: ProgressReporter,
    ) -> ConversionResult:
        """The blocking converter on a worker thread; heartbeats and progress writes meanwhile."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        converter = Converter(self.host, _ThisRunLedger())

        def on_progress(report: Progress) -> None:  # on the worker thread
            percent = _CONVERT_START + (_CONVERT_END - _CONVERT_START) * report.fraction
            loop.call_soon_threadsafe(progress.offer, percent, f"{report.stage}: {report.message}")

        work = asyncio.ensure_future(
            asyncio.to_thread(converter.convert, guest, options, on_progress, cancel)
        )
        tick = max(min(1.0, self.progress_every / 2), 0.05)
        next_beat = time.monotonic() + self.heartbeat_every
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=tick)
                await progress.flush()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_every
                    with contextlib.suppress(Exception):  # the runner's own heartbeats go on regardless
                        await context.heartbeat()
        except BaseException:
            cancel.set()  # the tool's whole process group is stopped; nothing is left running
            raise
        return work.result()

    async def _store_logs(self, work: Path, vm_key: str, attempt: str) -> str | None:
        """Keep every tool log of the attempt in the object store as one file; its reference, or None
        when there is nothing to store or the store failed (the files then stay on the host)."""
        combined = work / "conversion.log"
        if not await asyncio.to_thread(combine_logs, work / "logs", combined):
            return None
        try:
            return await self.bus.store_log(f"{vm_key}/convert-{attempt}.log", combined)
        except Exception:
            log.exception("could not store the conversion log %s; it stays on this host", combined)
            return None

    async def _clean(self, work: Path, log_ref: str | None) -> None:
        """Remove the attempt's folder once its logs are safe (it holds scratch files and logs only)."""
        if log_ref is not None and not self.keep_work_dirs:
            await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)


def definition(handler: Convert, concurrency: int | None = None) -> FunctionDef[VmSynced]:
    """How the runner hosts convert: one libguestfs appliance (2 vCPUs, 2.5 GiB) per conversion, so few
    at a time; the handler heartbeats while virt-v2v runs for minutes."""
    return FunctionDef(
        name=STEP,
        consumes=VmSynced,
        emits=(ConversionDone,),
        handler=handler,
        concurrency=concurrency or 2,
        ack_wait=60.0,
        heartbeat_every=15.0,
        max_deliver=4,
        retry=RetryPolicy(delays=(30.0, 120.0, 600.0)),
        description="converts the VM's synced disks (Cinder clones by default) to boot on KVM with virt-v2v",
    )


def done_event(
    synced: VmSynced, volume_ids: list[str], inspection: GuestInspection, log_ref: str | None
) -> Emit:
    """conversion.done for the VM of ``synced``."""
    done = ConversionDone(
        request_id=synced.request_id,
        vm_key=synced.vm_key,
        plan=synced.plan,
        vm=synced.vm,
        volume_ids=volume_ids,
        inspection=inspection,
        log_ref=log_ref,
    )
    return Emit(synced.vm_key, done)


def _nics(synced: VmSynced) -> tuple[SourceNic, ...]:
    return tuple(
        SourceNic(mac=nic.mac, model=nic.adapter_type or "vmxnet3", network=nic.network or "VM Network")
        for nic in synced.vm.nics
    )


def _check_guest_facts(synced: VmSynced) -> None:
    """Bad facts fail before anything is cloned."""
    try:
        _nics(synced)
    except ValueError as error:
        raise PermanentError(
            f"the inventory of {synced.vm_key} has a NIC the converter cannot use: {error}",
            "re-run discovery; report it if vSphere really shows this MAC",
        ) from error


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


def conversion_failure(error: ConversionError, log_ref: str | None, in_place: bool) -> FerryError:
    """The runner's error for a failed conversion: the tool's decisive lines, the hint, the log."""
    message = error.args[0] if error.args else str(error)
    if log_ref:
        where = f"full log: {log_ref}"
    elif error.log_path is not None:
        where = f"full log on the conversion host: {error.log_path}"
    else:
        where = "no tool ran"
    lines = [line[:_MAX_LINE] for line in error.decisive_lines if line[:_MAX_LINE] not in message]
    cause = "\n".join([str(message), *lines, where])
    if len(cause) > _MAX_CAUSE:
        keep = _MAX_CAUSE - len(where) - 5
        cause = cause[:keep] + " ...\n" + where
    fix = error.hint or "see the decisive lines and the full log of the run"
    if not in_place:
        fix += "; the replica volumes are untouched, a retry converts fresh clones"
    if error.retryable:
        return RetryableError(cause, fix)
    return PermanentError(cause, fix)


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


def _new_attempt() -> str:
    """A readable, unique id of one conversion attempt (names its logs, work folder and volume marks)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


async def _release_quietly(adapter: OpenStackAdapter, server_id: str, disks: Sequence[DiskVolume]) -> None:
    """Detach after a failure without hiding it (the next attempt detaches leftovers anyway)."""
    for disk in disks:
        try:
            await clones.release(adapter, server_id, disk.volume_id)
        except Exception:
            log.exception("could not detach %s from the conversion host after a failure", disk.volume_id)


class _ThisRunLedger:
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


def with_progress(vm_key: str, request_id: str, progress: StepProgress) -> Mutation:
    """A pure state mutation that records the conversion's progress (an older report changes nothing)."""

    def mutate(state: VmState | None) -> VmState | None:
        state = state or VmState(key=vm_key, request_id=request_id)
        current = state.progress.get(STEP)
        if current is not None and current.at and progress.at and current.at > progress.at:
            return state
        return msgspec.structs.replace(state, progress={**state.progress, STEP: progress})

    return mutate


@dataclass
class ProgressReporter:
    """Turns progress reports into VmState.progress["convert"], written at most every ``every`` s."""

    bus: BusHandle
    vm_key: str
    request_id: str
    every: float
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
        try:
            await self.bus.state.update(self.vm_key, with_progress(self.vm_key, self.request_id, progress))
        except Exception:  # progress is informative: never fail a conversion over it
            log.warning("could not record conversion progress of %s", self.vm_key, exc_info=True)
