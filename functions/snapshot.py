"""snapshot: freezes a discovered VM for its first copy pass.

It enables changed block tracking when allowed, takes ONE snapshot covering all disks
(``vmferry-<request>-pass1``, found again instead of taken twice on a redelivery), and emits one
``disk.snapshot.ready`` per disk with the disk's changeId at that snapshot. If the VM's disks changed
since discovery, or CBT is not active although it should be, the snapshot is removed again and the
step fails with the reason. The source, CBT and quiesce choices come from the request's plan,
which travels with the event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.adapters.vsphere.snapshots import PassSnapshot
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.schemas.events import DiskInfo, DiskSnapshotReady, VmDiscovered

ClientFactory = Callable[[str], Awaitable[AsyncVsphere]]
FIRST_PASS = 1


def _same_disks(vm: VmDiscovered) -> Callable[[PassSnapshot], None]:
    """A check that the snapshot holds exactly the discovered disks, at their discovered sizes."""
    expected = {d.key: d.capacity_bytes for d in vm.disks}

    def check(taken: PassSnapshot) -> None:
        actual = {d.key: d.capacity_bytes for d in taken.disks}
        if actual != expected:
            raise PermanentError(
                f"the disks of VM {vm.identity.name!r} changed since discovery (discovered {expected},"
                f" now {actual} as key: bytes)",
                "submit the migration request again so the VM is discovered as it is now",
            )

    return check


@dataclass(frozen=True)
class Snapshot:
    """The handler; ``clients`` gives a connected vSphere client per configured source name."""

    clients: ClientFactory

    async def __call__(self, event: CloudEvent[VmDiscovered], context: StepContext) -> Sequence[Emit]:
        """Enable CBT if allowed, take the pass-1 snapshot, emit disk.snapshot.ready per disk."""
        vm = event.data
        options = vm.plan.options
        if not vm.disks:
            raise PermanentError(
                f"VM {vm.identity.name!r} has no disks to snapshot", "discovery should block it"
            )
        client = await self.clients(vm.plan.source.name)
        moref = await client.find_vm(vm.identity.instance_uuid)
        if options.enable_cbt:
            await client.enable_cbt(moref, vm.request_id)
            await context.heartbeat()
        taken = await client.take_pass_snapshot(
            moref,
            request_id=vm.request_id,
            vm_key=vm.vm_key,
            pass_no=FIRST_PASS,
            quiesce=options.quiesce_snapshots,
            require_change_ids=options.enable_cbt,
            check=_same_disks(vm),
        )
        return [self._ready(vm, moref, taken, disk) for disk in vm.disks]

    def _ready(self, vm: VmDiscovered, moref: str, taken: PassSnapshot, disk: DiskInfo) -> Emit:
        frozen = taken.disk(disk.key)
        ready = DiskSnapshotReady(
            request_id=vm.request_id,
            vm_key=vm.vm_key,
            plan=vm.plan,
            pass_no=taken.pass_no,
            vm_moref=moref,
            snapshot_moref=taken.snapshot_moref,
            disk=msgspec.structs.replace(disk, backing_file=frozen.backing_file or disk.backing_file),
            disk_count=len(vm.disks),
            change_id=frozen.change_id,
            base_change_id=None,
        )
        return Emit(vm.vm_key, ready, key=f"disk-{disk.key}")


def definition(handler: Snapshot, concurrency: int | None = None) -> FunctionDef[VmDiscovered]:
    """How the runner hosts snapshot."""
    return FunctionDef(
        name="snapshot",
        consumes=VmDiscovered,
        emits=(DiskSnapshotReady,),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=120.0,
        max_deliver=5,
        description="enables CBT, takes one snapshot per pass covering all disks, emits disk.snapshot.ready",
    )
