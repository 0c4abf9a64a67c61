"""settle: the join after the copies of one pass.

Each disk's ``volume.synced`` is recorded in the VM's state with compare-and-set; the delivery that
completes the pass (and only that one, also when redelivered) releases the pass snapshot on the
source and emits ``vm.synced`` with every disk's volume. After a precopy pass it also decides what
comes next from the cutover policy: ``immediate`` asks for cutover now, ``scheduled`` asks once the
time has come, ``manual`` waits for `vmferry cutover`; later precopy passes are asked with
`vmferry sync`. After the final pass, conversion takes over.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.functions.guards import is_cancelled
from vmferry.schemas.events import CutoverRequested, SyncedVolume, VmSynced, VolumeSynced
from vmferry.schemas.request import MigrationPlan
from vmferry.schemas.state import PassSync, SyncedDisk, VmState

ClientFactory = Callable[[str], Awaitable[AsyncVsphere]]
Clock = Callable[[], datetime]


def record_disk(synced: VolumeSynced) -> Callable[[VmState | None], VmState | None]:
    """A pure state mutation that records one disk of a pass (stale passes change nothing)."""

    def mutate(state: VmState | None) -> VmState | None:
        state = state or VmState(key=synced.vm_key, request_id=synced.request_id)
        current = state.sync
        if current is not None and current.pass_no > synced.pass_no:
            return state
        if current is None or current.pass_no < synced.pass_no:
            current = PassSync(pass_no=synced.pass_no, final=synced.final, disk_count=synced.disk_count)
        volumes = dict(current.volumes)
        volumes[str(synced.disk_key)] = SyncedDisk(
            volume_id=synced.volume_id, change_id=synced.change_id, bytes_copied=synced.bytes_copied
        )
        completed_by = current.completed_by
        if completed_by is None and len(volumes) >= current.disk_count:
            completed_by = synced.disk_key
        passes = max(state.passes_synced, synced.pass_no) if completed_by is not None else state.passes_synced
        sync = msgspec.structs.replace(current, volumes=volumes, completed_by=completed_by)
        return msgspec.structs.replace(state, sync=sync, passes_synced=passes)

    return mutate


def inspects_before_cutover(plan: MigrationPlan) -> bool:
    """A warm migration whose guest is inspected after the first pass, before any cutover."""
    options = plan.options
    return plan.mode == "warm" and options.conversion != "skip" and options.inspect_before_cutover


def cutover_if_due(
    request_id: str, vm_key: str, plan: MigrationPlan, final: bool, now: datetime
) -> list[Emit]:
    """cutover.requested after a precopy pass when the policy says now (immediate, or scheduled and due)."""
    policy = plan.cutover
    if final or plan.mode == "cold":
        return []
    due = policy.when == "immediate" or (
        policy.when == "scheduled" and policy.at is not None and policy.at <= now
    )
    if not due:
        return []
    cutover = CutoverRequested(
        request_id=request_id, vm_key=vm_key, plan=plan, requested_by=f"cutover policy: {policy.when}"
    )
    return [Emit(vm_key, cutover)]


def _volumes_in_disk_order(synced: VolumeSynced, sync: PassSync) -> list[SyncedVolume]:
    order = [d.key for d in synced.vm.disks] or sorted(int(k) for k in sync.volumes)
    return [
        SyncedVolume(
            disk_key=key,
            volume_id=sync.volumes[str(key)].volume_id,
            change_id=sync.volumes[str(key)].change_id,
            bytes_copied=sync.volumes[str(key)].bytes_copied,
        )
        for key in order
        if str(key) in sync.volumes
    ]


@dataclass(frozen=True)
class Settle:
    """The handler; the state lives behind ``bus``, snapshots are released through ``clients``."""

    clients: ClientFactory
    bus: BusHandle
    clock: Clock = lambda: datetime.now(UTC)

    async def __call__(self, event: CloudEvent[VolumeSynced], context: StepContext) -> Sequence[Emit]:
        """Record the disk; if it completed the pass, release the snapshot and emit vm.synced."""
        synced = event.data
        state, _ = await self.bus.state.update(synced.vm_key, record_disk(synced))
        sync = state.sync if state is not None else None
        if sync is None or sync.pass_no != synced.pass_no or sync.completed_by != synced.disk_key:
            return []
        await self._release_snapshot(synced)
        if await is_cancelled(self.bus, synced.vm_key, synced.request_id, "settle"):
            return []
        done = VmSynced(
            request_id=synced.request_id,
            vm_key=synced.vm_key,
            plan=synced.plan,
            vm=synced.vm,
            pass_no=synced.pass_no,
            final=synced.final,
            volumes=_volumes_in_disk_order(synced, sync),
        )
        return [Emit(synced.vm_key, done), *self._next_step(synced)]

    async def _release_snapshot(self, synced: VolumeSynced) -> None:
        """Every disk's data of this pass is recorded: its snapshot has done its job."""
        client = await self.clients(synced.plan.source.name)
        moref = await client.find_vm(synced.vm.identity.instance_uuid)
        await client.release_pass(moref, synced.request_id, synced.pass_no)

    def _next_step(self, synced: VolumeSynced) -> list[Emit]:
        """After a precopy pass: cutover now if the policy says so (after the first pass of a warm
        migration that inspects the guest, convert asks once the inspection passed)."""
        if synced.pass_no == 1 and inspects_before_cutover(synced.plan):
            return []
        return cutover_if_due(synced.request_id, synced.vm_key, synced.plan, synced.final, self.clock())


def definition(handler: Settle, concurrency: int | None = None) -> FunctionDef[VolumeSynced]:
    """How the runner hosts settle."""
    return FunctionDef(
        name="settle",
        consumes=VolumeSynced,
        emits=(VmSynced, CutoverRequested),
        handler=handler,
        concurrency=concurrency or 8,
        ack_wait=120.0,
        max_deliver=8,
        description="joins the disks of a pass, releases its snapshot, emits vm.synced, applies the policy",
    )
