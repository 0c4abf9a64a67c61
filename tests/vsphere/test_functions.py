"""The discover and snapshot functions called as the runner calls them, against vcsim-ferry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.vsphere.conftest import Step
from tests.vsphere.lab import KIB, MIB, Lab, Nic, VmSpec, request
from vmferry.adapters.vsphere.aio import VsphereClients
from vmferry.adapters.vsphere.snapshots import release_pass
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Emit
from vmferry.functions import discover, snapshot
from vmferry.schemas.base import request_key_for, vm_key_for
from vmferry.schemas.events import (
    CbtDeltaRequested,
    CutoverRequested,
    DiskSnapshotReady,
    MigrationAccepted,
    VmDiscovered,
)
from vmferry.schemas.request import MigrationRequest


def accepted(req: MigrationRequest) -> CloudEvent[MigrationAccepted]:
    return CloudEvent(
        id="evt-1",
        type=MigrationAccepted.spec.ce_type,
        source="test",
        subject=request_key_for(req.request_id),
        data=MigrationAccepted(request=req),
    )


def as_event(emit: Emit) -> CloudEvent[Any]:
    return CloudEvent(
        id="evt-2", type=emit.data.spec.ce_type, source="test", subject=emit.vm_key, data=emit.data
    )


async def discovered(clients: VsphereClients, req: MigrationRequest) -> list[Emit]:
    return list(await discover.Discover(clients)(accepted(req), Step()))


def moref_of(emit: Emit) -> str:
    assert isinstance(emit.data, VmDiscovered) and emit.data.identity.moref
    return emit.data.identity.moref


def ready_events(emits: Sequence[Emit]) -> list[DiskSnapshotReady]:
    events = [e.data for e in emits]
    assert all(isinstance(e, DiskSnapshotReady) for e in events)
    return [e for e in events if isinstance(e, DiskSnapshotReady)]


async def test_discover_emits_one_vm_discovered_per_vm_keyed_by_instance_uuid(
    lab: Lab, clients: VsphereClients
) -> None:
    nics = [(Nic(mac=f"00:50:56:dd:00:0{i}"),) for i in range(2)]
    vms = [lab.create_vm(VmSpec(name=f"batch-{i}", folder="batch", nics=nics[i])) for i in range(2)]
    emits = await discovered(clients, request({"folder": "batch"}, mode="warm"))

    by_uuid = {vm.config.instanceUuid: vm for vm in vms}
    assert len(emits) == 2
    for emit in emits:
        event = emit.data
        assert isinstance(event, VmDiscovered)
        assert emit.vm_key == event.vm_key == vm_key_for(event.identity.instance_uuid)
        assert event.identity.moref == by_uuid[event.identity.instance_uuid]._moId
        assert [f.code for f in event.findings] == ["cbt-disabled"]  # warm, CBT off: vmferry enables it
    definition = discover.definition(discover.Discover(clients))
    assert (definition.name, definition.consumes, definition.emits) == (
        "discover",
        MigrationAccepted,
        (VmDiscovered,),
    )


async def test_discover_fails_the_request_naming_every_blocker(lab: Lab, clients: VsphereClients) -> None:
    lab.create_vm(VmSpec(name="fine", folder="mixed"))
    lab.create_vm(VmSpec(name="indep", folder="mixed", disk_mode="independent_persistent"))
    lab.create_vm(VmSpec(name="mac", folder="mixed", guest_id="darwin64Guest", disks=()))

    with pytest.raises(PermanentError) as error:
        await discovered(clients, request({"folder": "mixed"}))

    cause = error.value.cause
    assert cause.startswith("2 VM(s) cannot be migrated as they are")
    assert "VM 'indep'" in cause and "[independent-disk]" in cause and "change the disk mode" in cause
    assert "VM 'mac'" in cause and "[no-disks]" in cause and "[unsupported-guest-os]" in cause
    assert "'fine'" not in cause


async def test_snapshot_enables_cbt_and_emits_one_ready_event_per_disk(
    lab: Lab, clients: VsphereClients
) -> None:
    lab.create_vm(VmSpec(name="three-disks", disks=(4 * MIB, 2 * MIB, MIB)))
    [emit] = await discovered(clients, request({"name": "three-disks"}, mode="warm"))
    handler = snapshot.Snapshot(clients)
    step = Step()

    emits = await handler(as_event(emit), step)

    events = ready_events(emits)
    vm = emit.data
    assert isinstance(vm, VmDiscovered)
    assert [e.disk.key for e in events] == [d.key for d in vm.disks]
    assert len({e.snapshot_moref for e in events}) == 1  # one snapshot covers every disk
    assert {(e.pass_no, e.disk_count, e.final) for e in events} == {(1, 3, False)}
    assert all(e.vm == vm.inventory() for e in events)
    assert all(e.change_id and e.change_id.endswith("/2") for e in events)  # CBT on, after its init cycle
    assert len({x.key for x in emits}) == 3 and {x.vm_key for x in emits} == {vm.vm_key}
    assert step.beats >= 1
    assert lab.vmferry_snapshots() == ["three-disks: vmferry-req-1-pass1"]

    again = ready_events(await handler(as_event(emit), Step(delivery=2)))  # redelivered: same snapshot
    assert again == events
    assert lab.vmferry_snapshots() == ["three-disks: vmferry-req-1-pass1"]
    client = await clients("lab")
    await client.release_pass(moref_of(emit), vm.request_id, 1)
    assert lab.vmferry_snapshots() == []


async def test_a_cold_migration_asks_for_cutover_before_any_snapshot(
    lab: Lab, clients: VsphereClients
) -> None:
    lab.create_vm(VmSpec(name="cold-first"))
    [emit] = await discovered(clients, request({"name": "cold-first"}))
    [asked] = await snapshot.Snapshot(clients)(as_event(emit), Step())
    assert isinstance(asked.data, CutoverRequested) and asked.vm_key == emit.vm_key
    assert lab.vmferry_snapshots() == []


async def test_the_final_pass_without_cbt_carries_no_change_ids(lab: Lab, clients: VsphereClients) -> None:
    lab.create_vm(VmSpec(name="cold-one"))
    [emit] = await discovered(clients, request({"name": "cold-one"}, options={"enable_cbt": False}))
    vm = emit.data
    assert isinstance(vm, VmDiscovered)
    final = CbtDeltaRequested(
        request_id=vm.request_id, vm_key=vm.vm_key, plan=vm.plan, pass_no=1, reason="cutover"
    )
    events = ready_events(await snapshot.PassSnapshot(clients)(as_event(Emit(vm.vm_key, final)), Step()))
    assert [(e.change_id, e.final, e.pass_no) for e in events] == [(None, True, 1)]
    assert events[0].vm == vm.inventory()
    client = await clients("lab")
    assert await client.release_pass(moref_of(emit), "req-1", 1) == 1


async def test_a_vm_whose_disks_changed_since_discovery_is_refused_without_leftovers(
    lab: Lab, clients: VsphereClients
) -> None:
    vm = lab.create_vm(VmSpec(name="changing", disks=(MIB,)))
    [emit] = await discovered(clients, request({"name": "changing"}, mode="warm"))
    grow = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    grow.capacityInKB, grow.capacityInBytes = 2 * KIB, 2 * MIB
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=grow)
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change])))

    with pytest.raises(PermanentError, match="changed while the pass was prepared"):
        await snapshot.Snapshot(clients)(as_event(emit), Step())
    assert lab.vmferry_snapshots() == []


async def test_the_flow_survives_a_session_expiring_between_steps(lab: Lab, clients: VsphereClients) -> None:
    lab.create_vm(VmSpec(name="patient", disks=(MIB, MIB)))
    [emit] = await discovered(clients, request({"name": "patient"}, mode="warm"))
    client = await clients("lab")
    session = await client.run(lambda c: c.current_session())
    assert session is not None
    lab.terminate(session.key)

    events = ready_events(await snapshot.Snapshot(clients)(as_event(emit), Step()))

    assert len(events) == 2 and all(e.change_id for e in events)
    assert client.sync.login_generation == 2
    assert await client.run(release_pass, moref_of(emit), "req-1", 1) == 1
    assert lab.vmferry_snapshots() == []
