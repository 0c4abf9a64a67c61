"""The pre-flight inspection end to end: real virt-v2v-inspector (libguestfs under TCG here) on Cinder
clones of pass-1 replicas in the OpenStack lab, while the source would still run; its log in the NATS
object store, its progress and result in the state bucket.

Two real appliance runs: the disk without an OS (a finding before cutover, ~1 min) and the single-disk
Debian guest (inspected, then redelivered without running the inspector again; ~4-5 min under TCG).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from tests.conversion.conftest import CACHE, GuestImages, file_digest
from tests.convert.conftest import Step, Vm, handler
from tests.openstack.conftest import OpenStackLab
from vmferry.adapters.conversion import HostConfig
from vmferry.adapters.openstack import clones
from vmferry.bus.errors import PermanentError
from vmferry.bus.handles import LOG_SCHEME, BusHandle
from vmferry.bus.naming import Naming
from vmferry.functions.inspection import STEP
from vmferry.schemas.events import CutoverRequested
from vmferry.schemas.state import StepProgress

pytestmark = [pytest.mark.guest_conversion, pytest.mark.timeout(1800)]


async def watch_progress(bus: BusHandle, vm_key: str, seen: list[StepProgress]) -> None:
    async for state in bus.state.watch(vm_key):
        progress = state.progress.get(STEP)
        if progress is not None and (not seen or seen[-1] != progress):
            seen.append(progress)


async def test_a_disk_without_an_os_is_reported_before_cutover(
    guest_images: GuestImages,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(guest_images.path("no-os"))
    backing = openstack_lab.backing_file(replica)
    before = await asyncio.to_thread(file_digest, backing)
    replica_meta = vm.metadata(replica)
    step = Step()
    convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, heartbeat_every=5)

    with pytest.raises(PermanentError) as caught:
        await convert(vm.synced("clone", final=False, mode="warm"), step)

    failure = caught.value
    assert "found BEFORE cutover, while the source VM still runs" in failure.cause
    assert "(no-root-device)" in failure.cause
    assert "No root device found in this operating system image." in failure.cause
    assert "every disk" in failure.fix
    assert "source VM runs on" in failure.fix
    log_ref = failure.cause.rsplit("full log: ", 1)[1]
    assert log_ref.startswith(f"{LOG_SCHEME}") and f"{vm.vm_key}/inspect-" in log_ref
    stored = await bus.read_log(log_ref)
    assert b"===== preflight.log" in stored
    assert b"virt-v2v-inspector" in stored
    assert b"No root device found" in stored
    assert len(stored) > 10_000, "the whole -v -x log, not a summary"

    assert await vm.inspection_clones() == [], "the inspection clones are detached and deleted"
    assert await asyncio.to_thread(file_digest, backing) == before, "the replica is never written"
    assert vm.metadata(replica) == replica_meta
    assert vm.volume(replica).status == "available"
    assert step.beats >= 1
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None
    assert 5.0 <= state.progress[STEP].percent < 100.0
    assert "convert" not in state.progress, "nothing was converted"


async def test_a_debian_guest_is_inspected_once_and_nothing_is_emitted(
    guest_images: GuestImages,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    js: JetStreamContext,
    naming: Naming,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    manifest = guest_images.manifest
    replica = await vm.add_replica(guest_images.path("single"))
    backing = openstack_lab.backing_file(replica)
    before = await asyncio.to_thread(file_digest, backing)
    event = vm.synced("clone", macs=(manifest["mac"],), final=False, mode="warm")
    seen: list[StepProgress] = []
    watcher = asyncio.create_task(watch_progress(bus, vm.vm_key, seen))
    step = Step()
    convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, heartbeat_every=10)
    try:
        emitted = await convert(event, step)
        assert [type(e.data) for e in emitted] == [CutoverRequested], "then the immediate policy's cutover"
        await asyncio.sleep(0.5)  # let the watcher see the last write
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None
    result = state.progress[STEP]
    assert result.percent == 100.0
    distro, rest = result.detail.split(" ", 1)
    assert distro == "debian"
    assert rest.startswith("12.")
    assert result.detail.endswith(", root /dev/sda1")
    assert step.beats >= 1
    percents = [p.percent for p in seen]
    assert percents == sorted(percents)
    assert any(5.0 <= p.percent < 95.0 for p in seen), [p.detail for p in seen]

    assert await vm.inspection_clones() == [], "the inspection clones are detached and deleted"
    assert await clones.find_clones(vm.adapter, vm.vm_key, vm.disks[0].key) == [], "nothing converted"
    assert await asyncio.to_thread(file_digest, backing) == before, "the replica is never written"
    assert vm.volume(replica).status == "available"

    logs = await (await js.object_store(naming.log_bucket)).list()
    (name,) = [info.name for info in logs if info.name.startswith(f"{vm.vm_key}/inspect-")]
    stored = await bus.read_log(f"{LOG_SCHEME}{naming.log_bucket}/{name}")
    assert b"===== preflight.log" in stored
    assert b"i_root = /dev/sda1" in stored

    # A redelivery finds the result recorded: the inspector does not run (this one does not exist).
    never = HostConfig(
        appliance_cache=CACHE / "libguestfs", inspector_tool=str(tmp_path / "missing" / "virt-v2v-inspector")
    )
    again = Step(delivery=2)
    redelivered = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, never)
    assert [type(e.data) for e in await redelivered(event, again)] == [CutoverRequested]
    assert again.beats == 0
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None
    assert state.progress[STEP] == result
