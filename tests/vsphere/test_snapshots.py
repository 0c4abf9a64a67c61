"""Snapshots and CBT against vcsim-ferry: one snapshot per pass over all disks, changeIds, keeping the
previous pass until it is recorded, cleanup on failure, sweeping, changed areas from real bytes
written into the disks' -flat.vmdk files, and CBT resets. No test leaves a vmferry snapshot behind
(the ``lab`` fixture asserts it after every test)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.vsphere.lab import KIB, MIB, Lab, VmSpec, blocks_of, write
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import find_vm
from vmferry.adapters.vsphere.snapshots import (
    PassSnapshot,
    _page_areas,
    change_id_epoch,
    changed_areas,
    enable_cbt,
    list_vmferry_snapshots,
    merge_extents,
    parse_description,
    release_pass,
    snapshots_of,
    sweep,
    take_pass_snapshot,
)
from vmferry.bus.errors import PermanentError

DISK = 4 * MIB
VM_KEY = "vm-0123456789abcdef0123456789abcdef"


def make_vm(lab: Lab, name: str, cbt: bool = True, disks: int = 3) -> vim.VirtualMachine:
    return lab.create_vm(VmSpec(name=name, disks=(DISK,) * disks, cbt=cbt))


def take(client: VsphereClient, vm: vim.VirtualMachine, pass_no: int, **options: object) -> PassSnapshot:
    return take_pass_snapshot(client, vm._moId, request_id="req-1", vm_key=VM_KEY, pass_no=pass_no, **options)


def names_on(client: VsphereClient, vm: vim.VirtualMachine) -> list[str]:
    return [s.name for s in snapshots_of(client, vm._moId)]


def test_one_snapshot_per_pass_covers_all_disks_and_the_previous_stays_until_recorded(
    lab: Lab, client: VsphereClient
) -> None:
    vm = make_vm(lab, "passes")
    disk_keys = sorted(d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))

    first = take(client, vm, 1, require_change_ids=True)

    assert first.created and first.name == "vmferry-req-1-pass1"
    assert [d.key for d in first.disks] == disk_keys
    assert all(d.change_id and d.change_id.endswith("/1") for d in first.disks)
    assert len({change_id_epoch(d.change_id or "") for d in first.disks}) == 3  # one epoch per disk
    [node] = snapshots_of(client, vm._moId)
    assert parse_description(node.description) == {"vm": VM_KEY, "request": "req-1", "pass": "1"}

    again = take(client, vm, 1)  # a redelivery finds the snapshot instead of taking another
    assert (again.snapshot_moref, again.created) == (first.snapshot_moref, False)
    assert again.disks == first.disks

    second = take(client, vm, 2)
    assert names_on(client, vm) == ["vmferry-req-1-pass1", "vmferry-req-1-pass2"]  # pass 1 not recorded yet
    assert all(d.change_id and d.change_id.endswith("/2") for d in second.disks)

    assert release_pass(client, vm._moId, "req-1", 1) == 1  # pass 1 recorded: its snapshot goes
    assert names_on(client, vm) == ["vmferry-req-1-pass2"]
    assert release_pass(client, vm._moId, "req-1", 1) == 0

    take(client, vm, 3, previous_recorded=True)  # pass 2 recorded: removed once pass 3 exists
    assert names_on(client, vm) == ["vmferry-req-1-pass3"]
    release_pass(client, vm._moId, "req-1", 3)
    assert lab.vmferry_snapshots() == []


def test_enable_cbt_turns_tracking_on_with_a_snapshot_cycle(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "untracked", cbt=False)
    WaitForTask(vm.CreateSnapshot_Task(name="user snapshot", memory=False, quiesce=False))

    assert enable_cbt(client, vm._moId, "req-1") is True
    assert vm.config.changeTrackingEnabled
    assert names_on(client, vm) == ["user snapshot"]  # the activation snapshot is gone again
    assert enable_cbt(client, vm._moId, "req-1") is False  # already on

    taken = take(client, vm, 1, require_change_ids=True)
    assert all(d.change_id for d in taken.disks)
    release_pass(client, vm._moId, "req-1", 1)
    assert lab.vmferry_snapshots() == []


def test_a_disk_with_tracking_switched_off_is_switched_on(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "one-disk-off", cbt=True, disks=2)
    off = vim.option.OptionValue(key="scsi0:1.ctkEnabled", value="FALSE")
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[off])))

    assert enable_cbt(client, vm._moId, "req-1") is True

    settings = {o.key: o.value for o in vm.config.extraConfig}
    assert settings["scsi0:1.ctkEnabled"] == "TRUE"
    assert lab.vmferry_snapshots() == []


def test_a_snapshot_without_tracking_is_removed_and_the_error_says_why(
    lab: Lab, client: VsphereClient
) -> None:
    vm = make_vm(lab, "no-cbt", cbt=False)
    with pytest.raises(PermanentError) as error:
        take(client, vm, 1, require_change_ids=True)
    assert "changed block tracking is not active" in error.value.cause
    assert names_on(client, vm) == []
    assert lab.vmferry_snapshots() == []


def test_whatever_fails_after_the_snapshot_exists_removes_it(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "vetoed")

    def broken(_taken: PassSnapshot) -> None:
        raise RuntimeError("the caller failed while recording the snapshot")

    with pytest.raises(RuntimeError):
        take(client, vm, 1, check=broken)
    assert names_on(client, vm) == []
    assert lab.vmferry_snapshots() == []


def test_sweep_removes_stale_vmferry_snapshots_only(lab: Lab, client: VsphereClient) -> None:
    old, new = make_vm(lab, "old run", disks=1), make_vm(lab, "new run", disks=1)
    take_pass_snapshot(client, old._moId, request_id="old", vm_key=VM_KEY, pass_no=1)
    take_pass_snapshot(client, old._moId, request_id="old", vm_key=VM_KEY, pass_no=2)
    take_pass_snapshot(client, new._moId, request_id="new", vm_key=VM_KEY, pass_no=1)
    WaitForTask(old.CreateSnapshot_Task(name="keep me", memory=False, quiesce=False))

    listed = sorted(s.name for s in list_vmferry_snapshots(client))
    assert listed == ["vmferry-new-pass1", "vmferry-old-pass1", "vmferry-old-pass2"]
    assert sweep(client, older_than=timedelta(hours=1)) == []  # all are fresh
    removed = sweep(client, request_id="old")
    assert sorted(s.name for s in removed) == ["vmferry-old-pass1", "vmferry-old-pass2"]
    assert {s.vm_name for s in removed} == {"old run"}
    assert [s.name for s in sweep(client)] == ["vmferry-new-pass1"]
    assert names_on(client, old) == ["keep me"]
    assert lab.vmferry_snapshots() == []


def test_changed_areas_are_the_blocks_written_between_passes(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "writer")
    block = lab.vcsim.block_size
    first = take(client, vm, 1, require_change_ids=True)
    files = {d.key: lab.flat_file(d.backing_file) for d in first.disks}
    keys = sorted(files)
    # the seed: written before pass 1 (vcsim-ferry hashes at snapshot time, so retake pass 1)
    release_pass(client, vm._moId, "req-1", 1)
    seed = [(0, 300 * KIB), (2 * MIB + 5, 70 * KIB)]
    for offset, length in seed:
        write(files[keys[0]], offset, os.urandom(length))
    first = take(client, vm, 1, require_change_ids=True)

    full = changed_areas(client, vm._moId, first.snapshot_moref, first.disk(keys[0]), None)
    assert full.full_copy and full.base_change_id == "*"
    assert list(full.areas) == blocks_of(seed, block)
    assert changed_areas(client, vm._moId, first.snapshot_moref, first.disk(keys[1]), None).areas == ()

    release_pass(client, vm._moId, "req-1", 1)  # pass 1 is "recorded"
    changes = {
        keys[0]: [(100 * KIB + 7, 10), (1 * MIB + 32 * KIB, 70 * KIB), (3 * MIB, 1), (DISK - 1, 1)],
        keys[2]: [(0, 1), (2 * MIB, 3 * block)],
    }
    for key, writes in changes.items():
        for offset, length in writes:
            write(files[key], offset, os.urandom(length))
    second = take(client, vm, 2, require_change_ids=True)

    for key in keys:
        base = first.disk(key).change_id
        delta = changed_areas(client, vm._moId, second.snapshot_moref, second.disk(key), base)
        assert not delta.full_copy
        assert delta.change_id == second.disk(key).change_id
        assert list(delta.areas) == blocks_of(changes.get(key, []), block)
        assert delta.total_bytes == sum(length for _, length in delta.areas)
    release_pass(client, vm._moId, "req-1", 2)
    assert lab.vmferry_snapshots() == []


def test_a_cbt_reset_forces_a_full_copy(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "reset", disks=1)
    first = take(client, vm, 1, require_change_ids=True)
    [key] = [d.key for d in first.disks]
    write(lab.flat_file(first.disks[0].backing_file), 0, os.urandom(block := lab.vcsim.block_size))
    base = first.disk(key).change_id
    assert base is not None
    release_pass(client, vm._moId, "req-1", 1)
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert enable_cbt(client, vm._moId, "req-1")  # back on: a new tracking epoch

    second = take(client, vm, 2, require_change_ids=True)
    after = changed_areas(client, vm._moId, second.snapshot_moref, second.disk(key), base)

    assert after.full_copy and "CBT was reset" in after.reason
    assert list(after.areas) == blocks_of([(0, block)], block)  # everything allocated
    # same epoch, but a changeId ESXi never issued: the fault also means "full copy"
    unknown = f"{change_id_epoch(second.disk(key).change_id or '')}/99"
    faulted = changed_areas(client, vm._moId, second.snapshot_moref, second.disk(key), unknown)
    assert faulted.full_copy and "CBT reset" in faulted.reason
    release_pass(client, vm._moId, "req-1", 2)
    assert lab.vmferry_snapshots() == []


def test_without_tracking_the_whole_disk_is_copied(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "plain", cbt=False, disks=1)
    taken = take(client, vm, 1)
    [disk] = taken.disks
    assert disk.change_id is None
    areas = changed_areas(client, vm._moId, taken.snapshot_moref, disk, None)
    assert areas.full_copy and list(areas.areas) == [(0, DISK)]
    release_pass(client, vm._moId, "req-1", 1)
    assert lab.vmferry_snapshots() == []


def test_an_expired_session_mid_run_is_replaced(lab: Lab, client: VsphereClient) -> None:
    vm = make_vm(lab, "long run", disks=1)
    first = take(client, vm, 1, require_change_ids=True)
    [key] = [d.key for d in first.disks]
    write(lab.flat_file(first.disks[0].backing_file), MIB, b"changed")
    lab.terminate(_session_key(client))  # e.g. vCenter's idle timeout during a long first copy

    second = take(client, vm, 2, require_change_ids=True, previous_recorded=True)
    assert client.login_generation == 2
    delta = changed_areas(
        client, vm._moId, second.snapshot_moref, second.disk(key), first.disk(key).change_id
    )
    assert list(delta.areas) == blocks_of([(MIB, 7)], lab.vcsim.block_size)

    # QueryChangedDiskAreas as the first call after an expiry: the fault must name VirtualMachine
    # (vcsim-ferry's redirect must not leak its endpoint type), so the client logs in again.
    lab.terminate(_session_key(client))
    again = changed_areas(
        client, vm._moId, second.snapshot_moref, second.disk(key), first.disk(key).change_id
    )
    assert again.areas == delta.areas
    assert client.login_generation == 3

    lab.terminate(_session_key(client))
    assert release_pass(client, vm._moId, "req-1", 2) == 1
    assert client.login_generation == 4
    assert lab.vmferry_snapshots() == []


def _session_key(client: VsphereClient) -> str:
    session = client.current_session()
    assert session is not None
    return str(session.key)


def change_info(start: int, length: int, *areas: tuple[int, int]) -> vim.VirtualMachine.DiskChangeInfo:
    extents = [vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent(start=s, length=n) for s, n in areas]
    return vim.VirtualMachine.DiskChangeInfo(startOffset=start, length=length, changedArea=extents)


def test_inconsistent_answers_are_refused() -> None:
    capacity = 8 * MIB
    assert _page_areas(change_info(0, MIB, (0, 10), (20, 5)), 0, capacity, 1, 0) == ([(0, 10), (20, 5)], MIB)
    bad = [
        (change_info(0, 0), 0, "does not continue"),  # empty page: would loop forever
        (change_info(MIB, MIB), 0, "does not continue"),  # skips bytes
        (change_info(0, MIB, (MIB - 10, 20)), 0, "outside its page"),
        (change_info(0, 16 * MIB, (capacity, 10)), 0, "outside the"),
        (change_info(0, MIB, (20, 5), (0, 10)), 0, "overlaps or precedes"),
        (change_info(0, MIB, (0, 10), (5, 10)), 0, "overlaps or precedes"),
        (change_info(0, MIB, (0, 0)), 0, "outside the"),
    ]
    for info, offset, message in bad:
        with pytest.raises(PermanentError, match=message):
            _page_areas(info, offset, capacity, 1, 0)
    assert merge_extents([(10, 5), (0, 10), (30, 1), (15, 1)]) == [(0, 16), (30, 1)]


def test_vms_are_found_by_uuid_after_changed_block_queries(lab: Lab, client: VsphereClient) -> None:
    """vcsim-ferry registers a helper object per queried VM; lookups walking the inventory must
    survive it (they used to panic whenever the walk reached it before the VM)."""
    vms = [make_vm(lab, f"queried-{i}", disks=1) for i in range(4)]
    for vm in vms:
        taken = take(client, vm, 1, require_change_ids=True)
        changed_areas(client, vm._moId, taken.snapshot_moref, taken.disks[0], None)
        release_pass(client, vm._moId, "req-1", 1)
    for _ in range(10):  # the walk's order is random: repeat it
        assert [find_vm(client, vm.config.instanceUuid) for vm in vms] == [vm._moId for vm in vms]
