"""settle, cutover and restore against vcsim-ferry and a real NATS state bucket."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext

from tests.vsphere.conftest import Step
from tests.vsphere.lab import MIB, Lab, VmSpec, request
from vmferry.adapters.vsphere.aio import VsphereClients
from vmferry.adapters.vsphere.power import power_state, start_vm, stop_vm
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import RetryableError
from vmferry.bus.function import Emit
from vmferry.bus.handles import BusHandle
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.state import StateStore
from vmferry.functions import discover, snapshot
from vmferry.functions.cutover import Cutover, Restore
from vmferry.functions.settle import Settle
from vmferry.schemas.base import request_key_for
from vmferry.schemas.events import (
    CbtDeltaRequested,
    CutoverRequested,
    DiskSnapshotReady,
    MigrationAccepted,
    MigrationFailed,
    VmDiscovered,
    VmSynced,
    VolumeSynced,
)
from vmferry.schemas.request import MigrationRequest
from vmferry.schemas.state import VmState


@pytest.fixture
async def bus(js: JetStreamContext, naming: Naming) -> AsyncIterator[BusHandle]:
    await provision(js, naming, [])
    handle = BusHandle()
    handle.bind(js, naming, await StateStore.open(js, naming.state_bucket))
    yield handle


def event(data: Any, event_id: str | None = None) -> CloudEvent[Any]:
    return CloudEvent(
        id=event_id or uuid.uuid4().hex,
        type=data.spec.ce_type,
        source="test",
        subject=getattr(data, "vm_key", "req-x"),
        data=data,
    )


async def discovered(clients: VsphereClients, req: MigrationRequest) -> VmDiscovered:
    accepted = CloudEvent(
        id="a",
        type=MigrationAccepted.spec.ce_type,
        source="test",
        subject=request_key_for(req.request_id),
        data=MigrationAccepted(request=req),
    )
    [emit] = await discover.Discover(clients, check_privileges=False)(accepted, Step())
    assert isinstance(emit.data, VmDiscovered)
    return emit.data


def synced(ready: DiskSnapshotReady) -> VolumeSynced:
    return VolumeSynced(
        request_id=ready.request_id,
        vm_key=ready.vm_key,
        plan=ready.plan,
        vm=ready.vm,
        pass_no=ready.pass_no,
        final=ready.final,
        disk_key=ready.disk.key,
        disk_count=ready.disk_count,
        volume_id=f"vol-{ready.disk.key}",
        change_id=ready.change_id,
        bytes_total=ready.disk.capacity_bytes,
        verified=True,
    )


async def first_pass(clients: VsphereClients, vm: VmDiscovered) -> list[DiskSnapshotReady]:
    emits = await snapshot.Snapshot(clients)(event(vm), Step())
    ready = [e.data for e in emits]
    assert all(isinstance(r, DiskSnapshotReady) for r in ready)
    return [r for r in ready if isinstance(r, DiskSnapshotReady)]


def payloads(emits: list[Emit] | Any) -> list[Any]:
    return [e.data for e in emits]


async def test_the_disk_completing_a_pass_releases_its_snapshot_and_emits_vm_synced_once(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    lab.create_vm(VmSpec(name="pair", disks=(MIB, 2 * MIB)))
    vm = await discovered(clients, request({"name": "pair"}, mode="warm", options={"conversion": "skip"}))
    ready = await first_pass(clients, vm)
    settle = Settle(clients, bus)
    first, second = (event(synced(r)) for r in ready)

    assert await settle(first, Step()) == []
    assert lab.vmferry_snapshots() != [], "the snapshot stays until every disk is recorded"
    done = payloads(await settle(second, Step()))

    assert [type(d) for d in done] == [VmSynced, CutoverRequested], "policy 'immediate' asks for cutover"
    joined = done[0]
    assert [v.disk_key for v in joined.volumes] == [d.key for d in vm.disks]
    assert [v.volume_id for v in joined.volumes] == [f"vol-{d.key}" for d in vm.disks]
    assert lab.vmferry_snapshots() == []
    # redeliveries: the completing disk emits the same events again (the bus dedupes them by id),
    # the other disk still emits nothing
    assert payloads(await settle(second, Step())) == done
    assert await settle(first, Step()) == []
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None and state.passes_synced == 1


async def test_a_manual_cutover_policy_waits_and_stale_passes_change_nothing(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    lab.create_vm(VmSpec(name="patient", disks=(MIB,)))
    vm = await discovered(clients, request({"name": "patient"}, mode="warm", cutover={"when": "manual"}))
    [ready] = await first_pass(clients, vm)
    settle = Settle(clients, bus)

    done = payloads(await settle(event(synced(ready)), Step()))
    assert [type(d) for d in done] == [VmSynced]

    stale = msgspec.structs.replace(synced(ready), pass_no=0)
    assert await settle(event(stale), Step()) == []
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None and state.sync is not None and state.sync.pass_no == 1


async def test_after_the_first_pass_an_inspecting_migration_leaves_cutover_to_the_inspection(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    lab.create_vm(VmSpec(name="inspected", disks=(MIB,)))
    vm = await discovered(clients, request({"name": "inspected"}, mode="warm"))
    [ready] = await first_pass(clients, vm)
    done = payloads(await Settle(clients, bus)(event(synced(ready)), Step()))
    assert [type(d) for d in done] == [VmSynced], "convert asks for cutover once the guest passed inspection"


async def test_a_second_cutover_request_changes_nothing_while_the_first_holds(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    made = lab.create_vm(VmSpec(name="twice"))
    vm = await discovered(clients, request({"name": "twice"}, mode="warm"))
    client = await clients("lab")
    await client.run(start_vm, made._moId)
    asked = CutoverRequested(request_id=vm.request_id, vm_key=vm.vm_key, plan=vm.plan)
    cutover = Cutover(clients, bus)

    [first] = await cutover(event(asked, "first"), Step())
    assert await cutover(event(asked, "second"), Step()) == []
    again = await cutover(event(asked, "first"), Step(delivery=2))  # a redelivery of the first goes on
    assert [e.data for e in again] == [first.data]


async def test_cutover_stops_the_source_asks_for_the_final_pass_and_restore_powers_it_back_on(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    made = lab.create_vm(VmSpec(name="running"))
    vm = await discovered(clients, request({"name": "running"}, mode="warm"))
    client = await clients("lab")
    await client.run(start_vm, made._moId)
    await bus.state.update(vm.vm_key, lambda _: VmState(key=vm.vm_key, pass_no=2, passes_synced=2))
    asked = CutoverRequested(request_id=vm.request_id, vm_key=vm.vm_key, plan=vm.plan)

    [emit] = await Cutover(clients, bus)(event(asked), Step())

    final = emit.data
    assert isinstance(final, CbtDeltaRequested)
    assert (final.reason, final.pass_no) == ("cutover", 3)
    assert await client.run(power_state, made._moId) == "poweredOff"
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None and state.source_power is not None

    failed = MigrationFailed(request_id=vm.request_id, vm_key=vm.vm_key, step="convert", cause="no root")
    assert await Restore(clients, bus)(event(failed), Step()) == []
    assert await client.run(power_state, made._moId) == "poweredOn"
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None and state.source_power is not None and state.source_power.restored_at
    await client.run(stop_vm, made._moId, 0)
    await Restore(clients, bus)(event(failed), Step())
    assert await client.run(power_state, made._moId) == "poweredOff", "restored once only"


async def test_a_vm_that_was_already_off_is_never_powered_on_after_a_failure(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    made = lab.create_vm(VmSpec(name="was-off"))
    vm = await discovered(clients, request({"name": "was-off"}))
    asked = CutoverRequested(request_id=vm.request_id, vm_key=vm.vm_key, plan=vm.plan)

    [emit] = await Cutover(clients, bus)(event(asked), Step())

    assert isinstance(emit.data, CbtDeltaRequested) and emit.data.pass_no == 1
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None and state.source_power is None
    failed = MigrationFailed(request_id=vm.request_id, vm_key=vm.vm_key, step="transfer", cause="x")
    await Restore(clients, bus)(event(failed), Step())
    client = await clients("lab")
    assert await client.run(power_state, made._moId) == "poweredOff"


async def test_cutover_waits_for_a_precopy_pass_in_flight(
    lab: Lab, clients: VsphereClients, bus: BusHandle
) -> None:
    lab.create_vm(VmSpec(name="busy"))
    vm = await discovered(clients, request({"name": "busy"}, mode="warm"))
    await bus.state.update(vm.vm_key, lambda _: VmState(key=vm.vm_key, pass_no=2, passes_synced=1))
    asked = CutoverRequested(request_id=vm.request_id, vm_key=vm.vm_key, plan=vm.plan)

    with pytest.raises(RetryableError, match="still copying") as error:
        await Cutover(clients, bus)(event(asked), Step())
    assert error.value.delay is not None and error.value.delay > 0
