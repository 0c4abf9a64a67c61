"""The pre-flight inspection against the OpenStack lab with a stand-in inspector (no appliance starts):
leftover and own inspection clones are always removed (after a finding, after a cancelled task), a
replica that a copy pass is using is never cloned, and a failure after cutover began fails nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from tests.conversion.conftest import CACHE, file_digest
from tests.convert.conftest import Step, Vm, failing_tool, handler
from tests.openstack.conftest import OpenStackLab
from vmferry.adapters.conversion import HostConfig
from vmferry.adapters.openstack import clones, compute
from vmferry.bus.errors import PermanentError
from vmferry.bus.handles import BusHandle
from vmferry.functions.inspection import STEP
from vmferry.schemas.events import CutoverRequested
from vmferry.schemas.state import SourcePower, StepProgress, VmState

pytestmark = [pytest.mark.timeout(600)]

NO_ROOT = (
    "virt-v2v-inspector: error: inspection could not detect the source guest (or physical machine).",
    "",
    "No root device found in this operating system image.",
)


def broken_inspector(tmp_path: Path, *output: str, delay: float = 0.0) -> HostConfig:
    tool = failing_tool(tmp_path / "tools", "virt-v2v-inspector", *output, delay=delay)
    return HostConfig(appliance_cache=CACHE / "libguestfs", inspector_tool=tool)


async def progress_of(bus: BusHandle, vm_key: str) -> StepProgress | None:
    state, _ = await bus.state.get(vm_key)
    return state.progress.get(STEP) if state is not None else None


async def until_the_clones_are_attached(vm: Vm, tries: int = 600) -> None:
    for _ in range(tries):
        found = await vm.inspection_clones()
        if found and all(volume.status == "in-use" for volume in found):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the inspection clones were never attached")


async def test_a_finding_fails_before_cutover_and_every_inspection_clone_goes(
    conversion_tools: None,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(None)
    (leftover,) = await clones.create_clones(
        vm.adapter, vm.vm_key, vm.replicas, 1, "crashed-attempt", role=clones.INSPECTION_ROLE
    )
    root = openstack_lab.instances_dir / conversion_host
    await compute.attach(vm.adapter, conversion_host, leftover.volume_id, root)  # a crash left it attached
    replica_meta = vm.metadata(replica)
    before = await asyncio.to_thread(file_digest, openstack_lab.backing_file(replica))
    convert = handler(
        vm.adapter, bus, openstack_lab, conversion_host, work_root, broken_inspector(tmp_path, *NO_ROOT)
    )

    with pytest.raises(PermanentError) as caught:
        await convert(vm.synced("clone", final=False, mode="warm"), Step())

    failure = caught.value
    assert "found BEFORE cutover, while the source VM still runs" in failure.cause
    assert "No root device found in this operating system image." in failure.cause
    assert "every disk" in failure.fix  # the converter's hint
    stored = await bus.read_log(failure.cause.rsplit("full log: ", 1)[1])
    assert b"===== preflight.log" in stored
    assert b"No root device found" in stored
    assert vm.volume(leftover.volume_id) is None, "the leftover of the crashed attempt was deleted"
    assert await vm.inspection_clones() == [], "this attempt's clone was deleted too"
    assert vm.metadata(replica) == replica_meta
    assert vm.volume(replica).status == "available"
    assert await asyncio.to_thread(file_digest, openstack_lab.backing_file(replica)) == before
    assert await clones.find_clones(vm.adapter, vm.vm_key, vm.disks[0].key) == [], "no conversion clone"
    progress = await progress_of(bus, vm.vm_key)
    assert progress is not None
    assert progress.percent < 100.0
    assert not await asyncio.to_thread(os.listdir, work_root), "the attempt's folder is gone"


async def test_a_replica_a_copy_pass_is_using_is_not_cloned(
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(None)
    root = openstack_lab.instances_dir / conversion_host
    await compute.attach(vm.adapter, conversion_host, replica, root)  # the next pass is writing it
    never = HostConfig(
        appliance_cache=CACHE / "libguestfs", inspector_tool=str(tmp_path / "missing" / "virt-v2v-inspector")
    )
    try:
        convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, never)
        emitted = await convert(vm.synced("clone", final=False, mode="warm"), Step())
        # skipped: the conversion at cutover inspects; the immediate policy's cutover goes ahead
        assert [type(e.data) for e in emitted] == [CutoverRequested]
    finally:
        await compute.detach(vm.adapter, conversion_host, replica)

    assert await vm.inspection_clones() == []
    progress = await progress_of(bus, vm.vm_key)
    assert progress is not None
    assert progress.percent == 0.0
    assert progress.detail.startswith(f"skipped: replica {replica} is in-use")


async def test_a_cancelled_inspection_still_removes_its_clones(
    conversion_tools: None,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    await vm.add_replica(None)
    await vm.add_replica(None)
    slow = broken_inspector(tmp_path, *NO_ROOT, delay=120)
    convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, slow)
    task = asyncio.create_task(convert(vm.synced("clone", final=False, mode="warm"), Step()))
    await until_the_clones_are_attached(vm)
    await asyncio.sleep(1.0)  # the stand-in inspector is running now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await vm.inspection_clones() == [], "detached and deleted although the task was cancelled"
    for replica in vm.replicas:
        assert vm.volume(replica.volume_id).status == "available"


async def test_a_failure_after_cutover_began_leaves_the_verdict_to_the_conversion(
    conversion_tools: None,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    await vm.add_replica(None)
    slow = broken_inspector(tmp_path, *NO_ROOT, delay=8)
    convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, slow)
    task = asyncio.create_task(convert(vm.synced("clone", final=False, mode="warm"), Step()))
    try:
        await until_the_clones_are_attached(vm)
        power = SourcePower(source="lab", instance_uuid=vm.instance_uuid, powered_off_at=datetime.now(UTC))

        def powered_off(state: VmState | None) -> VmState | None:
            state = state or VmState(key=vm.vm_key)
            return msgspec.structs.replace(state, source_power=power)

        await bus.state.update(vm.vm_key, powered_off)  # cutover (immediate policy) stopped the source
        assert await task == [], "no failure: the conversion of the final pass decides"
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert await vm.inspection_clones() == []
    progress = await progress_of(bus, vm.vm_key)
    assert progress is not None
    assert progress.percent < 100.0
    assert progress.detail.startswith("failed after cutover began: pre-flight inspection of")
