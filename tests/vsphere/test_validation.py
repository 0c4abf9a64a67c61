"""The validation catalogue: findings for VMs discovered from vcsim-ferry where the simulator can
build the case, and for inventories built by hand where it cannot (RDM, shared disks, passthrough)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace as replace_facts

import msgspec
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.vsphere.lab import MIB, Lab, Nic, VmSpec, request
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import DiscoveredVm, SnapshotNode, discover
from vmferry.adapters.vsphere.validation import blockers, validate
from vmferry.schemas.events import DiskInfo, Finding
from vmferry.schemas.request import MigrationOptions, Mode


def found(lab: Lab, client: VsphereClient, spec: VmSpec) -> DiscoveredVm:
    vm = lab.create_vm(spec)
    [result] = discover(client, request({"moref": vm._moId}))
    return result


def codes(findings: Sequence[Finding]) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def check(vm: DiscoveredVm, mode: Mode = "cold", **options: object) -> dict[str, str]:
    return codes(validate(vm, mode, msgspec.convert(options, MigrationOptions)))


def test_a_plain_linux_vm_has_nothing_to_report(lab: Lab, client: VsphereClient) -> None:
    vm = found(lab, client, VmSpec(name="clean", cbt=True, nics=(Nic(mac="00:50:56:cc:00:01"),)))
    assert check(vm, "warm") == {}
    assert check(vm, "cold") == {}


def test_cbt_off_is_a_warning_when_vmferry_may_enable_it_and_a_blocker_otherwise(
    lab: Lab, client: VsphereClient
) -> None:
    vm = found(lab, client, VmSpec(name="no-cbt"))
    assert check(vm, "warm") == {"cbt-disabled": "warning"}
    assert check(vm, "warm", enable_cbt=False) == {"cbt-disabled": "blocker"}
    assert check(vm, "cold") == {}
    one_disk_off = replace_disk(with_cbt(vm), 0, cbt_enabled=False)
    assert check(one_disk_off, "warm", enable_cbt=False) == {"cbt-disabled-disk": "blocker"}


def test_snapshots_and_consolidation(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(VmSpec(name="snapped"))
    WaitForTask(vm.CreateSnapshot_Task(name="before patching", memory=False, quiesce=False))
    [discovered] = discover(client, request({"moref": vm._moId}))
    assert check(discovered) == {"existing-snapshots": "warning"}
    own = SnapshotNode("vmferry-old-pass3", "snapshot-1", "vmferry vm=x", "vmferry-old-pass3")
    stale = replace_facts(discovered.facts, snapshots=(own,), consolidation_needed=True)
    assert check(DiscoveredVm(discovered.vm, stale)) == {
        "consolidation-needed": "blocker",
        "stale-vmferry-snapshots": "warning",
    }


def test_independent_and_empty_disks_and_vms_without_disks_are_blocked(
    lab: Lab, client: VsphereClient
) -> None:
    independent = found(lab, client, VmSpec(name="indep", disk_mode="independent_persistent"))
    assert check(independent) == {"independent-disk": "blocker"}
    assert not independent.vm.disks[0].cbt_enabled  # snapshots, hence CBT, skip independent disks
    assert check(found(lab, client, VmSpec(name="diskless", disks=()))) == {"no-disks": "blocker"}
    empty = found(lab, client, VmSpec(name="empty-disk", disks=(4 * MIB, 0)))
    assert check(empty) == {"zero-size-disk": "blocker"}


def test_rdm_and_shared_disks_are_blocked(lab: Lab, client: VsphereClient) -> None:
    vm = found(lab, client, VmSpec(name="base", disks=(MIB, MIB, MIB)))
    rdm = replace_disk(vm, 0, rdm=True)
    rdm = DiscoveredVm(rdm.vm, replace_facts(rdm.facts, rdm_modes={rdm.vm.disks[0].key: "physicalMode"}))
    assert check(rdm) == {"rdm-disk": "blocker"}
    assert check(replace_disk(vm, 1, sharing="sharingMultiWriter")) == {"shared-disk": "blocker"}
    bus_shared = DiscoveredVm(vm.vm, replace_facts(vm.facts, shared_bus_disks=(vm.vm.disks[2].key,)))
    assert check(bus_shared) == {"shared-disk": "blocker"}


def test_host_bound_devices(lab: Lab, client: VsphereClient) -> None:
    vm = found(lab, client, VmSpec(name="devices"))
    devices = (
        ("pci-passthrough", "PCI device 0"),
        ("vgpu", "PCI device 1"),
        ("sriov-nic", "Network adapter 3"),
        ("usb-device", "USB 1"),
        ("vtpm", "Virtual TPM"),
    )
    loaded = DiscoveredVm(vm.vm, replace_facts(vm.facts, special_devices=devices))
    assert check(loaded) == {
        "pci-passthrough": "blocker",
        "vgpu": "blocker",
        "sriov-nic": "warning",
        "usb-device": "warning",
        "vtpm": "warning",
    }


def test_guest_operating_systems(lab: Lab, client: VsphereClient) -> None:
    assert check(found(lab, client, VmSpec(name="mac", guest_id="darwin64Guest"))) == {
        "unsupported-guest-os": "blocker"
    }
    assert check(found(lab, client, VmSpec(name="mystery", guest_id="otherGuest64"))) == {
        "unknown-guest-os": "warning"
    }
    assert check(found(lab, client, VmSpec(name="win", guest_id="windows2019srv_64Guest"))) == {}


def test_static_ips_need_running_tools(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(VmSpec(name="static", nics=(Nic(mac="00:50:56:cc:00:02"),)))
    WaitForTask(vm.PowerOnVM_Task())
    [discovered] = discover(client, request({"moref": vm._moId}))
    findings = validate(discovered, "cold", MigrationOptions(preserve_ip=True))
    assert codes(findings) == {"static-ip-without-tools": "blocker"}
    assert "guestToolsNotRunning" in findings[0].message and "preserve_ip" in findings[0].fix
    assert check(discovered) == {}  # not asked for: nothing to say
    running = DiscoveredVm(discovered.vm, replace_facts(discovered.facts, tools_running=True))
    assert check(running, preserve_ip=True) == {"nic-without-ip": "warning"}


def test_awkward_names_are_reported_not_blocked(lab: Lab, client: VsphereClient) -> None:
    for name in ("a%2fb", " padded ", "Zürich", "x" * 70, 'say "hi"'):
        findings = validate(found(lab, client, VmSpec(name=name)), "cold", MigrationOptions())
        assert codes(findings) == {"vm-name": "warning"}, name
    vm = found(lab, client, VmSpec(name="fine-name_01.example"))
    assert check(vm) == {}
    nameless = msgspec.structs.replace(vm.vm, identity=msgspec.structs.replace(vm.vm.identity, name=" "))
    assert check(DiscoveredVm(nameless, vm.facts)) == {"empty-name": "blocker"}


def test_templates_are_blocked_and_suspended_vms_warned_about(lab: Lab, client: VsphereClient) -> None:
    template = lab.create_vm(VmSpec(name="golden"))
    template.MarkAsTemplate()
    [discovered] = discover(client, request({"moref": template._moId}))
    assert check(discovered) == {"template": "blocker"}
    sleeping = lab.create_vm(VmSpec(name="sleeping"))
    WaitForTask(sleeping.PowerOnVM_Task())
    WaitForTask(sleeping.SuspendVM_Task())
    [discovered] = discover(client, request({"moref": sleeping._moId}))
    assert discovered.vm.power_state == "suspended"
    assert check(discovered) == {"suspended": "warning"}


def test_blockers_come_first_and_secure_boot_is_a_warning(lab: Lab, client: VsphereClient) -> None:
    vm = found(lab, client, VmSpec(name="Ärger", firmware="efi", disks=()))
    secure = DiscoveredVm(msgspec.structs.replace(vm.vm, secure_boot=True), vm.facts)
    findings = validate(secure, "cold", MigrationOptions())
    assert [f.code for f in findings] == ["no-disks", "secure-boot", "vm-name"]
    assert [f.code for f in blockers(findings)] == ["no-disks"]
    assert all(f.message and f.fix for f in findings)


# -- helpers for inventories vcsim cannot produce ------------------------------------------------


def with_cbt(vm: DiscoveredVm) -> DiscoveredVm:
    disks = [msgspec.structs.replace(d, cbt_enabled=True) for d in vm.vm.disks]
    return DiscoveredVm(
        msgspec.structs.replace(vm.vm, disks=disks), replace_facts(vm.facts, cbt_enabled=True)
    )


def replace_disk(vm: DiscoveredVm, index: int, **changes: object) -> DiscoveredVm:
    disks: list[DiskInfo] = list(vm.vm.disks)
    disks[index] = msgspec.structs.replace(disks[index], **changes)
    return DiscoveredVm(msgspec.structs.replace(vm.vm, disks=disks), vm.facts)


def test_passthrough_and_usb_devices_are_found_on_a_real_vm(lab: Lab, client: VsphereClient) -> None:
    gpu = vim.vm.device.VirtualPCIPassthrough(
        key=-50,
        backing=vim.vm.device.VirtualPCIPassthrough.DeviceBackingInfo(
            id="0000:3b:00.0", deviceId="1eb8", systemId="5e3c-aa", vendorId=0x10DE, deviceName="Tesla T4"
        ),
    )
    usb = vim.vm.device.VirtualUSB(
        key=-51, backing=vim.vm.device.VirtualUSB.USBBackingInfo(deviceName="path:1/0/0 version:2")
    )
    vm = found(lab, client, VmSpec(name="gpu", extra_devices=(gpu, usb)))
    assert [code for code, _ in vm.facts.special_devices] == ["pci-passthrough", "usb-device"]
    assert check(vm) == {"pci-passthrough": "blocker", "usb-device": "warning"}
