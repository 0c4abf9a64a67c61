"""The Glance path against the lab's real Glance and Cinder: a disk file uploaded as an image, a volume
made from it, found again on reruns, leftovers replaced, stuck states reported, teardown.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from tests.conftest import missing_component
from tests.openstack.conftest import OpenStackLab
from tests.openstack.test_adapter import (
    ApiCalls,
    Made,
    Step,
    conversion_done,
    handler,
    plan_for,
    vm_spec,
)
from vmferry.adapters.openstack import clones, images, teardown
from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.schemas.events import InstanceCreated
from vmferry.schemas.request import MigrationPlan

pytestmark = [pytest.mark.timeout(900)]
MIB = 1024**2


@pytest.fixture
async def admin(openstack_lab: OpenStackLab) -> AsyncIterator[OpenStackAdapter]:
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    yield adapter
    adapter.close()


@pytest.fixture
async def made(admin: OpenStackAdapter) -> AsyncIterator[Made]:
    pending = Made()
    yield pending
    for spec in pending.specs:
        await teardown.teardown(admin, spec)


def disk_file(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    """A raw disk file with known (random) bytes."""
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def backing_bytes(lab: OpenStackLab, volume_id: str, size: int) -> bytes:
    with lab.backing_file(volume_id).open("rb") as backing:
        return backing.read(size)


def raw_image(admin: OpenStackAdapter, image_id: str) -> dict[str, Any]:
    """The image as Glance stores it (property names exactly as sent)."""
    body: dict[str, Any] = admin.conn.image.get(f"/images/{image_id}").json()
    return body


async def test_upload_and_volume_carry_the_bytes_and_the_boot_metadata(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0, firmware="efi", secure_boot=True, os_type="linux")
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, disk_bus="virtio-scsi")
    plan = replace(plan, mappings=replace(plan.mappings, availability_zone="nova"))
    disk = spec.disks[0]
    path, data = disk_file(tmp_path, "disk0.raw", 3 * MIB + 512)

    image = await images.upload_disk_image(admin, path, spec, disk, plan)
    stored = raw_image(admin, image.id)
    assert stored["status"] == "active"
    assert stored["size"] == len(data)
    assert stored["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert stored["visibility"] == "private"
    assert stored["min_disk"] == 1
    assert {k: stored[k] for k in ("vmferry_vm", "vmferry_disk", "vmferry_managed", "vmferry_role")} == {
        "vmferry_vm": spec.vm_key,
        "vmferry_disk": str(disk.key),
        "vmferry_managed": "true",
        "vmferry_role": "converted",
    }
    assert {
        k: stored[k]
        for k in ("hw_firmware_type", "hw_machine_type", "os_secure_boot", "hw_disk_bus", "hw_scsi_model")
    } == {
        "hw_firmware_type": "uefi",
        "hw_machine_type": "q35",
        "os_secure_boot": "required",
        "hw_disk_bus": "scsi",
        "hw_scsi_model": "virtio-scsi",
    }
    assert stored["os_type"] == "linux"

    volume = await images.volume_from_image(admin, image, spec, disk, plan)
    assert volume.status == "available"
    assert volume.size == 1
    assert volume.volume_type == openstack_lab.volume_type
    assert volume.availability_zone == "nova"
    assert volume.is_bootable
    assert volume.metadata == {
        "vmferry_vm": spec.vm_key,
        "vmferry_disk": str(disk.key),
        "vmferry_managed": "true",
        "vmferry_role": "converted",
        images.SOURCE_IMAGE_KEY: image.id,
    }
    # Cinder copies the image's properties: Nova boots the volume as UEFI/q35 with a SCSI disk.
    assert volume.volume_image_metadata["hw_firmware_type"] == "uefi"
    assert volume.volume_image_metadata["hw_disk_bus"] == "scsi"
    assert backing_bytes(openstack_lab, volume.id, len(data)) == data

    # A rerun finds both again and makes nothing new.
    assert (await images.upload_disk_image(admin, path, spec, disk, plan)).id == image.id
    assert (await images.volume_from_image(admin, image, spec, disk, plan)).id == volume.id
    assert [i.id for i in await images.find_images(admin, spec.vm_key, disk.key)] == [image.id]
    assert [v.id for v in await clones.find_clones(admin, spec.vm_key, disk.key)] == [volume.id]


async def test_glance_path_of_a_two_disk_vm_boots(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=2, nics=1, firmware="efi")
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    files = [disk_file(tmp_path, f"disk{i}.raw", MIB) for i in range(2)]
    calls = ApiCalls(admin)
    volume_ids = []
    for disk, (path, _) in zip(spec.disks, files, strict=True):
        image = await images.upload_disk_image(admin, path, spec, disk, plan)
        volume_ids.append((await images.volume_from_image(admin, image, spec, disk, plan)).id)
    counted = len(calls.requests)
    print(f"\nOpenStack API calls of the Glance path (2 disks: upload + volume from image): {counted}")
    for line in calls.requests:
        print("  ", line)
    assert counted <= 30

    emitted = await handler(admin, spec)(conversion_done(spec, plan, volume_ids[::-1]), Step())
    created = emitted[0].data
    assert isinstance(created, InstanceCreated)
    assert created.volume_ids == volume_ids, "root disk first, as on the source"
    server = admin.conn.compute.get_server(created.server_id)
    assert server.status == "ACTIVE"
    for volume_id, (_, data) in zip(volume_ids, files, strict=True):
        assert backing_bytes(openstack_lab, volume_id, len(data)) == data
    # A redelivery after the launch finds the image and the (now attached) volume again.
    root, (root_file, _) = spec.disks[0], files[0]
    image = await images.upload_disk_image(admin, root_file, spec, root, plan)
    again = await images.volume_from_image(admin, image, spec, root, plan)
    assert (again.id, again.status) == (volume_ids[0], "in-use")


async def test_a_stale_image_is_replaced_and_a_new_attempt_replaces_image_and_volume(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    disk = spec.disks[0]
    glance = admin.conn.image
    # What an upload that died after creating the image record leaves behind.
    stale = glance.create_image(
        "half-uploaded",
        allow_duplicates=True,
        disk_format="raw",
        container_format="bare",
        vmferry_vm=spec.vm_key,
        vmferry_disk=str(disk.key),
        vmferry_managed="true",
        vmferry_role="converted",
    )
    assert stale.status == "queued"
    path, data = disk_file(tmp_path, "first.raw", MIB)
    first = await images.upload_disk_image(admin, path, spec, disk, plan, attempt="attempt-1")
    assert first.id != stale.id
    assert glance.find_image(stale.id) is None, "the half-uploaded image was deleted"
    first_volume = await images.volume_from_image(admin, first, spec, disk, plan, attempt="attempt-1")

    # A new conversion of the disk: its image and the volume made from the old one are replaced.
    path, data = disk_file(tmp_path, "second.raw", MIB)
    second = await images.upload_disk_image(admin, path, spec, disk, plan, attempt="attempt-2")
    assert second.id != first.id
    assert glance.find_image(first.id) is None
    volume = await images.volume_from_image(admin, second, spec, disk, plan, attempt="attempt-2")
    assert volume.id != first_volume.id
    assert admin.conn.block_storage.find_volume(first_volume.id) is None
    assert volume.metadata[clones.ATTEMPT_KEY] == "attempt-2"
    assert backing_bytes(openstack_lab, volume.id, len(data)) == data
    assert [i.id for i in await images.find_images(admin, spec.vm_key, disk.key)] == [second.id]


async def test_an_image_stuck_in_queued_is_a_clear_retryable_error(admin: OpenStackAdapter) -> None:
    glance = admin.conn.image
    # Glance restores a failed upload to queued: an image whose data never arrives stays there.
    image = glance.create_image(
        "never-uploaded", allow_duplicates=True, disk_format="raw", container_format="bare"
    )
    try:
        started = time.monotonic()
        with pytest.raises(RetryableError) as stuck:
            await images.wait_for_image(admin, image.id, timeout=2)
        assert time.monotonic() - started < 10
        assert stuck.value.cause == f"image {image.id} is still queued 2 s after its data was sent"
        assert "uploaded again on retry" in stuck.value.fix
    finally:
        glance.delete_image(image.id, ignore_missing=True)


async def test_data_not_in_the_declared_format_is_refused_and_leaves_no_image(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    path, _ = disk_file(tmp_path, "disk.raw", MIB)
    with pytest.raises(PermanentError) as refused:
        await images.upload_disk_image(admin, path, spec, spec.disks[0], plan, disk_format="qcow2")
    assert "Glance refused" in refused.value.cause and "does not match" in refused.value.cause
    assert f"qemu-img info {path}" in refused.value.fix
    assert await images.vm_images(admin, spec.vm_key) == []


async def test_a_qcow2_upload_lands_as_raw_bytes_in_the_volume(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    if shutil.which("qemu-img") is None:
        missing_component("qemu-img", "apt-get install qemu-utils")
    spec = vm_spec(disks=1, nics=0)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    raw, data = disk_file(tmp_path, "disk.raw", 2 * MIB)
    qcow2 = tmp_path / "disk.qcow2"
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)]
    await asyncio.to_thread(subprocess.run, convert, check=True)
    image = await images.upload_disk_image(admin, qcow2, spec, spec.disks[0], plan, disk_format="qcow2")
    assert image.disk_format == "qcow2" and image.virtual_size == len(data)
    volume = await images.volume_from_image(admin, image, spec, spec.disks[0], plan)
    assert backing_bytes(openstack_lab, volume.id, len(data)) == data


async def test_teardown_removes_the_vms_images_and_volumes_only(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    disk = spec.disks[0]
    glance = admin.conn.image
    path, _ = disk_file(tmp_path, "disk.raw", MIB)
    made.specs.append(spec)
    image = await images.upload_disk_image(admin, path, spec, disk, plan)
    volume = await images.volume_from_image(admin, image, spec, disk, plan)
    same_name = glance.create_image(
        image.name, allow_duplicates=True, disk_format="raw", container_format="bare"
    )
    other_vm = vm_spec(disks=1, nics=0)
    others = glance.create_image(
        image.name,
        allow_duplicates=True,
        disk_format="raw",
        container_format="bare",
        vmferry_vm=other_vm.vm_key,
        vmferry_disk=str(disk.key),
        vmferry_managed="true",
    )
    try:
        listing = await teardown.teardown(admin, spec, dry_run=True)
        assert [(r.kind, r.id) for r in listing] == [("volume", volume.id), ("image", image.id)]
        await teardown.teardown(admin, spec)
        assert glance.find_image(image.id) is None
        left = admin.conn.block_storage.find_volume(volume.id)
        assert left is None or left.status == "deleting"
        assert glance.find_image(same_name.id) is not None, "a same-named image is not vmferry's"
        assert glance.find_image(others.id) is not None, "another VM's image is not this VM's"
        assert await teardown.teardown(admin, spec, dry_run=True) == []
    finally:
        glance.delete_image(same_name.id, ignore_missing=True)
        glance.delete_image(others.id, ignore_missing=True)


async def test_a_volume_stuck_in_creating_is_retryable_and_replaced_once_in_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    disk = spec.disks[0]
    bs = admin.conn.block_storage
    path, data = disk_file(tmp_path, "disk.raw", MIB)
    image = await images.upload_disk_image(admin, path, spec, disk, plan)
    volume = await images.volume_from_image(admin, image, spec, disk, plan)
    # The state cinder-volume leaves a volume in when it dies mid-create (set with the admin API).
    bs.reset_volume_status(volume, status="creating", attach_status=None, migration_status=None)

    with pytest.raises(RetryableError) as stuck:
        await images.volume_from_image(admin, image, spec, disk, plan, timeout=3)
    assert stuck.value.cause == (
        f"volume {volume.id} (disk {disk.key} of {spec.vm_key}) is still creating after 3 s"
    )
    assert "openstack volume service list" in stuck.value.fix
    assert f"openstack volume set --state error {volume.id}" in stuck.value.fix
    assert [v.id for v in await clones.find_clones(admin, spec.vm_key, disk.key)] == [volume.id], (
        "waiting never makes a second volume"
    )

    # The fix the error names: mark it failed and retry; the failed volume is replaced.
    bs.reset_volume_status(volume, status="error", attach_status=None, migration_status=None)
    replaced = await images.volume_from_image(admin, image, spec, disk, plan)
    assert replaced.id != volume.id
    assert bs.find_volume(volume.id) is None
    assert backing_bytes(openstack_lab, replaced.id, len(data)) == data


async def test_volume_created_in_error_is_a_clear_permanent_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    disk = spec.disks[0]
    path, _ = disk_file(tmp_path, "disk.raw", MIB)
    image = await images.upload_disk_image(admin, path, spec, disk, plan)
    volume = await images.volume_from_image(admin, image, spec, disk, plan)
    admin.conn.block_storage.reset_volume_status(
        volume, status="error", attach_status=None, migration_status=None
    )
    with pytest.raises(PermanentError) as failed:
        await images.wait_for_new_volume(admin, volume.id, 30, "disk 2000")
    assert failed.value.cause == f"volume {volume.id} (disk 2000) went to error"
    assert "cinder-volume's log" in failed.value.fix


async def test_upload_of_64_mib(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, tmp_path: Path
) -> None:
    spec = vm_spec(disks=1, nics=0)
    made.specs.append(spec)
    plan: MigrationPlan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    path, data = disk_file(tmp_path, "big.raw", 64 * MIB)
    started = time.monotonic()
    image = await images.upload_disk_image(admin, path, spec, spec.disks[0], plan)
    uploaded = time.monotonic() - started
    volume = await images.volume_from_image(admin, image, spec, spec.disks[0], plan)
    copied = time.monotonic() - started - uploaded
    print(
        f"\n64 MiB: upload {uploaded:.2f} s ({64 / uploaded:.0f} MiB/s),"
        f" volume from image {copied:.2f} s ({64 / copied:.0f} MiB/s)"
    )
    assert image.size == len(data)
    assert hashlib.sha256(backing_bytes(openstack_lab, volume.id, len(data))).digest() == (
        hashlib.sha256(data).digest()
    )
