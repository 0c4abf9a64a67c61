"""The pre-flight inspection convert runs on the first pass of a warm migration: virt-v2v-inspector on
Cinder clones of the pass-1 replicas while the source VM still runs, so what would stop the conversion
(no root device, LUKS, a filesystem libguestfs cannot read, ...) is reported before cutover.

The next copy pass attaches, writes and detaches the replicas meanwhile, so the clones (role
``inspection``, found by identity) are made only from replicas at rest, and a replica in use or one
that changed while it was cloned skips the inspection (noted in the VM's state: the conversion at
cutover inspects anyway). The clones are always detached and deleted afterwards; leftovers of an
earlier attempt go first. A blocking finding fails the migration (PermanentError), appliance trouble
is retried; once vmferry has powered the source off for cutover, the conversion decides and the
inspection fails nothing. Success emits nothing: ``VmState.progress["inspect"]`` records
"<distro> <version>, root <device>", and a redelivery that finds it there does not inspect again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vmferry.adapters.conversion import (
    BlockDriver,
    ConversionError,
    ConversionOptions,
    Converter,
    HostConfig,
    Inspection,
)
from vmferry.adapters.openstack import clones, compute
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.clones import INSPECTION_ROLE, DiskVolume
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.bus.function import StepContext
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
    failure_cause,
    guest_spec,
    new_attempt,
    production_root,
    run_blocking,
    store_logs,
    work_dir,
)
from vmferry.schemas.events import VmSynced
from vmferry.schemas.state import StepProgress, VmState

log = logging.getLogger(__name__)

#: the key of the inspection's progress (and result) in VmState.progress
STEP = "inspect"
# Share of the progress bar outside the inspector's own reports.
_START, _END = 5.0, 95.0


def wants_inspection(synced: VmSynced) -> bool:
    """The first pass of a warm migration that will be converted, unless the request opts out."""
    options = synced.plan.options
    return (
        not synced.final
        and synced.pass_no == 1
        and synced.plan.mode == "warm"
        and options.conversion != "skip"
        and options.inspect_before_cutover
    )


def recorded_inspection(state: VmState | None, since: datetime) -> StepProgress | None:
    """The successful inspection recorded after ``since`` (the event's time), or None. Only a record
    newer than the event counts: one of an earlier request of the same VM is older."""
    found = state.progress.get(STEP) if state is not None else None
    if found is None or found.percent < 100.0 or found.at is None or found.at < since:
        return None
    return found


def cutover_began(state: VmState | None, since: datetime) -> bool:
    """vmferry powered the source off for cutover after ``since`` (and has not powered it on again)."""
    power = state.source_power if state is not None else None
    return power is not None and power.restored_at is None and power.powered_off_at >= since


def inspected(inspection: Inspection) -> str:
    """The record of a successful inspection: "<distro> <version>, root <device>"."""
    name = inspection.distribution or inspection.os_type or "unknown OS"
    version = f"{inspection.major_version}.{inspection.minor_version}"
    return f"{name} {version}, root {inspection.root_device}"


def inspection_failure(synced: VmSynced, error: ConversionError, log_ref: str | None) -> FerryError:
    """The runner's error for an inspection that failed: a finding that blocks conversion (permanent),
    or trouble with the tool or its appliance (retried)."""
    name = f"{synced.vm.identity.name} ({synced.vm_key})"
    hint = error.hint or "see the decisive lines and the full log of the run"
    if error.retryable:
        headline = f"pre-flight inspection of {name} before cutover could not finish ({error.kind.value}):"
        return RetryableError(failure_cause(error, log_ref, headline), hint)
    headline = (
        f"pre-flight inspection of {name} found BEFORE cutover, while the source VM still runs, that its"
        f" conversion would fail ({error.kind.value}):"
    )
    fix = (
        f"{hint}. Nothing was changed: the source VM runs on and the replica volumes are untouched."
        " Fix this before cutover (a replay inspects the replicas again)"
    )
    return PermanentError(failure_cause(error, log_ref, headline), fix)


@dataclass(frozen=True)
class _Job:
    """One inspection attempt of one VM."""

    synced: VmSynced
    context: StepContext
    adapter: OpenStackAdapter
    server_id: str
    attempt: str
    progress: ProgressReporter

    async def remove_clones(self) -> list[str]:
        """Detach and delete the VM's inspection clones (found by identity, whoever made them)."""
        disk_keys = [volume.disk_key for volume in self.synced.volumes]
        return await clones.remove_clones(
            self.adapter, self.synced.vm_key, disk_keys, self.server_id, INSPECTION_ROLE
        )

    async def remove_clones_quietly(self) -> None:
        """Best effort after a failure: what stays is removed by the next attempt or by teardown."""
        try:
            await self.remove_clones()
        except Exception:
            log.exception("could not remove the inspection clones of %s", self.synced.vm_key)


@dataclass(frozen=True)
class Inspector:
    """The pre-flight inspection; convert builds it with its own settings."""

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

    async def __call__(self, event: CloudEvent[VmSynced], context: StepContext) -> None:
        """Inspect the guest on clones of the replicas; raise what blocks its conversion."""
        synced = event.data
        state, _ = await self.bus.state.get(synced.vm_key)
        if (found := recorded_inspection(state, event.time)) is not None:
            log.info("%s was inspected before cutover already (%s)", synced.vm_key, found.detail)
            return
        if cutover_began(state, event.time):
            log.info("%s: cutover began before the inspection; the conversion inspects", synced.vm_key)
            return
        check_guest_facts(synced)
        check_work_root(self.work_root)
        job = _Job(
            synced,
            context,
            await self.adapters(synced.plan.destination),
            self.conversion_host(synced.plan),
            new_attempt(),
            ProgressReporter(self.bus, synced.vm_key, synced.request_id, self.progress_every, STEP),
        )
        try:
            await self._attempt(job)
        except FerryError as error:
            if not await self._cutover_began(event):
                raise
            log.warning(
                "%s: the inspection before cutover failed, but cutover began meanwhile and the"
                " conversion decides: %s",
                synced.vm_key,
                error,
            )
            await job.progress.report(0.0, f"failed after cutover began: {error.cause}", force=True)

    async def _attempt(self, job: _Job) -> None:
        """Leftovers out, inspect, clones out (always), the result into the VM's state."""
        removed = await job.remove_clones()
        if removed:
            log.info("removed %d inspection clone(s) of an earlier attempt: %s", len(removed), removed)
        try:
            percent, detail = await self._inspect(job)
        except BaseException:
            # Shielded: a second cancellation (shutdown) must not stop the clean-up half-way.
            await asyncio.shield(job.remove_clones_quietly())
            raise
        await job.remove_clones()  # before the record: a failure here is retried, which cleans up
        await job.progress.report(percent, detail, force=True)

    async def _inspect(self, job: _Job) -> tuple[float, str]:
        """Clone the replicas at rest, attach the clones and inspect: the (percent, detail) to record."""
        synced = job.synced
        before = await clones.replica_states(job.adapter, synced.volumes)
        reasons = [s.busy_because(synced.request_id, synced.pass_no) for s in before]
        busy = next((why for why in reasons if why is not None), None)
        if busy is not None:
            return self._skipped(synced, busy)
        await job.progress.report(0.0, f"cloning {len(synced.volumes)} replica volume(s)", force=True)
        disks = await clones.create_clones(
            job.adapter,
            synced.vm_key,
            synced.volumes,
            synced.pass_no,
            job.attempt,
            self.clone_timeout,
            role=INSPECTION_ROLE,
        )
        if await clones.replica_states(job.adapter, synced.volumes) != before:
            return self._skipped(synced, "a replica was attached or re-synced while it was cloned")
        await job.progress.report(_START / 2, f"attaching {len(disks)} clone(s) to the conversion host")
        root = self.device_root(job.server_id)
        paths = [await compute.attach(job.adapter, job.server_id, d.volume_id, root) for d in disks]
        inspection, log_ref = await self._preflight(job, disks, paths)
        log.info("%s inspected before cutover: %s; log: %s", synced.vm_key, inspected(inspection), log_ref)
        return 100.0, inspected(inspection)

    @staticmethod
    def _skipped(synced: VmSynced, why: str) -> tuple[float, str]:
        log.warning("%s: no inspection before cutover: %s", synced.vm_key, why)
        return 0.0, f"skipped: {why}; the conversion at cutover inspects the guest"

    async def _preflight(
        self, job: _Job, disks: list[DiskVolume], paths: list[Path]
    ) -> tuple[Inspection, str | None]:
        """Run virt-v2v-inspector over all disks at once; store its log; map its failures."""
        synced = job.synced
        work = work_dir(self.work_root, job.attempt)
        guest = guest_spec(synced, disks, paths)
        options = ConversionOptions(
            work_dir=work,
            block_driver=BlockDriver(synced.plan.options.disk_bus),
            in_place=True,  # the inspector writes overlays only; the clones are not written either
            timeout_s=self.timeout_s,
        )
        converter = Converter(self.host, RunLedger())
        beats = Heartbeats(job.context, job.progress, self.heartbeat_every, (_START, _END))
        try:
            found, _run = await run_blocking(
                lambda on_progress, cancel: converter.preflight(guest, options, on_progress, cancel), beats
            )
        except ConversionError as error:
            log_ref = await self._store_log(work, job)
            await clean_work(work, log_ref, self.keep_work_dirs)
            raise inspection_failure(synced, error, log_ref) from error
        except ValueError as error:  # options the converter refuses: a configuration mistake
            raise PermanentError(
                f"pre-flight inspection of {synced.vm_key} refused: {error}", "fix the request"
            ) from error
        except Exception:
            log_ref = await self._store_log(work, job)
            log.exception("inspection of %s failed unexpectedly; logs: %s", synced.vm_key, log_ref or work)
            raise
        await job.progress.report(_END + 2, "storing the inspector's log")
        log_ref = await self._store_log(work, job)
        await clean_work(work, log_ref, self.keep_work_dirs)
        return found, log_ref

    async def _store_log(self, work: Path, job: _Job) -> str | None:
        name = f"{job.synced.vm_key}/inspect-{job.attempt}.log"
        return await store_logs(self.bus, work, "inspection.log", name)

    async def _cutover_began(self, event: CloudEvent[VmSynced]) -> bool:
        try:
            state, _ = await self.bus.state.get(event.data.vm_key)
        except Exception:  # cannot tell: report the failure as it is
            log.warning("could not read the state of %s", event.data.vm_key, exc_info=True)
            return False
        return cutover_began(state, event.time)
