"""vcsim-ferry over real SOAP with pyvmomi: inventory, changeIds and QueryChangedDiskAreas.

Each test gets its own simulator (see conftest.py) whose datastore is a folder of the test, so
the tests write guest data straight into the disks' -flat.vmdk files between snapshots.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl
from pyVmomi.SoapAdapter import SoapStubAdapter

from tests.vsphere.conftest import VcsimServer, thumbprint

MIB = 1024 * 1024
KIB = 1024
DISK_SIZE = 4 * MIB
CHANGE_ID = re.compile(r"^(52(?: [0-9a-f]{2}){7}-[0-9a-f]{2}(?: [0-9a-f]{2}){7})/([0-9]+)$")
NO_TRACK = "vim.hostd.vmsvc.cbt.noTrack"
CANNOT_GET_CHANGES = "vim.hostd.vmsvc.cbt.cannotGetChanges"

Extent = tuple[int, int]  # (start, length) in bytes


@pytest.fixture
def si(vcsim: VcsimServer) -> Iterator[Any]:
    """A pyvmomi session with verified TLS (the simulator's own certificate as CA)."""
    service_instance = SmartConnect(
        host=vcsim.host,
        port=vcsim.port,
        user=vcsim.user,
        pwd=vcsim.password(),
        sslContext=vcsim.ssl_context(),
    )
    yield service_instance
    Disconnect(service_instance)


# -- helpers ---------------------------------------------------------------------------------


def create_vm(si: Any, vcsim: VcsimServer, name: str) -> Any:
    """CreateVM_Task: 3 thin 4 MiB disks on a PVSCSI controller, a vmxnet3 and an e1000e NIC."""
    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
    host = view.view[0]
    view.Destroy()
    dvpg = next(n for n in datacenter.network if isinstance(n, vim.dvs.DistributedVirtualPortgroup))

    controller = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing")
    devices: list[vim.vm.device.VirtualDeviceSpec] = [
        vim.vm.device.VirtualDeviceSpec(operation="add", device=controller)
    ]
    for unit in range(3):
        disk = vim.vm.device.VirtualDisk(
            key=-(unit + 1),
            controllerKey=1000,
            unitNumber=unit,
            capacityInKB=DISK_SIZE // KIB,
            capacityInBytes=DISK_SIZE,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{vcsim.datastore}]", diskMode="persistent", thinProvisioned=True
            ),
        )
        devices.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
    standard = vim.vm.device.VirtualVmxnet3(
        key=-10,
        addressType="manual",
        macAddress="00:50:56:aa:00:01",
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
    )
    distributed = vim.vm.device.VirtualE1000e(
        key=-11,
        addressType="manual",
        macAddress="00:50:56:aa:00:02",
        backing=vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(
                portgroupKey=dvpg.key, switchUuid=dvpg.config.distributedVirtualSwitch.uuid
            )
        ),
    )
    devices += [
        vim.vm.device.VirtualDeviceSpec(operation="add", device=nic) for nic in (standard, distributed)
    ]
    spec = vim.vm.ConfigSpec(
        name=name,
        guestId="rhel8_64Guest",
        numCPUs=1,
        memoryMB=128,
        files=vim.vm.FileInfo(vmPathName=f"[{vcsim.datastore}]"),
        deviceChange=devices,
    )
    task = datacenter.vmFolder.CreateVM_Task(config=spec, pool=host.parent.resourcePool, host=host)
    WaitForTask(task)
    return task.info.result


def set_cbt(vm: Any, enabled: bool) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=enabled)))


def snapshot(vm: Any, name: str) -> Any:
    task = vm.CreateSnapshot_Task(name=name, memory=False, quiesce=False)
    WaitForTask(task)
    return task.info.result


def disks(devices: Iterable[Any]) -> list[Any]:
    return sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.key)


def flat_file(vcsim: VcsimServer, disk: Any) -> Path:
    """The local file holding a disk's bytes: "[ferry] vm/vm.vmdk" -> <datastore>/vm/vm-flat.vmdk."""
    relative = disk.backing.fileName.split("] ", 1)[1]
    return vcsim.datastore_dir / relative.replace(".vmdk", "-flat.vmdk", 1)


def write(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def merge(extents: Iterable[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for start, length in sorted(extents):
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


def blocks_of(writes: Iterable[Extent], block_size: int) -> list[Extent]:
    """The blocks a list of byte ranges touches, as merged extents: the expected CBT answer."""
    touched = {
        index
        for offset, length in writes
        for index in range(offset // block_size, (offset + length - 1) // block_size + 1)
    }
    return merge((index * block_size, block_size) for index in touched)


def changed_areas(
    vm: Any, snap: Any, disk: Any, change_id: str, vcsim: VcsimServer
) -> tuple[list[Extent], int]:
    """QueryChangedDiskAreas paged until the disk's end, like a real client must; checks each page."""
    offset, pages, areas = 0, 0, []
    while offset < disk.capacityInBytes:
        info = vm.QueryChangedDiskAreas(
            snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId=change_id
        )
        assert info.startOffset == offset
        assert 0 < info.length <= vcsim.page_span
        assert len(info.changedArea) <= vcsim.page_extents
        for area in info.changedArea:
            assert offset <= area.start and area.start + area.length <= offset + info.length
            areas.append((area.start, area.length))
        offset += info.length
        pages += 1
    assert offset == disk.capacityInBytes
    return merge(areas), pages


def change_id_parts(change_id: str) -> tuple[str, int]:
    match = CHANGE_ID.match(change_id)
    assert match, f"not a vSphere changeId: {change_id!r}"
    return match.group(1), int(match.group(2))


def fault_key(fault: vmodl.MethodFault) -> str:
    return str(fault.faultMessage[0].key)


# -- tests -----------------------------------------------------------------------------------


def test_fixture_reports_the_servers_identity(vcsim: VcsimServer) -> None:
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((vcsim.host, vcsim.port)))
    assert thumbprint(der, "sha256") == vcsim.thumbprint_sha256
    assert thumbprint(der, "sha1") == vcsim.thumbprint_sha1
    assert vcsim.url == f"https://127.0.0.1:{vcsim.port}/sdk"
    assert vcsim.password_file.stat().st_mode & 0o777 == 0o600
    # SmartConnect leaks its socket when the login fails, so use a stub this test closes.
    stub = SoapStubAdapter(host=vcsim.host, port=vcsim.port, sslContext=vcsim.ssl_context())
    try:
        with pytest.raises(vim.fault.InvalidLogin):
            vim.ServiceInstance("ServiceInstance", stub).content.sessionManager.Login(vcsim.user, "wrong")
    finally:
        stub.DropConnections()


def test_create_vm_keeps_disks_and_nics_in_the_tests_datastore(si: Any, vcsim: VcsimServer) -> None:
    vm = create_vm(si, vcsim, "inventory")

    devices = vm.config.hardware.device
    nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert sorted(n.macAddress for n in nics) == ["00:50:56:aa:00:01", "00:50:56:aa:00:02"]
    assert [d.capacityInBytes for d in disks(devices)] == [DISK_SIZE] * 3
    for disk in disks(devices):
        assert flat_file(vcsim, disk).is_file()
        assert disk.backing.changeId is None  # CBT is off


def test_star_returns_the_allocated_areas_at_the_snapshot(si: Any, vcsim: VcsimServer) -> None:
    vm = create_vm(si, vcsim, "star")
    set_cbt(vm, True)
    first = disks(vm.config.hardware.device)[0]
    written = [(0, 1 * MIB), (2 * MIB + 100 * KIB, 200 * KIB)]
    for offset, length in written:
        write(flat_file(vcsim, first), offset, os.urandom(length))

    snap = snapshot(vm, "seed")

    snap_disks, vm_disks = disks(snap.config.hardware.device), disks(vm.config.hardware.device)
    epochs = set()
    for at_snapshot, current in zip(snap_disks, vm_disks, strict=True):
        epoch, sequence = change_id_parts(at_snapshot.backing.changeId)
        assert sequence == 1
        assert current.backing.changeId == at_snapshot.backing.changeId
        epochs.add(epoch)
    assert len(epochs) == 3  # every disk tracks changes on its own

    areas, pages = changed_areas(vm, snap, snap_disks[0], "*", vcsim)
    assert areas == blocks_of(written, vcsim.block_size)
    assert pages >= DISK_SIZE // vcsim.page_span
    assert changed_areas(vm, snap, snap_disks[1], "*", vcsim)[0] == []  # never written: no areas


def test_changed_areas_since_an_earlier_changeid_are_exactly_the_changed_blocks(
    si: Any, vcsim: VcsimServer
) -> None:
    vm = create_vm(si, vcsim, "delta")
    set_cbt(vm, True)
    disk = disks(vm.config.hardware.device)[0]
    data = flat_file(vcsim, disk)
    write(data, 0, os.urandom(DISK_SIZE))
    first = snapshot(vm, "pass-1")
    first_ids = [d.backing.changeId for d in disks(first.config.hardware.device)]
    WaitForTask(vm.RemoveAllSnapshots_Task())  # vmferry keeps the changeId, not the snapshot

    changed = [
        (100 * KIB + 5, 10),  # a few bytes inside block 1
        (1 * MIB + 32 * KIB, 70 * KIB),  # across blocks 16 and 17
        (2560 * KIB, 1),  # block 40
        (2880 * KIB, 64 * KIB),  # block 45, exactly
        (3 * MIB + 100 * KIB, 200 * KIB),  # blocks 49..52
        (DISK_SIZE - 1, 1),  # the last byte
    ]
    for offset, length in changed:
        write(data, offset, os.urandom(length))
    write(data, 2 * MIB, bytes(64 * KIB))  # block 32 zeroed: changed too
    changed.append((2 * MIB, 64 * KIB))
    with data.open("rb") as f:  # rewriting block 8 with its own bytes changes nothing
        f.seek(512 * KIB)
        same = f.read(64 * KIB)
    write(data, 512 * KIB, same)
    second = snapshot(vm, "pass-2")

    second_disks = disks(second.config.hardware.device)
    for before, after in zip(first_ids, second_disks, strict=True):
        epoch, sequence = change_id_parts(after.backing.changeId)
        assert (epoch, sequence) == (change_id_parts(before)[0], change_id_parts(before)[1] + 1)

    areas, pages = changed_areas(vm, second, second_disks[0], first_ids[0], vcsim)
    assert areas == blocks_of(changed, vcsim.block_size)
    assert pages > DISK_SIZE // vcsim.page_span  # the extent limit cut a page short
    assert changed_areas(vm, second, second_disks[1], first_ids[1], vcsim)[0] == []
    assert changed_areas(vm, second, second_disks[0], second_disks[0].backing.changeId, vcsim)[0] == []


def test_bad_queries_fault_like_vsphere(si: Any, vcsim: VcsimServer) -> None:
    vm = create_vm(si, vcsim, "faults")
    set_cbt(vm, True)
    snap = snapshot(vm, "s")
    disk = disks(snap.config.hardware.device)[0]
    epoch, sequence = change_id_parts(disk.backing.changeId)

    def query(**overrides: Any) -> Any:
        args = {"snapshot": snap, "deviceKey": disk.key, "startOffset": 0, "changeId": "*"} | overrides
        return vm.QueryChangedDiskAreas(**args)

    unknown_epoch = "52 00 11 22 33 44 55 66-77 88 99 aa bb cc dd ee/1"
    for change_id in (unknown_epoch, f"{epoch}/{sequence + 5}"):
        with pytest.raises(vim.fault.FileFault) as fault:
            query(changeId=change_id)
        assert fault.value.msg == f"Error caused by file {fault.value.file}"
        assert fault.value.file.endswith("/faults/faults.vmdk")
        assert fault_key(fault.value) == CANNOT_GET_CHANGES
    for overrides, parameter in (
        ({"changeId": "not-a-change-id"}, "changeId"),
        ({"startOffset": DISK_SIZE}, "startOffset"),
        ({"deviceKey": 999_999}, "deviceKey"),
    ):
        with pytest.raises(vmodl.fault.InvalidArgument) as invalid:
            query(**overrides)
        assert invalid.value.invalidProperty == parameter


def test_toggling_cbt_starts_a_new_epoch(si: Any, vcsim: VcsimServer) -> None:
    vm = create_vm(si, vcsim, "toggle")
    set_cbt(vm, True)
    before = snapshot(vm, "before")
    old_id = disks(before.config.hardware.device)[0].backing.changeId
    old_epoch, _ = change_id_parts(old_id)

    set_cbt(vm, False)
    assert all(d.backing.changeId is None for d in disks(vm.config.hardware.device))
    with pytest.raises(vim.fault.FileFault) as off:
        vm.QueryChangedDiskAreas(snapshot=before, deviceKey=disks(vm.config.hardware.device)[0].key,
                                 startOffset=0, changeId="*")  # fmt: skip
    assert fault_key(off.value) == NO_TRACK

    set_cbt(vm, True)
    after = snapshot(vm, "after")
    disk = disks(after.config.hardware.device)[0]
    new_epoch, sequence = change_id_parts(disk.backing.changeId)
    assert new_epoch != old_epoch
    assert sequence == 1
    assert disks(before.config.hardware.device)[0].backing.changeId == old_id  # snapshots keep theirs
    with pytest.raises(vim.fault.FileFault) as reset:
        vm.QueryChangedDiskAreas(snapshot=after, deviceKey=disk.key, startOffset=0, changeId=old_id)
    assert fault_key(reset.value) == CANNOT_GET_CHANGES


def test_snapshot_without_cbt_has_no_changeid(si: Any, vcsim: VcsimServer) -> None:
    vm = create_vm(si, vcsim, "untracked")
    snap = snapshot(vm, "plain")
    disk = disks(snap.config.hardware.device)[0]
    assert disk.backing.changeId is None
    with pytest.raises(vim.fault.FileFault) as fault:
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=0, changeId="*")
    assert fault_key(fault.value) == NO_TRACK


def test_without_a_snapshot_a_powered_off_vms_current_disk_is_compared(si: Any, vcsim: VcsimServer) -> None:
    vm = create_vm(si, vcsim, "live")
    set_cbt(vm, True)
    disk = disks(snapshot(vm, "base").config.hardware.device)[0]
    write(flat_file(vcsim, disk), 3 * MIB, os.urandom(10))

    areas, _ = changed_areas(vm, None, disk, disk.backing.changeId, vcsim)
    assert areas == blocks_of([(3 * MIB, 10)], vcsim.block_size)

    WaitForTask(vm.PowerOnVM_Task())
    with pytest.raises(vim.fault.InvalidPowerState):
        vm.QueryChangedDiskAreas(snapshot=None, deviceKey=disk.key, startOffset=0, changeId="*")
