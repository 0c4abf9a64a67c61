"""Toy handlers that exercise the chain in tests (never part of functions/).

Also runnable as ``python -m tests.toychain URL PREFIX MODE`` to host them in a child process,
for crash and SIGTERM tests.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.connection import NatsSettings, connect
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.bus.function import Emit, FunctionDef, RetryPolicy, StepContext
from vmferry.bus.naming import Naming
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.schemas import events as ev
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.request import DestinationRef, MigrationPlan, SourceRef

UUID = "4207aa1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b"
VM_KEY = vm_key_for(UUID)
PLAN = MigrationPlan(source=SourceRef(name="vc"), destination=DestinationRef(cloud="lab"))


def discovered(vm_key: str = VM_KEY, name: str = "web 01", request_id: str = "r1") -> ev.VmDiscovered:
    """A small valid vm.discovered payload."""
    return ev.VmDiscovered(
        request_id=request_id,
        vm_key=vm_key,
        plan=PLAN,
        identity=ev.VmIdentity(instance_uuid=UUID, name=name, moref="vm-42"),
        cpus=2,
        memory_mib=2048,
        disks=[ev.DiskInfo(key=2000, capacity_bytes=1 << 30), ev.DiskInfo(key=2001, capacity_bytes=1 << 20)],
    )


def snapshot_ready(data: ev.VmDiscovered, disk: ev.DiskInfo) -> ev.DiskSnapshotReady:
    """One disk.snapshot.ready for a discovered VM."""
    return ev.DiskSnapshotReady(
        request_id=data.request_id,
        vm_key=data.vm_key,
        plan=data.plan,
        vm=data.inventory(),
        pass_no=1,
        disk=disk,
        disk_count=len(data.disks),
        change_id="52 aa/1",
    )


def volume_synced(data: ev.DiskSnapshotReady) -> ev.VolumeSynced:
    """The volume.synced answering a snapshot-ready."""
    return ev.VolumeSynced(
        request_id=data.request_id,
        vm_key=data.vm_key,
        plan=data.plan,
        vm=data.vm,
        pass_no=data.pass_no,
        disk_key=data.disk.key,
        disk_count=data.disk_count,
        volume_id=f"vol-{data.disk.key}",
        change_id=data.change_id,
        bytes_total=data.disk.capacity_bytes,
    )


def event_of(data: ev.EventPayload, event_id: str, vm_key: str = VM_KEY) -> CloudEvent[Any]:
    """Wrap a payload as it would be published by a producer."""
    return CloudEvent(id=event_id, type=data.spec.ce_type, source="/tests", subject=vm_key, data=data)


@dataclass
class Toys:
    """Behaviour knobs and call records of the toy handlers."""

    calls: Counter[str] = field(default_factory=Counter)
    deliveries: list[int] = field(default_factory=list)
    fail_snapshot_times: int = 0
    fail_snapshot_permanently: bool = False
    retryable_forever: bool = False
    sleep_s: float = 0.0
    started_marker: Path | None = None
    oversize: bool = False

    async def snapshot(self, event: CloudEvent[ev.VmDiscovered], ctx: StepContext) -> Sequence[Emit]:
        self.calls["snapshot"] += 1
        self.deliveries.append(ctx.delivery)
        if self.started_marker:
            self.started_marker.write_text(str(time.time()))
        if self.sleep_s:
            await asyncio.to_thread(time.sleep, self.sleep_s)  # a blocking call, like pyvmomi's
        if self.fail_snapshot_permanently:
            raise PermanentError("the VM has an independent disk", "make the disk persistent")
        if self.retryable_forever or self.calls["snapshot"] <= self.fail_snapshot_times:
            raise RetryableError("vCenter is busy")
        data = event.data
        disks = data.disks
        if self.oversize:
            disks = [*disks, ev.DiskInfo(key=1, capacity_bytes=1, label="x" * 1_100_000)]
        return [Emit(data.vm_key, snapshot_ready(data, d), key=str(d.key)) for d in disks]

    async def transfer(self, event: CloudEvent[ev.DiskSnapshotReady], ctx: StepContext) -> Sequence[Emit]:
        self.calls["transfer"] += 1
        return [Emit(event.data.vm_key, volume_synced(event.data))]

    def functions(
        self, ack_wait: float = 2.0, max_deliver: int = 4, delays: tuple[float, ...] = (0.2,)
    ) -> list[FunctionDef[Any]]:
        retry = RetryPolicy(delays)
        return [
            FunctionDef(
                name="snapshot",
                consumes=ev.VmDiscovered,
                emits=(ev.DiskSnapshotReady,),
                handler=self.snapshot,
                ack_wait=ack_wait,
                max_deliver=max_deliver,
                retry=retry,
            ),
            FunctionDef(
                name="transfer",
                consumes=ev.DiskSnapshotReady,
                emits=(ev.VolumeSynced,),
                handler=self.transfer,
                ack_wait=ack_wait,
                max_deliver=max_deliver,
                retry=retry,
            ),
        ]


async def _child(url: str, prefix: str, mode: str, marker: str) -> None:
    """Host the toy chain in this process until SIGTERM (used by crash and shutdown tests)."""
    toys = Toys(sleep_s=3.0 if mode == "slow" else 0.0, started_marker=Path(marker))
    nc = await connect(NatsSettings(servers=(url,)))
    js = nc.jetstream()
    naming = Naming(prefix)
    store = await StateStore.open(js, naming.state_bucket)
    runtime = Runtime(js, naming, toys.functions(ack_wait=1.0), store, fetch_timeout=0.2)
    runtime.install_signal_handlers()
    await runtime.run()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(_child(*sys.argv[1:5]))
