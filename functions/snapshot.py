"""snapshot: freezes a VM for a copy pass.

Two entry points share one routine. ``Snapshot`` consumes ``vm.discovered``: a warm migration takes
its first precopy pass while the VM runs; a cold one asks for cutover first (the source is stopped,
then the only pass is taken). ``PassSnapshot`` consumes ``cbt.delta.requested``: it reads the VM
again (disks may have grown or been added) and takes pass N, the final pass when cutover asked.

Each pass enables changed block tracking when allowed, takes ONE snapshot covering all disks
(``vmferry-<request>-pass<N>``, found again instead of taken twice on a redelivery) and emits one
``disk.snapshot.ready`` per disk with the disk's changeId at that snapshot. If the disks differ
from what the event expects, or CBT is not active although it should be, the snapshot is removed
again and the step fails with the reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.adapters.vsphere.snapshots import PassSnapshot as TakenPass
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.functions.guards import is_cancelled
from vmferry.schemas.base import instance_uuid_of
from vmferry.schemas.events import (
    CbtDeltaRequested,
    CutoverRequested,
    DiskInfo,
    DiskSnapshotReady,
    VmDiscovered,
    VmInventory,
)
from vmferry.schemas.request import MigrationPlan, MigrationRequest, VmSelector

ClientFactory = Callable[[str], Awaitable[AsyncVsphere]]
FIRST_PASS = 1


@dataclass(frozen=True)
class _Pass:
    """What one pass is about: which VM, as which inventory, under which plan."""

    request_id: str
    vm_key: str
    plan: MigrationPlan
    vm: VmInventory
    pass_no: int
    final: bool


def _same_disks(vm: VmInventory) -> Callable[[TakenPass], None]:
    """A check that the snapshot holds exactly the expected disks, at their expected sizes."""
    expected = {d.key: d.capacity_bytes for d in vm.disks}

    def check(taken: TakenPass) -> None:
        actual = {d.key: d.capacity_bytes for d in taken.disks}
        if actual != expected:
            raise PermanentError(
                f"the disks of VM {vm.identity.name!r} changed while the pass was prepared (expected"
                f" {expected}, now {actual} as key: bytes)",
                "request the pass again (vmferry sync) so the VM is read as it is now",
            )

    return check


async def _take(client: AsyncVsphere, job: _Pass, context: StepContext) -> list[Emit]:
    """Enable CBT if allowed, take the pass snapshot, describe each disk in it."""
    if not job.vm.disks:
        raise PermanentError(f"VM {job.vm.identity.name!r} has no disks to snapshot", "discovery blocks it")
    options = job.plan.options
    moref = await client.find_vm(job.vm.identity.instance_uuid)
    if options.enable_cbt:
        await client.enable_cbt(moref, job.request_id)
        await context.heartbeat()
    taken = await client.take_pass_snapshot(
        moref,
        request_id=job.request_id,
        vm_key=job.vm_key,
        pass_no=job.pass_no,
        quiesce=options.quiesce_snapshots and not job.final,
        require_change_ids=options.enable_cbt,
        check=_same_disks(job.vm),
    )
    return [_ready(job, moref, taken, disk) for disk in job.vm.disks]


def _ready(job: _Pass, moref: str, taken: TakenPass, disk: DiskInfo) -> Emit:
    frozen = taken.disk(disk.key)
    ready = DiskSnapshotReady(
        request_id=job.request_id,
        vm_key=job.vm_key,
        plan=job.plan,
        vm=job.vm,
        pass_no=taken.pass_no,
        final=job.final,
        vm_moref=moref,
        snapshot_moref=taken.snapshot_moref,
        disk=msgspec.structs.replace(disk, backing_file=frozen.backing_file or disk.backing_file),
        disk_count=len(job.vm.disks),
        change_id=frozen.change_id,
    )
    return Emit(job.vm_key, ready, key=f"disk-{disk.key}")


@dataclass(frozen=True)
class Snapshot:
    """Handles ``vm.discovered``; ``clients`` gives a connected vSphere client per source name."""

    clients: ClientFactory
    bus: BusHandle | None = None

    async def __call__(self, event: CloudEvent[VmDiscovered], context: StepContext) -> Sequence[Emit]:
        """Warm: take the first precopy pass. Cold: ask for cutover (stop first, then one pass)."""
        vm = event.data
        if await is_cancelled(self.bus, vm.vm_key, vm.request_id, "snapshot"):
            return []
        if vm.plan.mode == "cold":
            cutover = CutoverRequested(
                request_id=vm.request_id, vm_key=vm.vm_key, plan=vm.plan, requested_by="cold migration"
            )
            return [Emit(vm.vm_key, cutover)]
        client = await self.clients(vm.plan.source.name)
        job = _Pass(vm.request_id, vm.vm_key, vm.plan, vm.inventory(), FIRST_PASS, final=False)
        return await _take(client, job, context)


@dataclass(frozen=True)
class PassSnapshot:
    """Handles ``cbt.delta.requested``: a later precopy pass, or the final one at cutover."""

    clients: ClientFactory
    bus: BusHandle | None = None

    async def __call__(self, event: CloudEvent[CbtDeltaRequested], context: StepContext) -> Sequence[Emit]:
        """Read the VM again and take pass N (final when the reason is cutover)."""
        asked = event.data
        if await is_cancelled(self.bus, asked.vm_key, asked.request_id, "snapshot-pass"):
            return []
        client = await self.clients(asked.plan.source.name)
        vm = await _rediscover(client, asked)
        job = _Pass(asked.request_id, asked.vm_key, asked.plan, vm, asked.pass_no, asked.reason == "cutover")
        return await _take(client, job, context)


async def _rediscover(client: AsyncVsphere, asked: CbtDeltaRequested) -> VmInventory:
    """The VM as it is now, by its instanceUuid."""
    plan = asked.plan
    request = MigrationRequest(
        request_id=asked.request_id,
        source=plan.source,
        destination=plan.destination,
        vms=[VmSelector(instance_uuid=instance_uuid_of(asked.vm_key))],
        mode=plan.mode,
        mappings=plan.mappings,
        cutover=plan.cutover,
        options=plan.options,
    )
    found = await client.discover(request)
    if len(found) != 1:
        raise PermanentError(
            f"VM {asked.vm_key} is no longer on source {plan.source.name!r}",
            "check whether it was deleted or moved to another vCenter; the migration cannot continue",
        )
    return found[0].vm.inventory()


def definition(handler: Snapshot, concurrency: int | None = None) -> FunctionDef[VmDiscovered]:
    """How the runner hosts the first pass."""
    return FunctionDef(
        name="snapshot",
        consumes=VmDiscovered,
        emits=(DiskSnapshotReady, CutoverRequested),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=120.0,
        max_deliver=5,
        description="enables CBT, takes the first pass snapshot (warm) or asks for cutover (cold)",
    )


def pass_definition(handler: PassSnapshot, concurrency: int | None = None) -> FunctionDef[CbtDeltaRequested]:
    """How the runner hosts later and final passes."""
    return FunctionDef(
        name="snapshot-pass",
        consumes=CbtDeltaRequested,
        emits=(DiskSnapshotReady,),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=120.0,
        max_deliver=5,
        description="takes the snapshot of a later precopy pass or of the final pass at cutover",
    )
