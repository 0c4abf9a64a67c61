"""Power control and the privilege check against vcsim-ferry."""

from __future__ import annotations

from pyVim.task import WaitForTask

from tests.vsphere.lab import Lab, VmSpec
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.power import power_state, start_vm, stop_vm
from vmferry.adapters.vsphere.privileges import (
    SEED_DATASTORE_PRIVILEGES,
    SEED_VM_PRIVILEGES,
    PrivilegeReport,
    check_privileges,
    required_privileges,
)


def test_a_running_vm_is_shut_down_by_its_guest(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(VmSpec(name="running"))
    assert start_vm(client, vm._moId) is True
    assert start_vm(client, vm._moId) is False  # already on
    assert power_state(client, vm._moId) == "poweredOn"

    result = stop_vm(client, vm._moId, shutdown_timeout=30)

    assert result.method == "guest-shutdown"
    assert power_state(client, vm._moId) == "poweredOff"
    assert stop_vm(client, vm._moId, shutdown_timeout=30).method == "already-off"


def test_without_a_graceful_window_it_powers_off(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(VmSpec(name="hard"))
    start_vm(client, vm._moId)
    result = stop_vm(client, vm._moId, shutdown_timeout=0)
    assert result.method == "power-off"
    assert power_state(client, vm._moId) == "poweredOff"


def test_a_suspended_vm_is_powered_off(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(VmSpec(name="suspended"))
    WaitForTask(vm.PowerOnVM_Task())
    WaitForTask(vm.SuspendVM_Task())
    result = stop_vm(client, vm._moId, shutdown_timeout=30)
    assert (result.method, result.note) == ("power-off", "the VM was suspended")
    assert power_state(client, vm._moId) == "poweredOff"


def test_the_seed_privilege_table_is_translated_completely() -> None:
    required = required_privileges()
    # the seed's table: 1 datastore privilege, all 5 guest operations, 4 provisioning,
    # 3 service configuration and 4 snapshot privileges
    assert list(SEED_DATASTORE_PRIVILEGES) == ["Datastore.Browse"]
    groups = [p.split(".")[1] for p in SEED_VM_PRIVILEGES]
    assert {g: groups.count(g) for g in set(groups)} == {
        "GuestOperations": 5,
        "Provisioning": 4,
        "Namespace": 3,
        "State": 4,
    }
    assert set(SEED_VM_PRIVILEGES) < set(required["VirtualMachine"])
    assert "VirtualMachine.Config.ChangeTracking" in required["VirtualMachine"]


def test_privileges_on_vcsim_are_all_granted(lab: Lab, client: VsphereClient) -> None:
    # vcsim answers HasPrivilegeOnEntities with "granted" for anything: this proves the call and its
    # parsing, not a real role (a real vCenter with a restricted role is needed for that)
    vm = lab.create_vm(VmSpec(name="checked"))
    datastore = lab.datacenter.datastore[0]
    report = check_privileges(client, [vm._moId], [datastore._moId])
    assert report.answered and report.complete and report.method == "HasPrivilegeOnEntities"
    assert report.findings() == []


def test_missing_privileges_become_warnings_per_entity() -> None:
    report = PrivilegeReport(
        answered=True,
        missing={"vm-42": ["VirtualMachine.State.CreateSnapshot"], "datastore-7": ["Datastore.Browse"]},
    )
    [finding] = report.findings(["vm-42"])
    assert finding.severity == "warning"
    assert "VirtualMachine.State.CreateSnapshot (Snapshot management > Create snapshot)" in finding.message
    assert len(report.findings()) == 2
    unanswered = PrivilegeReport(answered=False, note="MethodNotFound")
    assert [f.code for f in unanswered.findings()] == ["privileges-unchecked"]
