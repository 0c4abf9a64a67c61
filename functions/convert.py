"""convert: makes a VM's synced disks boot on KVM with virt-v2v-in-place and emits ``conversion.done``.

It consumes ``vm.synced`` and converts on the final pass. ``plan.options.conversion`` decides how:

* ``clone`` (default): every replica is cloned in Cinder, the clones are attached to the conversion
  host and converted there, all disks at once; the replicas are never written, so a failed attempt
  is retried on fresh clones without copying anything from the source again.
* ``in-place``: the replica volumes themselves are converted.
* ``skip``: nothing is converted; the replicas go on to launch as they are.

Converted volumes are marked in their metadata (with the inspection and the log reference), so a
redelivery emits ``conversion.done`` again without running virt-v2v a second time. The full tool logs
of every attempt go to the object store; the converter's progress goes to the VM's state.

On the first pass of a warm migration (the source still runs) it inspects the guest instead, on
throw-away clones, so what would stop the conversion is reported before cutover (``inspection``);
it emits nothing then, other precopy passes it ignores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmferry.adapters.conversion import (
    BlockDriver,
    ConversionError,
    ConversionOptions,
    ConversionResult,
    Converter,
    FailureKind,
    GuestSpec,
    HostConfig,
)
from vmferry.adapters.openstack import clones, compute
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.clones import ConversionState, ConvertedMark, DiskVolume
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Emit, FunctionDef, RetryPolicy, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.functions.convert_support import (
    AdapterFactory,
    ConversionHost,
    DeviceRoot,
    Heartbeats,
    ProgressReporter,
    RunLedger,
    check_guest_facts,
    check_work_root,
    clean_work,
    conversion_failure,
    guest_inspection,
    guest_spec,
    new_attempt,
    production_root,
    release_quietly,
    run_blocking,
    store_logs,
    work_dir,
)
from vmferry.functions.guards import is_cancelled
from vmferry.functions.inspection import Inspector, cutover_began, wants_inspection
from vmferry.functions.settle import cutover_if_due
from vmferry.schemas.events import ConversionDone, CutoverRequested, GuestInspection, VmSynced

log = logging.getLogger(__name__)

STEP = "convert"

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
# Share of the progress bar outside the converter's own reports.
_CONVERT_START, _CONVERT_END = 5.0, 95.0


@dataclass(frozen=True)
class Convert:
    """The handler; dependencies are injected by whoever builds the registry."""

    adapters: AdapterFactory
    bus: BusHandle
    host: HostConfig
    #: per-attempt working folders (scratch, tool logs) go below this, on the conversion host
    work_root: Path
    conversion_host: ConversionHost
    device_root: DeviceRoot = production_root
    timeout_s: float = 4 * 3600.0
    clone_timeout: float = clones.CLONE_TIMEOUT
    progress_every: float = 2.0
    heartbeat_every: float = 15.0
    keep_work_dirs: bool = False

    async def __call__(self, event: CloudEvent[VmSynced], context: StepContext) -> Sequence[Emit]:
        """Convert the final pass's volumes (or find them converted) and emit conversion.done; inspect
        the guest on the first pass of a warm migration."""
        synced = event.data
        if not synced.final:
            if wants_inspection(synced) and not await self._cancelled(synced):
                await self.inspector()(event, context)
                return await self._cutover_after_inspection(event)
            return []
        if await self._cancelled(synced):
            return []
        mode = synced.plan.options.conversion
        if mode == "skip":
            return [done_event(synced, [v.volume_id for v in synced.volumes], GuestInspection(), None)]
        check_guest_facts(synced)
        check_work_root(self.work_root)
        adapter = await self.adapters(synced.plan.destination)
        server_id = self.conversion_host(synced.plan)
        progress = ProgressReporter(self.bus, synced.vm_key, synced.request_id, self.progress_every)
        attempt = new_attempt()
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
            await release_quietly(adapter, server_id, [d.volume_id for d in disks])
            raise
        for disk in disks:
            await clones.set_mark(adapter, disk.volume_id, mark)
        for disk in disks:
            await clones.release(adapter, server_id, disk.volume_id)
        await progress.report(100.0, "converted", force=True)
        return [done_event(synced, [d.volume_id for d in disks], mark.inspection, mark.log_ref)]

    async def _cutover_after_inspection(self, event: CloudEvent[VmSynced]) -> list[Emit]:
        """The inspection raised nothing: the cutover policy applies now (settle left it to us),
        unless a cutover began meanwhile (an operator's)."""
        synced = event.data
        state, _ = await self.bus.state.get(synced.vm_key)
        if cutover_began(state, event.time):
            return []
        return cutover_if_due(synced.request_id, synced.vm_key, synced.plan, False, datetime.now(UTC))

    def inspector(self) -> Inspector:
        """The pre-flight inspection, on the same conversion host and settings."""
        return Inspector(
            adapters=self.adapters,
            bus=self.bus,
            host=self.host,
            work_root=self.work_root,
            conversion_host=self.conversion_host,
            device_root=self.device_root,
            timeout_s=self.timeout_s,
            clone_timeout=self.clone_timeout,
            progress_every=self.progress_every,
            heartbeat_every=self.heartbeat_every,
            keep_work_dirs=self.keep_work_dirs,
        )

    async def _cancelled(self, synced: VmSynced) -> bool:
        return await is_cancelled(self.bus, synced.vm_key, synced.request_id, STEP)

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
        work = work_dir(self.work_root, attempt)
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
        converter = Converter(self.host, RunLedger())
        beats = Heartbeats(context, progress, self.heartbeat_every, (_CONVERT_START, _CONVERT_END))
        return await run_blocking(
            lambda on_progress, cancel: converter.convert(guest, options, on_progress, cancel), beats
        )

    async def _store_logs(self, work: Path, vm_key: str, attempt: str) -> str | None:
        """Keep every tool log of the attempt in the object store as one file (None: not stored)."""
        return await store_logs(self.bus, work, "conversion.log", f"{vm_key}/convert-{attempt}.log")

    async def _clean(self, work: Path, log_ref: str | None) -> None:
        """Remove the attempt's folder once its logs are safe."""
        await clean_work(work, log_ref, self.keep_work_dirs)


def definition(handler: Convert, concurrency: int | None = None) -> FunctionDef[VmSynced]:
    """How the runner hosts convert: one libguestfs appliance (2 vCPUs, 2.5 GiB) per conversion, so few
    at a time; the handler heartbeats while virt-v2v runs for minutes."""
    return FunctionDef(
        name=STEP,
        consumes=VmSynced,
        emits=(ConversionDone, CutoverRequested),
        handler=handler,
        concurrency=concurrency or 2,
        ack_wait=60.0,
        heartbeat_every=15.0,
        max_deliver=4,
        retry=RetryPolicy(delays=(30.0, 120.0, 600.0)),
        description="converts the VM's synced disks (Cinder clones by default) to boot on KVM with virt-v2v;"
        " on a warm migration's first pass it inspects the guest before cutover",
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
