"""The convert function against the OpenStack lab with injected tool failures (no appliance starts).

In-place mode: a failure that stops virt-v2v before it writes leaves the replica convertible, one that may
have written refuses a second run (virt-v2v is not idempotent). Clone mode: a leftover clone of a crashed
attempt is replaced, and marks interrupted part-way are completed without converting again. The logs of
each attempt are stored and readable."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conversion.conftest import file_digest
from tests.convert.conftest import CACHE, Step, Vm, failing_tool, handler
from tests.openstack.conftest import OpenStackLab
from vmferry.adapters.conversion import HostConfig
from vmferry.adapters.openstack import clones, compute
from vmferry.adapters.openstack.clones import (
    ATTEMPT_KEY,
    SOURCE_KEY,
    STATE_KEY,
    ConversionState,
    ConvertedMark,
)
from vmferry.bus.errors import PermanentError
from vmferry.bus.handles import BusHandle
from vmferry.schemas.events import ConversionDone, GuestInspection

pytestmark = [pytest.mark.timeout(600)]

NO_ROOT = (
    "virt-v2v-in-place: error: inspection could not detect the source guest (or physical machine).",
    "",
    "No root device found in this operating system image.",
)
MIDWAY = (
    "[  80.1] Converting Debian GNU/Linux 12 (bookworm) to run on KVM",
    "virt-v2v-in-place: error: libguestfs error: command failed: update-initramfs exited with 1",
)


def broken_host(tmp_path: Path, *output: str) -> HostConfig:
    tool = failing_tool(tmp_path / "tools", "virt-v2v-in-place", *output)
    return HostConfig(appliance_cache=CACHE / "libguestfs", in_place_tool=tool)


async def test_failure_before_any_write_leaves_the_replica_convertible(
    conversion_tools: None,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(None)
    convert = handler(
        vm.adapter, bus, openstack_lab, conversion_host, work_root, broken_host(tmp_path, *NO_ROOT)
    )
    for attempt in (1, 2):  # the second attempt runs the tool again: nothing was written the first time
        with pytest.raises(PermanentError) as caught:
            await convert(vm.synced("in-place"), Step(delivery=attempt))
        cause = caught.value.cause
        assert "No root device found in this operating system image." in cause
        assert "every disk" in caught.value.fix  # the converter's hint
        log_ref = cause.rsplit("full log: ", 1)[1]
        assert vm.vm_key in log_ref
        stored = await bus.read_log(log_ref)
        assert b"No root device found" in stored
        assert b"===== convert.log" in stored
        meta = vm.metadata(replica)
        assert meta[STATE_KEY] == "pending"
        assert vm.volume(replica).status == "available", "the replica is detached again"
    assert not os.listdir(work_root), "attempt folders go once their logs are stored"


async def test_failure_after_virt_v2v_may_have_written_refuses_a_second_run(
    conversion_tools: None,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(None)
    convert = handler(
        vm.adapter, bus, openstack_lab, conversion_host, work_root, broken_host(tmp_path, *MIDWAY)
    )
    with pytest.raises(PermanentError) as caught:
        await convert(vm.synced("in-place"), Step())
    assert "update-initramfs exited with 1" in caught.value.cause
    meta = vm.metadata(replica)
    assert meta[STATE_KEY] == "running"
    attempt = meta[ATTEMPT_KEY]

    with pytest.raises(PermanentError, match="stopped part-way") as again:
        await convert(vm.synced("in-place"), Step(delivery=2))
    assert "re-sync" in again.value.fix
    assert vm.metadata(replica)[ATTEMPT_KEY] == attempt, "the second delivery did not start a run"
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None
    assert state.progress["convert"].percent < 100


async def test_a_leftover_clone_still_attached_is_replaced_and_the_replica_stays_intact(
    conversion_tools: None,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(None)
    (leftover,) = await clones.create_clones(vm.adapter, vm.vm_key, vm.replicas, 1, "crashed-attempt")
    root = openstack_lab.instances_dir / conversion_host
    await compute.attach(vm.adapter, conversion_host, leftover.volume_id, root)  # a crash left it attached
    before = await asyncio.to_thread(file_digest, openstack_lab.backing_file(replica))
    convert = handler(
        vm.adapter, bus, openstack_lab, conversion_host, work_root, broken_host(tmp_path, *NO_ROOT)
    )

    with pytest.raises(PermanentError, match="No root device found"):
        await convert(vm.synced("clone"), Step())

    assert vm.volume(leftover.volume_id) is None, "the leftover clone was deleted"
    (fresh,) = await clones.find_clones(vm.adapter, vm.vm_key, vm.disks[0].key)
    assert fresh.id != leftover.volume_id
    assert fresh.metadata[STATE_KEY] == "pending"
    assert fresh.metadata[SOURCE_KEY] == replica
    assert fresh.status == "available", "detached after the failure"
    assert STATE_KEY not in vm.metadata(replica)
    assert await asyncio.to_thread(file_digest, openstack_lab.backing_file(replica)) == before


async def test_marks_interrupted_part_way_are_completed_without_converting_again(
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    await vm.add_replica(None)
    await vm.add_replica(None)
    made = await clones.create_clones(vm.adapter, vm.vm_key, vm.replicas, 1, "attempt-a")
    inspection = GuestInspection(os_type="linux", distro="debian", version="12.5", root_device="/dev/sda1")
    mark = ConvertedMark("attempt-a", inspection, "nats-object://x_logs/vm/convert-attempt-a.log")
    await clones.set_mark(vm.adapter, made[0].volume_id, mark)  # the process died before the second
    missing = HostConfig(
        appliance_cache=CACHE / "libguestfs",
        in_place_tool=str(tmp_path / "missing" / "virt-v2v-in-place"),
        customize_tool=str(tmp_path / "missing" / "virt-customize"),
    )
    convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, missing)

    (emit,) = await convert(vm.synced("clone"), Step(delivery=2))

    assert isinstance(emit.data, ConversionDone)
    assert emit.data.volume_ids == [disk.volume_id for disk in made]
    assert emit.data.inspection == inspection
    assert emit.data.log_ref == mark.log_ref
    assert vm.metadata(made[1].volume_id)[STATE_KEY] == "done"

    # A clone of another attempt mixed in is an inconsistency a human resolves; nothing is converted.
    await clones.set_state(vm.adapter, made[1].volume_id, ConversionState.DONE, "attempt-b")
    with pytest.raises(PermanentError, match="inconsistent"):
        await convert(vm.synced("clone"), Step(delivery=3))
