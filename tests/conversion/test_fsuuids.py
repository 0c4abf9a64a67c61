"""Filesystem UUIDs of a guest's disks read on the host, keyed by the guest's device names: on small sparse
images made here with sfdisk, mkfs.ext4 and mkswap (no root, loop devices or mounts), and once through
the appliance for a qcow2 disk."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import missing_component
from tests.conversion.conftest import CACHE
from vmferry.adapters.conversion import choose_accelerator, guestfs_environment
from vmferry.adapters.conversion.fsuuids import (
    ApplianceAccess,
    FoundFilesystem,
    guest_filesystem_uuids,
    parse_filesystems_csv,
)
from vmferry.adapters.conversion.model import SourceDisk

ROOT_UUID = "0f5a1c2e-1111-4a4a-8b8b-000000000001"
SWAP_UUID = "0f5a1c2e-2222-4a4a-8b8b-000000000002"
DATA_UUID = "0f5a1c2e-3333-4a4a-8b8b-000000000003"
WHOLE_UUID = "0f5a1c2e-4444-4a4a-8b8b-000000000004"
SECTOR = 512
LINUX_GPT = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@pytest.fixture(scope="module")
def image_tools() -> None:
    for tool in ("sfdisk", "blkid", "mkfs.ext4", "mkswap"):
        if shutil.which(tool) is None:
            missing_component(tool, "install util-linux and e2fsprogs (scripts/setup-conversion)")


def run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)


def blank(path: Path, mib: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(mib << 20)
    return path


def partition(path: Path, script: str) -> None:
    run("sfdisk", "-q", str(path), stdin=script)


def ext4(path: Path, uuid: str, start_sector: int, sectors: int) -> None:
    offset = f"offset={start_sector * SECTOR}"
    run("mkfs.ext4", "-q", "-F", "-U", uuid, "-E", offset, str(path), f"{sectors * SECTOR // 1024}k")


def swap(path: Path, uuid: str, start_sector: int, sectors: int) -> None:
    area = path.with_name(path.name + ".swap")
    blank(area, sectors * SECTOR >> 20)
    run("mkswap", "-U", uuid, str(area))
    with path.open("r+b") as disk:
        disk.seek(start_sector * SECTOR)
        disk.write(area.read_bytes())
    area.unlink()


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory, image_tools: None) -> list[Path]:
    """sda: MBR, ext4 on 1, an extended partition 2 and swap on logical 5; sdb: GPT, nothing on 1 and
    ext4 on 3 (numbers with a gap); sdc: ext4 on the whole disk, no partition table."""
    folder = tmp_path_factory.mktemp("fsuuids")
    mbr = blank(folder / "disk0.raw", 32)
    partition(
        mbr,
        "label: dos\n"
        "start=2048, size=16384, type=83, bootable\n"
        "start=18432, size=40960, type=5\n"
        "start=20480, size=8192, type=82\n",
    )
    ext4(mbr, ROOT_UUID, 2048, 16384)
    swap(mbr, SWAP_UUID, 20480, 8192)

    gpt = blank(folder / "disk1.raw", 32)
    partition(
        gpt,
        f"label: gpt\n{gpt}1 : start=2048, size=4096, type={LINUX_GPT}\n"
        f"{gpt}3 : start=8192, size=16384, type={LINUX_GPT}\n",
    )
    ext4(gpt, DATA_UUID, 8192, 16384)

    whole = blank(folder / "disk2.raw", 8)
    ext4(whole, WHOLE_UUID, 0, 16384)
    return [mbr, gpt, whole]


def test_each_disk_is_read_alone_and_named_as_the_guest_names_it(disks: list[Path]) -> None:
    uuids = guest_filesystem_uuids([SourceDisk(path) for path in disks])
    assert uuids == {"sda1": ROOT_UUID, "sda5": SWAP_UUID, "sdb3": DATA_UUID, "sdc": WHOLE_UUID}


def test_disk_order_is_the_guests_not_the_appliances(disks: list[Path]) -> None:
    uuids = guest_filesystem_uuids([SourceDisk(disks[1]), SourceDisk(disks[0])])
    assert uuids == {"sda3": DATA_UUID, "sdb1": ROOT_UUID, "sdb5": SWAP_UUID}


def test_uuid_on_two_disks_is_left_out(disks: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmferry.adapters.conversion.fsuuids"):
        uuids = guest_filesystem_uuids([SourceDisk(disks[0]), SourceDisk(disks[0])])
    assert uuids == {}  # ext4 and swap both twice: UUID= would name either disk
    assert f"UUID {ROOT_UUID} is on sda1, sdb1" in caplog.text


def test_disk_without_filesystems(tmp_path: Path, image_tools: None) -> None:
    empty = blank(tmp_path / "empty.raw", 8)
    assert guest_filesystem_uuids([SourceDisk(empty)]) == {}
    partition(empty, "label: dos\nstart=2048, type=83\n")
    assert guest_filesystem_uuids([SourceDisk(empty)]) == {}


def test_non_raw_disk_needs_the_appliance(disks: list[Path]) -> None:
    with pytest.raises(ValueError, match="appliance"):
        guest_filesystem_uuids([SourceDisk(disks[0], format="qcow2")])


def test_virt_filesystems_output_is_renamed_to_the_guests_disk() -> None:
    output = (
        "# vmferry: virt-filesystems --format qcow2 -a disk.qcow2 ...\n"
        "Name,Type,VFS,Label,Size,Parent,UUID\n"
        f"/dev/sda1,filesystem,ext4,root,8388608,,{ROOT_UUID}\n"
        f"/dev/sda5,filesystem,swap,,4194304,,{SWAP_UUID}\n"
        "/dev/sda2,filesystem,unknown,,1024,,\n"
        f'/dev/vg0/lv,filesystem,xfs,"a, label",1024,,{DATA_UUID}\n'
    )
    assert parse_filesystems_csv(output, "sdb") == [
        FoundFilesystem("sdb1", ROOT_UUID, "ext4"),
        FoundFilesystem("sdb5", SWAP_UUID, "swap"),
    ]
    assert parse_filesystems_csv("libguestfs: error: could not create appliance\n", "sda") == []


@pytest.mark.guest_conversion
def test_qcow2_disk_is_read_by_the_appliance_alone(
    disks: list[Path], tmp_path: Path, conversion_tools: None
) -> None:
    for tool in ("qemu-img", "virt-filesystems"):
        if shutil.which(tool) is None:
            missing_component(tool, "run scripts/setup-conversion as root")
    qcow2 = tmp_path / "disk0.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(disks[0]), str(qcow2))
    (tmp_path / "scratch").mkdir()
    env = guestfs_environment(choose_accelerator(), CACHE / "libguestfs", tmp_path / "scratch")
    appliance = ApplianceAccess(env=env, log_dir=tmp_path / "logs", timeout_s=600)
    uuids = guest_filesystem_uuids([SourceDisk(disks[2]), SourceDisk(qcow2, format="qcow2")], appliance)
    assert uuids == {"sda": WHOLE_UUID, "sdb1": ROOT_UUID, "sdb5": SWAP_UUID}
    assert (tmp_path / "logs" / "filesystems-sdb.log").exists()  # only the qcow2 disk needed it
    assert not (tmp_path / "logs" / "filesystems-sda.log").exists()
