"""transfer: copies one disk of a pass snapshot onto its Cinder volume and emits ``volume.synced``.

It consumes ``disk.snapshot.ready`` (one event per disk, so the disks of a VM copy in parallel). The
volume is found by identity (VM key + disk key) or created, and attached to the conversion host this
process runs on. The copy is a CBT pass (only the areas changed since the changeId recorded on the
volume) when the snapshot has a changeId, the volume has a recorded one and CBT is wanted; anything
else, including a CBT reset or a changeId vSphere no longer knows, is a full copy. The source is
served by nbdkit per ``plan.options.transport`` (see ``adapters.dataplane.snapshot_sources``) and
copied by the data plane's engine, with a checkpoint in the NATS KV bucket so a redelivered or
restarted transfer resumes, and progress in the VM's state.

Only once the data is durable and verified (CBT passes always; full copies when
``plan.options.verify_copies``) is the pass recorded on the volume (changeId, pass, request), the
checkpoint cleared and the volume detached. A redelivery finds the pass recorded and only emits
again; a failure records nothing and leaves the checkpoint in place, so the retry resumes (the
volume stays attached for a retry, and is detached after a permanent failure).

Transport ``https`` (the one the tests use against vcsim-ferry) reads the flat file of the disk the
snapshot froze from the datastore's ``/folder`` URL, logged in with the vSphere client's session
cookie (handed to nbdkit by descriptor, never in argv or logs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import msgspec

from vmferry.adapters.dataplane import (
    BlockDeviceDestination,
    CheckpointMismatchError,
    CopyEngine,
    Destination,
    DiskSource,
    FileDestination,
    NbdkitServer,
    Progress,
    TransferResult,
    VerificationError,
)
from vmferry.adapters.dataplane.engine import ProgressCallback
from vmferry.adapters.dataplane.snapshot_sources import (
    DatastoreFile,
    FrozenDisk,
    HttpsAccess,
    TransportSettings,
    VddkLogin,
    VddkSettings,
    colon_thumbprint,
    https_source,
    local_source,
    ssh_source,
    vddk_source,
)
from vmferry.adapters.openstack import compute, volumes
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.model import CHANGE_ID_KEY, PASS_KEY, REQUEST_KEY, VmSpec
from vmferry.adapters.vsphere import datastore
from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.snapshots import DiskState
from vmferry.bus.checkpoints import KvCheckpointSink, checkpoint_key
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.connection import Secret
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.bus.state import Mutation
from vmferry.functions.guards import is_cancelled
from vmferry.schemas.events import DiskSnapshotReady, VolumeSynced
from vmferry.schemas.request import DestinationRef, MigrationPlan
from vmferry.schemas.state import DiskProgress, VmState

log = logging.getLogger(__name__)

#: a connected vSphere client for a configured source name
ClientFactory = Callable[[str], Awaitable[AsyncVsphere]]
#: an adapter for a configured destination (clouds.yaml entry, project, region)
AdapterFactory = Callable[[DestinationRef], Awaitable[OpenStackAdapter]]
#: the server id of the conversion host (the machine this process runs on) for a plan's destination
ConversionHost = Callable[[MigrationPlan], str]
#: where the conversion host's /dev is seen from this process: "/" in production
DeviceRoot = Callable[[str], Path]
CopyKind = Literal["full", "cbt"]
#: an attached volume as this host sees it
LocalDestination = BlockDeviceDestination | FileDestination
#: phases in which a replica may be attached for conversion or boot: a stale redelivery keeps off
_LATER_PHASES = frozenset({"converting", "converted", "launched", "completed"})


def _production_root(_server_id: str) -> Path:
    return Path("/")


# ---------------------------------------------------------------------------------------------------------
# What the volume says about earlier passes, and what this pass copies


@dataclass(frozen=True)
class VolumeRecord:
    """The pass a volume holds, from its metadata (written only after a verified, durable copy)."""

    change_id: str | None
    pass_no: int
    request_id: str | None

    @classmethod
    def of(cls, metadata: Mapping[str, Any] | None) -> VolumeRecord:
        """Read the record; an unreadable pass number counts as none."""
        meta = metadata or {}
        text = str(meta.get(PASS_KEY) or "0")
        return cls(
            change_id=str(meta.get(CHANGE_ID_KEY) or "") or None,
            pass_no=int(text) if text.isdigit() else 0,
            request_id=str(meta.get(REQUEST_KEY) or "") or None,
        )

    def holds(self, ready: DiskSnapshotReady) -> bool:
        """The volume already holds exactly this pass (a redelivery after success)."""
        return (
            self.request_id == ready.request_id
            and self.pass_no == ready.pass_no
            and self.change_id == (ready.change_id or None)
        )

    def is_newer_than(self, ready: DiskSnapshotReady) -> bool:
        """The volume holds a later pass of the same request (the event is stale)."""
        return self.request_id == ready.request_id and self.pass_no > ready.pass_no


@dataclass(frozen=True)
class CopyPlan:
    """Full copy or CBT pass, the changed areas of a CBT pass, and why."""

    kind: CopyKind
    reason: str
    areas: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class _Target:
    """The destination of one disk pass: the volume, where it is attached, what it held before."""

    adapter: OpenStackAdapter
    server_id: str
    volume_id: str
    #: created by this delivery (so it reads as zeroes, if the backend says so)
    fresh: bool
    record: VolumeRecord


@dataclass(frozen=True)
class _Prepared:
    """The source side of one disk pass: the disk at the snapshot, the copy plan and the source."""

    at_snapshot: DiskState
    plan: CopyPlan
    source: DiskSource


def _job(key: str, volume_id: str, snapshot: str | None) -> str:
    """Ties a checkpoint to this pass, volume and snapshot: resuming onto anything else is wrong."""
    return f"{key}/{volume_id}/{snapshot or 'live'}"


def disk_progress(ready: DiskSnapshotReady, progress: DiskProgress) -> Mutation:
    """A pure state mutation setting one disk's progress (never over a later pass's)."""

    def mutate(state: VmState | None) -> VmState | None:
        state = state or VmState(key=ready.vm_key, request_id=ready.request_id)
        current = state.disks.get(str(ready.disk.key))
        if current is not None and current.pass_no > progress.pass_no:
            return state
        disks = dict(state.disks)
        disks[str(ready.disk.key)] = progress
        return msgspec.structs.replace(state, disks=disks)

    return mutate


class _ProgressWriter:
    """Writes copy progress into the VM's state, at most every ``interval`` seconds, never blocking
    the copy (a write still in flight makes the next report wait for the one after)."""

    def __init__(
        self,
        bus: BusHandle,
        ready: DiskSnapshotReady,
        volume_id: str,
        base_change_id: str | None,
        interval: float,
    ) -> None:
        self._bus = bus
        self._ready = ready
        self._volume_id = volume_id
        self._base_change_id = base_change_id
        self._interval = interval
        self._last = 0.0
        self._pending: asyncio.Task[None] | None = None

    def report(self, update: Progress) -> None:
        """The engine's progress callback (called on the event loop)."""
        if update.phase != "copy":
            return
        now = time.monotonic()
        if now - self._last < self._interval or (self._pending is not None and not self._pending.done()):
            return
        self._last = now
        progress = self._progress(update.done, update.total, update.rate, update.eta, self._base_change_id)
        self._pending = asyncio.ensure_future(self._write(progress))

    async def finish(self, result: TransferResult, change_id: str | None) -> None:
        """The final figures of the pass, with the changeId the volume now holds."""
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self._pending
        rate = result.bytes_total / result.seconds if result.seconds > 0 else 0.0
        await self._write(self._progress(result.bytes_total, result.bytes_total, rate, 0.0, change_id))

    def _progress(
        self, done: int, total: int, rate: float, eta: float | None, change_id: str | None
    ) -> DiskProgress:
        return DiskProgress(
            change_id=change_id,
            pass_no=self._ready.pass_no,
            bytes_done=done,
            bytes_total=total,
            rate_bps=round(rate, 1),
            eta_s=round(eta, 1) if eta is not None else None,
            volume_id=self._volume_id,
        )

    async def _write(self, progress: DiskProgress) -> None:
        try:
            await self._bus.state.update(self._ready.vm_key, disk_progress(self._ready, progress))
        except Exception as error:  # progress is informative: it must never fail the copy
            log.warning(
                "%s disk %d: progress not recorded: %s", self._ready.vm_key, self._ready.disk.key, error
            )


# ---------------------------------------------------------------------------------------------------------
# The handler


@dataclass(frozen=True)
class Transfer:
    """The handler; dependencies are injected by whoever builds the registry."""

    clients: ClientFactory
    adapters: AdapterFactory
    bus: BusHandle
    conversion_host: ConversionHost
    #: per configured source name: VDDK and SSH settings, extra nbdkit filters
    transports: Mapping[str, TransportSettings] = field(default_factory=dict)
    device_root: DeviceRoot = _production_root
    engine: CopyEngine = field(default_factory=CopyEngine)
    #: a volume this pass created reads as zeroes (true for thin, unencrypted Cinder backends), so a
    #: full copy skips the source's holes instead of writing zeroes over them
    new_volumes_read_as_zero: bool = True
    #: parent folder of nbdkit's private socket folders (None: the system's temporary folder)
    nbdkit_folder: Path | None = None
    progress_every: float = 2.0
    heartbeat_every: float = 10.0

    async def __call__(self, event: CloudEvent[DiskSnapshotReady], context: StepContext) -> Sequence[Emit]:
        """Find or create the volume, copy the pass onto it (or find it copied), emit volume.synced."""
        ready = event.data
        if await is_cancelled(self.bus, ready.vm_key, ready.request_id, "transfer"):
            return []
        spec = VmSpec.of_inventory(ready.vm_key, ready.vm)
        if ready.disk.key not in {d.key for d in ready.vm.disks}:
            raise PermanentError(
                f"disk {ready.disk.key} is not among the disks of VM {spec.name!r} in the event",
                "fix the producer of disk.snapshot.ready: the disk must be one of vm.disks",
            )
        adapter = await self.adapters(ready.plan.destination)
        server_id = self.conversion_host(ready.plan)
        existing = await volumes.find_volume(adapter, spec.vm_key, ready.disk.key)
        record = VolumeRecord.of(existing.metadata if existing is not None else None)
        sink = await KvCheckpointSink.open(
            self.bus, checkpoint_key(ready.vm_key, ready.request_id, ready.disk.key, ready.pass_no)
        )
        if existing is not None and record.holds(ready):
            return await self._already_synced(ready, adapter, server_id, existing.id, sink)
        if record.is_newer_than(ready):
            log.info(
                "%s disk %d: its volume holds pass %d, later than this event's pass %d: nothing to do",
                ready.vm_key, ready.disk.key, record.pass_no, ready.pass_no,
            )  # fmt: skip
            return []
        volume = await volumes.ensure_volume(adapter, spec, ready.disk, ready.plan)
        target = _Target(adapter, server_id, volume.id, fresh=existing is None, record=record)
        await context.heartbeat()
        prepared = await self._prepare(ready, target)
        result = await self._copy_onto(ready, context, prepared, target, sink)
        # The data is durable and verified: only now may the volume say it holds this pass.
        change_id = prepared.at_snapshot.change_id
        await volumes.record_pass(adapter, volume.id, change_id, ready.pass_no, ready.request_id)
        await sink.clear_async()
        await compute.detach(adapter, server_id, volume.id)
        verified = result.verification is not None
        return [self._synced(ready, volume.id, change_id, result.bytes_written, result.bytes_total, verified)]

    # ---- steps --------------------------------------------------------------------------------------------

    async def _already_synced(
        self,
        ready: DiskSnapshotReady,
        adapter: OpenStackAdapter,
        server_id: str,
        volume_id: str,
        sink: KvCheckpointSink,
    ) -> list[Emit]:
        """A redelivery after the pass was recorded: finish what the first delivery may not have."""
        log.info(
            "%s disk %d: volume %s already holds pass %d: emitting again",
            ready.vm_key, ready.disk.key, volume_id, ready.pass_no,
        )  # fmt: skip
        await sink.clear_async()
        state, _ = await self.bus.state.get(ready.vm_key)
        if state is None or state.phase not in _LATER_PHASES:
            # The first delivery may have died between recording and detaching. Once conversion
            # has begun the volume may be attached on purpose (in-place conversion): leave it.
            await compute.detach(adapter, server_id, volume_id)
        progress = state.disks.get(str(ready.disk.key)) if state is not None else None
        copied = total = 0
        if progress is not None and progress.pass_no == ready.pass_no:
            copied, total = progress.bytes_done, progress.bytes_total
        verified = ready.plan.options.verify_copies or ready.change_id is not None
        return [self._synced(ready, volume_id, ready.change_id, copied, total, verified)]

    async def _prepare(self, ready: DiskSnapshotReady, target: _Target) -> _Prepared:
        """Read the frozen disk from vSphere, decide full or CBT, and describe the source."""
        client = await self.clients(ready.plan.source.name)
        vm_moref = ready.vm_moref or await client.find_vm(ready.vm.identity.instance_uuid)
        frozen, at_snapshot = await self._frozen(client, ready, vm_moref)
        plan = await self._plan(client, ready, frozen, at_snapshot, target.record)
        log.info(
            "%s disk %d pass %d: %s copy onto volume %s (%s)",
            ready.vm_key, ready.disk.key, ready.pass_no, plan.kind, target.volume_id, plan.reason,
        )  # fmt: skip
        with _in_context(ready, plan):
            source = await self._source(client, ready, frozen)
        return _Prepared(at_snapshot, plan, source)

    async def _copy_onto(
        self,
        ready: DiskSnapshotReady,
        context: StepContext,
        prepared: _Prepared,
        target: _Target,
        sink: KvCheckpointSink,
    ) -> TransferResult:
        """Attach the volume here and copy; a permanent failure detaches it again."""
        root = self.device_root(target.server_id)
        device = await compute.attach(target.adapter, target.server_id, target.volume_id, root)
        await context.heartbeat()
        progress = _ProgressWriter(
            self.bus, ready, target.volume_id, target.record.change_id, self.progress_every
        )
        try:
            return await self._copy(
                ready,
                context,
                prepared,
                _destination(device, target.fresh and self.new_volumes_read_as_zero),
                sink,
                _job(sink.key, target.volume_id, ready.snapshot_moref),
                progress,
            )
        except PermanentError:
            # No retry comes to resume: free the volume (the checkpoint stays for a replay).
            await _detach_quietly(target.adapter, target.server_id, target.volume_id)
            raise

    async def _frozen(
        self, client: AsyncVsphere, ready: DiskSnapshotReady, vm_moref: str
    ) -> tuple[FrozenDisk, DiskState]:
        """The disk as the snapshot froze it, read from the snapshot itself (the event may name the
        VM's current delta file; the snapshot's own configuration names the frozen one)."""
        disk = ready.disk
        if ready.snapshot_moref is None:
            state = DiskState(disk.key, disk.backing_file, disk.capacity_bytes, ready.change_id)
        else:
            state = await client.run(datastore.frozen_disk, ready.snapshot_moref, disk.key)
            if ready.change_id is not None and state.change_id != ready.change_id:
                log.warning(
                    "%s disk %d: the event says changeId %r, snapshot %s says %r: using the snapshot's",
                    ready.vm_key, disk.key, ready.change_id, ready.snapshot_moref, state.change_id,
                )  # fmt: skip
        frozen = FrozenDisk(
            vm_moref=vm_moref,
            snapshot_moref=ready.snapshot_moref,
            file=DatastoreFile.parse(state.backing_file or disk.backing_file),
            capacity_bytes=state.capacity_bytes or disk.capacity_bytes,
        )
        return frozen, state

    async def _plan(
        self,
        client: AsyncVsphere,
        ready: DiskSnapshotReady,
        frozen: FrozenDisk,
        at_snapshot: DiskState,
        record: VolumeRecord,
    ) -> CopyPlan:
        """Full copy or CBT pass, and why."""
        if at_snapshot.change_id is None:
            return CopyPlan("full", "CBT is off for this disk at the snapshot")
        if not ready.plan.options.enable_cbt:
            return CopyPlan("full", "options.enable_cbt is false")
        if record.change_id is None:
            return CopyPlan(
                "full", "the volume holds no recorded pass (first copy, or an earlier one did not finish)"
            )
        if frozen.snapshot_moref is None:
            return CopyPlan("full", "no snapshot to ask for changed areas")
        areas = await client.changed_areas(
            frozen.vm_moref, frozen.snapshot_moref, at_snapshot, record.change_id
        )
        if areas.full_copy:
            return CopyPlan("full", areas.reason)
        return CopyPlan("cbt", areas.reason, areas.areas)

    async def _source(self, client: AsyncVsphere, ready: DiskSnapshotReady, frozen: FrozenDisk) -> DiskSource:
        """The nbdkit source for the plan's transport."""
        transport = ready.plan.options.transport
        source_name = ready.plan.source.name
        settings = self.transports.get(source_name, TransportSettings())
        if transport == "https":
            return https_source(frozen, await _https_access(client, frozen, settings), settings.filters)
        if transport == "local":
            if not ready.plan.options.local_disk_path:
                raise PermanentError(
                    "options.transport is 'local' but options.local_disk_path is not set",
                    "set options.local_disk_path to the datastore's mount point on the conversion host",
                )
            return local_source(frozen, ready.plan.options.local_disk_path, settings.filters)
        if transport == "ssh":
            if settings.ssh is None:
                raise _not_configured(source_name, "ssh")
            return ssh_source(frozen, settings.ssh, settings.filters)
        if settings.vddk is None:
            raise _not_configured(source_name, "vddk")
        return vddk_source(frozen, settings.vddk, _vddk_login(client.sync, settings.vddk), settings.filters)

    async def _copy(
        self,
        ready: DiskSnapshotReady,
        context: StepContext,
        prepared: _Prepared,
        destination: LocalDestination,
        sink: KvCheckpointSink,
        job: str,
        progress: _ProgressWriter,
    ) -> TransferResult:
        """Run the copy (resuming from the checkpoint) with heartbeats; map its failures."""
        source, plan, change_id = prepared.source, prepared.plan, prepared.at_snapshot.change_id
        stored = await sink.load_async()
        if stored is not None and (stored.job != job or stored.kind != plan.kind):
            log.info(
                "%s: the stored checkpoint belongs to another copy (%s): starting over", sink.key, stored.job
            )
            await sink.clear_async()
            destination = _not_zero(destination)
        heartbeat = asyncio.ensure_future(_heartbeat(context, self.heartbeat_every))
        try:
            with _in_context(ready, plan):
                try:
                    result = await self._copy_once(
                        ready, source, destination, plan, sink, job, progress.report
                    )
                except CheckpointMismatchError as mismatch:
                    log.info("%s: %s; starting over", sink.key, mismatch.cause)
                    await sink.clear_async()
                    destination = _not_zero(destination)
                    result = await self._copy_once(
                        ready, source, destination, plan, sink, job, progress.report
                    )
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        await progress.finish(result, change_id)
        log.info(
            "%s disk %d pass %d: %s copy done: %d of %d bytes written (%d resumed), %.1f s, verified: %s",
            ready.vm_key, ready.disk.key, ready.pass_no, plan.kind, result.bytes_written, result.bytes_total,
            result.bytes_resumed, result.seconds, result.verification is not None,
        )  # fmt: skip
        return result

    async def _copy_once(
        self,
        ready: DiskSnapshotReady,
        source: DiskSource,
        destination: LocalDestination,
        plan: CopyPlan,
        sink: KvCheckpointSink,
        job: str,
        report: ProgressCallback,
    ) -> TransferResult:
        verify = ready.plan.options.verify_copies
        engine = self.engine
        command = source.nbdkit_command()
        folder = self.nbdkit_folder
        # The frozen dataclasses do not match the protocol's settable ``reads_as_zero`` for mypy.
        target = cast("Destination", destination)

        def work(cancel: threading.Event, progress: ProgressCallback) -> TransferResult:
            # nbdkit runs with --exit-with-parent: start and stop it in the thread that copies.
            with NbdkitServer(command, folder_parent=folder) as server:
                if plan.kind == "full":
                    return engine.full_copy(
                        server.uri, target, job=job, checkpoint=sink, progress=progress,
                        verify=verify, cancel=cancel,
                    )  # fmt: skip
                return engine.copy_changed(
                    server.uri, target, plan.areas, job=job, checkpoint=sink, progress=progress,
                    cancel=cancel,
                )  # fmt: skip

        return await _in_copy_thread(work, report, f"vmferry-transfer-{ready.disk.key}")

    def _synced(
        self,
        ready: DiskSnapshotReady,
        volume_id: str,
        change_id: str | None,
        copied: int,
        total: int,
        verified: bool,
    ) -> Emit:
        synced = VolumeSynced(
            request_id=ready.request_id,
            vm_key=ready.vm_key,
            plan=ready.plan,
            vm=ready.vm,
            pass_no=ready.pass_no,
            final=ready.final,
            disk_key=ready.disk.key,
            disk_count=ready.disk_count,
            volume_id=volume_id,
            change_id=change_id,
            bytes_copied=copied,
            bytes_total=total,
            verified=verified,
        )
        return Emit(ready.vm_key, synced, key=f"disk-{ready.disk.key}")


# ---------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _in_context(ready: DiskSnapshotReady, plan: CopyPlan) -> Iterator[None]:
    """Say which disk, pass and copy a data-plane error is about; a failed verification is retried
    (the engine has cleared the checkpoint, so the retry copies the pass again from the start)."""
    try:
        yield
    except FerryError as error:
        where = (
            f"copying disk {ready.disk.key} of VM {ready.vm.identity.name!r} ({ready.vm_key}), pass"
            f" {ready.pass_no}, {plan.kind} copy over {ready.plan.options.transport}: "
        )
        retry = error.retryable or isinstance(error, VerificationError)
        kind = RetryableError if retry else PermanentError
        raise kind(where + error.cause, error.fix) from error


def _not_configured(source: str, transport: str) -> PermanentError:
    return PermanentError(
        f"the {transport} transport is not configured for source {source!r}",
        f"add the {transport} settings of source {source!r} to the transfer function's configuration, or"
        " choose another options.transport",
    )


def _destination(device: Path, reads_as_zero: bool) -> LocalDestination:
    """The attached volume: a block device on a conversion host, a plain file in the lab."""
    try:
        mode = os.stat(device).st_mode
    except OSError as error:
        raise RetryableError(
            f"the attached volume's device {device} cannot be read: {error.strerror}",
            "check the attachment on the conversion host; retried later",
        ) from error
    if stat.S_ISBLK(mode):
        return BlockDeviceDestination(device, reads_as_zero)
    return FileDestination(device, reads_as_zero)


def _not_zero(destination: LocalDestination) -> LocalDestination:
    """The same destination, no longer trusted to read as zeroes (a copy already wrote to it)."""
    return dataclasses.replace(destination, reads_as_zero=False)


async def _detach_quietly(adapter: OpenStackAdapter, server_id: str, volume_id: str) -> None:
    try:
        await compute.detach(adapter, server_id, volume_id)
    except FerryError as error:
        log.warning("volume %s stays attached to %s: %s", volume_id, server_id, error)


async def _heartbeat(context: StepContext, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(Exception):  # the runner's own heartbeat still runs
            await context.heartbeat()


async def _https_access(client: AsyncVsphere, frozen: FrozenDisk, settings: TransportSettings) -> HttpsAccess:
    """The endpoint, datacenter path, session cookie and TLS trust for a ``/folder`` download."""
    login = client.sync.settings
    if login.thumbprint and not login.ca_file and not login.insecure:
        raise PermanentError(
            f"source {login.name} is trusted by certificate thumbprint, which the https transport's TLS"
            " check cannot use",
            "give the source a ca_file (the CA or the certificate itself), or use the vddk transport",
        )
    host = f"[{login.host}]" if ":" in login.host else login.host
    if login.port != 443:
        host = f"{host}:{login.port}"
    cookie = Secret(await client.run(VsphereClient.session_cookie))
    datacenter = await client.run(datastore.datacenter_path, frozen.vm_moref)
    return HttpsAccess(
        host=host,
        datacenter_path=datacenter,
        cookie=cookie,
        cainfo=login.ca_file,
        verify_tls=not login.insecure,
        timeout=settings.https_timeout,
    )


def _vddk_login(client: VsphereClient, settings: VddkSettings) -> VddkLogin:
    login = client.settings
    thumbprint = settings.thumbprint or (colon_thumbprint(login.thumbprint) if login.thumbprint else None)
    if thumbprint is None:
        raise PermanentError(
            f"the vddk transport needs the certificate thumbprint of source {login.name}",
            "set the source's thumbprint (or vddk.thumbprint): openssl s_client -connect HOST:443 </dev/null"
            " | openssl x509 -noout -fingerprint -sha1",
        )
    return VddkLogin(
        server=login.host,
        user=login.user,
        password=Secret(login.read_password()),
        thumbprint=thumbprint,
        port=login.port if login.port != 443 else None,
    )


async def _in_copy_thread(
    work: Callable[[threading.Event, ProgressCallback], TransferResult], progress: ProgressCallback, name: str
) -> TransferResult:
    """Run ``work`` in a thread of its own (nbdkit's lifetime is tied to it); progress reports hop to
    the event loop; cancelling the caller stops the copy cleanly (completed extents checkpointed)."""
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    outcome: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()

    def report(update: Progress) -> None:
        loop.call_soon_threadsafe(progress, update)

    def main() -> None:
        if not outcome.set_running_or_notify_cancel():
            return
        try:
            outcome.set_result(work(cancel, report))
        except BaseException as error:  # handed to the awaiting coroutine
            outcome.set_exception(error)

    threading.Thread(target=main, name=name, daemon=True).start()
    waiter = asyncio.wrap_future(outcome, loop=loop)
    try:
        return await asyncio.shield(waiter)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(Exception):
            await waiter
        raise


def definition(handler: Transfer, concurrency: int | None = None) -> FunctionDef[DiskSnapshotReady]:
    """How the runner hosts transfer: a few disks at a time per process, kept alive by heartbeats."""
    return FunctionDef(
        name="transfer",
        consumes=DiskSnapshotReady,
        emits=(VolumeSynced,),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=60.0,
        max_deliver=8,
        description="copies one disk of a pass snapshot onto its Cinder volume (full or CBT pass)",
    )
