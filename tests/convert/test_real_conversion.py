"""The convert function end to end: real virt-v2v-in-place (libguestfs under TCG here) on Cinder clones
of replica volumes in the OpenStack lab, logs in the NATS object store, progress in the state bucket.

Two real appliance runs in all: the single-disk guest (converted on a clone after an attempt that failed
on a broken host, then redelivered without running virt-v2v again) and the disk without an OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from tests.conversion.conftest import CACHE, GuestImages, file_digest
from tests.conversion.offline import dpkg_installed, initramfs_files, list_dir, read_file
from tests.convert.conftest import Step, Vm, failing_tool, handler
from tests.openstack.conftest import OpenStackLab
from vmferry.adapters.conversion import HostConfig
from vmferry.adapters.openstack import clones
from vmferry.adapters.openstack.clones import (
    INSPECTION_KEY,
    ROLE_KEY,
    SOURCE_KEY,
    STATE_KEY,
)
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.bus.handles import BusHandle
from vmferry.schemas.events import ConversionDone, GuestInspection
from vmferry.schemas.state import StepProgress

pytestmark = [pytest.mark.guest_conversion, pytest.mark.timeout(1800)]

BROKEN_APPLIANCE = (
    "libguestfs: error: guestfs_launch failed.",
    "virt-customize: error: libguestfs error: guestfs_launch failed.",
)


async def digest(path: Path) -> str:
    return await asyncio.to_thread(file_digest, path)


def modules_in(files: list[str]) -> set[str]:
    return {Path(path).name.split(".ko")[0] for path in files}


def sha256(data: bytes | None) -> str:
    assert data is not None
    return hashlib.sha256(data).hexdigest()


async def watch_progress(bus: BusHandle, vm_key: str, seen: list[StepProgress]) -> None:
    async for state in bus.state.watch(vm_key):
        progress = state.progress.get("convert")
        if progress is not None and (not seen or seen[-1] != progress):
            seen.append(progress)


async def clones_of(vm: Vm) -> list[clones.DiskVolume]:
    found = await clones.find_clones(vm.adapter, vm.vm_key, vm.disks[0].key)
    return [clones.DiskVolume.of(vm.disks[0].key, volume) for volume in found]


async def test_disk_without_an_os_fails_with_the_decisive_lines_and_the_replica_intact(
    guest_images: GuestImages,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    replica = await vm.add_replica(guest_images.path("no-os"))
    backing = openstack_lab.backing_file(replica)
    before = await digest(backing)
    step = Step()
    convert = handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, heartbeat_every=5)

    with pytest.raises(PermanentError) as caught:
        await convert(vm.synced("clone"), step)

    failure = caught.value
    assert "No root device found in this operating system image." in failure.cause
    assert "every disk" in failure.fix
    assert "replica volumes are untouched" in failure.fix
    log_ref = failure.cause.rsplit("full log: ", 1)[1]
    stored = await bus.read_log(log_ref)
    assert b"===== convert.log" in stored
    assert b"virt-v2v-in-place" in stored
    assert b"No root device found" in stored
    assert len(stored) > 10_000, "the whole -v -x log, not a summary"

    assert await digest(backing) == before, "the replica is never written in clone mode"
    assert STATE_KEY not in vm.metadata(replica)
    (clone,) = await clones_of(vm)
    assert clone.state == "pending", "a failed clone is never marked converted"
    assert vm.volume(clone.volume_id).status == "available", "and is detached from the conversion host"
    assert step.beats >= 1
    state, _ = await bus.state.get(vm.vm_key)
    assert state is not None
    assert 5.0 <= state.progress["convert"].percent < 100.0


async def test_guest_converted_on_a_clone_after_a_failed_attempt_and_never_twice(
    guest_images: GuestImages,
    openstack_lab: OpenStackLab,
    conversion_host: str,
    bus: BusHandle,
    vm: Vm,
    tmp_path: Path,
    work_root: Path,
) -> None:
    manifest = guest_images.manifest
    replica = await vm.add_replica(guest_images.path("single"))
    replica_file = openstack_lab.backing_file(replica)
    before = await digest(replica_file)
    event = vm.synced("clone", macs=(manifest["mac"],))

    # 1. The conversion host's appliance is broken: a retryable failure, the replica untouched.
    broken = HostConfig(
        appliance_cache=CACHE / "libguestfs",
        customize_tool=failing_tool(tmp_path / "tools", "virt-customize", *BROKEN_APPLIANCE),
    )
    with pytest.raises(RetryableError) as first:
        await handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, broken)(event, Step())
    assert "guestfs_launch failed" in first.value.cause
    assert b"guestfs_launch failed" in await bus.read_log(first.value.cause.rsplit("full log: ", 1)[1])
    (leftover,) = await clones_of(vm)
    assert leftover.state == "pending"

    # 2. Fixed, the retry converts a fresh clone; nothing is copied from the source again.
    seen: list[StepProgress] = []
    started = datetime.now(UTC)
    watcher = asyncio.create_task(watch_progress(bus, vm.vm_key, seen))
    step = Step(delivery=2)
    convert = handler(
        vm.adapter, bus, openstack_lab, conversion_host, work_root, keep_work_dirs=True, heartbeat_every=10
    )
    try:
        (emit,) = await convert(event, step)
        await asyncio.sleep(0.5)  # let the watcher see the last write
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    done = emit.data
    assert isinstance(done, ConversionDone)
    assert emit.vm_key == vm.vm_key
    (clone_id,) = done.volume_ids
    assert clone_id not in (replica, leftover.volume_id)
    assert vm.volume(leftover.volume_id) is None, "the failed attempt's clone was deleted"
    meta = vm.metadata(clone_id)
    assert (meta[ROLE_KEY], meta[STATE_KEY], meta[SOURCE_KEY]) == ("converted", "done", replica)
    assert msgspec.json.decode(meta[INSPECTION_KEY], type=GuestInspection) == done.inspection
    assert vm.volume(clone_id).status == "available", "detached from the conversion host"
    assert done.vm == event.data.vm
    assert done.plan == event.data.plan

    inspection = done.inspection
    assert (inspection.os_type, inspection.distro, inspection.root_device) == ("linux", "debian", "/dev/sda1")
    assert inspection.version.startswith("12.")
    assert inspection.firmware == "bios"

    assert done.log_ref is not None
    stored = await bus.read_log(done.log_ref)
    assert b"===== customize.log" in stored  # vmferry's NIC-name script (2.2 has no --run)
    assert b"===== convert.log" in stored
    assert b"i_root = /dev/sda1" in stored

    assert await digest(replica_file) == before, "the replica is never written in clone mode"
    assert STATE_KEY not in vm.metadata(replica)
    kept = glob.glob(f"{work_root}/*/disks/*")
    assert kept == [], "the clone is the copy: the converter made no local one"

    clone_file = openstack_lab.backing_file(clone_id)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fstab = read_file(clone_file, "/etc/fstab", scratch)
    assert fstab is not None
    assert b"/dev/sda1" not in fstab
    assert b"/dev/vda1" in fstab or b"UUID=" in fstab
    initrd = f"/boot/initrd.img-{manifest['kernel']}"
    assert {"virtio_blk", "virtio_pci", "virtio_net"} <= modules_in(
        initramfs_files(clone_file, initrd, scratch)
    )
    assert f"initrd.img-{manifest['kernel']}.pre-v2v" in list_dir(clone_file, "/boot")
    status = read_file(clone_file, "/var/lib/dpkg/status", scratch)
    assert status is not None
    assert not dpkg_installed(status, "open-vm-tools")
    for path in ("/etc/vmferry-marker", "/srv/vmferry-data.bin"):
        assert sha256(read_file(clone_file, path, scratch)) == manifest["files"][path], path

    assert step.beats >= 1
    seen = [p for p in seen if p.at is not None and p.at >= started]  # not the failed attempt's
    assert seen, "no progress reached the state"
    assert seen[-1].percent == 100.0
    assert seen[-1].detail == "converted"
    stages = {p.detail.split(":")[0] for p in seen if 5.0 <= p.percent < 95.0}
    assert stages & {"inspect", "convert", "customize"}, [p.detail for p in seen]
    percents = [p.percent for p in seen]
    assert percents == sorted(percents)

    # 3. A redelivery finds the clone converted: virt-v2v does not run (these tools do not exist).
    never = HostConfig(
        appliance_cache=CACHE / "libguestfs",
        in_place_tool=str(tmp_path / "missing" / "virt-v2v-in-place"),
        customize_tool=str(tmp_path / "missing" / "virt-customize"),
    )
    again_step = Step(delivery=3)
    (again,) = await handler(vm.adapter, bus, openstack_lab, conversion_host, work_root, never)(
        event, again_step
    )
    assert again.data == done
    assert again_step.beats == 0
