"""Real conversions with Debian's virt-v2v-in-place on guests built by scripts/build-guest-image:
checked offline (debugfs on the converted disks) and by one headless boot each of the converted and the
unconverted disk on virtio-blk. The session fixture runs the conversions concurrently."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conversion.bootcheck import boot
from tests.conversion.conftest import FIRSTBOOT_MARK, Session, file_digest, single_guest
from tests.conversion.offline import dpkg_installed, initramfs_files, list_dir, read_file
from vmferry.adapters.conversion import (
    BlockDriver,
    ConversionError,
    ConversionResult,
    FailureKind,
    Firmware,
    choose_accelerator,
    detect_capabilities,
)
from vmferry.adapters.conversion.commands import needs_stable_fstab

pytestmark = [pytest.mark.guest_conversion, pytest.mark.timeout(1800)]


def sha256(data: bytes | None) -> str:
    assert data is not None
    return hashlib.sha256(data).hexdigest()


def fstab_specs(fstab: bytes) -> dict[str, str]:
    """Mount point -> what fstab mounts there."""
    fields = (
        line.split() for line in fstab.decode().splitlines() if line.strip() and not line.startswith("#")
    )
    return {entry[1]: entry[0] for entry in fields if len(entry) >= 2 and entry[1].startswith("/")}


def modules_in(files: list[str]) -> set[str]:
    return {
        Path(path).name.removesuffix(".ko").removesuffix(".ko.xz").removesuffix(".ko.zst") for path in files
    }


def test_single_disk_guest_converted(real: Session, tmp_path: Path) -> None:
    result: ConversionResult = real.jobs["single"].result()
    manifest = real.images.manifest
    disk = result.disks[0]
    assert disk.parent == real.root / "single" / "disks"  # a clone was converted ...
    assert file_digest(real.images.path("single")) == real.source_digest  # ... and the replica is untouched

    inspection = result.inspection
    assert (inspection.os_type, inspection.distribution, inspection.major_version) == ("linux", "debian", 12)
    assert inspection.firmware is Firmware.BIOS
    assert inspection.root_device == "/dev/sda1"
    assert inspection.arch == "x86_64"
    assert not result.already_converted

    fstab = read_file(disk, "/etc/fstab", tmp_path)
    assert fstab is not None
    assert b"/dev/sda1" not in fstab
    assert b"/dev/vda1" in fstab or b"UUID=" in fstab

    initrd = f"/boot/initrd.img-{manifest['kernel']}"
    modules = modules_in(initramfs_files(disk, initrd, tmp_path))
    assert {"virtio_blk", "virtio_pci", "virtio_scsi", "virtio_net"} <= modules
    original = modules_in(initramfs_files(real.images.path("single"), initrd, tmp_path))
    assert "virtio_blk" not in original  # the source really could not boot on virtio
    assert f"initrd.img-{manifest['kernel']}.pre-v2v" in list_dir(disk, "/boot")

    status = read_file(disk, "/var/lib/dpkg/status", tmp_path)
    assert status is not None
    assert not dpkg_installed(status, "open-vm-tools")
    assert dpkg_installed(status, "ifupdown")
    assert dpkg_installed(
        read_file(real.images.path("single"), "/var/lib/dpkg/status", tmp_path) or b"", "open-vm-tools"
    )

    for path in ("/etc/vmferry-marker", "/srv/vmferry-data.bin"):
        assert sha256(read_file(disk, path, tmp_path)) == manifest["files"][path], path

    link = read_file(disk, f"/etc/systemd/network/10-vmferry-{manifest['interface']}.link", tmp_path)
    assert link is not None
    assert f"MACAddress={manifest['mac']}".encode() in link
    scripts = list_dir(disk, "/usr/lib/virt-sysprep/scripts")
    assert any("install-qga" in name for name in scripts)  # virt-v2v's own firstboot work
    user_scripts = [name for name in scripts if FIRSTBOOT_MARK.encode() in
                    (read_file(disk, f"/usr/lib/virt-sysprep/scripts/{name}", tmp_path) or b"")]  # fmt: skip
    assert user_scripts, scripts

    assert [run.tool for run in result.runs] == ["virt-customize", "virt-v2v-in-place"]  # 2.2: no --firstboot
    for run in result.runs:
        assert run.returncode == 0
        assert b"i_root = /dev/sda1" in run.log_bytes() or run.tool == "virt-customize"
    progress = real.progress["single"]
    fractions = [report.fraction for report in progress]
    assert fractions == sorted(fractions)
    assert {"inspect", "convert", "finish"} <= {report.stage for report in progress}
    assert any("Converting" in report.message for report in progress)


def test_converted_disk_is_never_converted_twice(real: Session) -> None:
    first: ConversionResult = real.jobs["single"].result()
    again = real.converter.convert(single_guest(real.images), real.options("single"))
    assert again.already_converted
    assert again.runs == ()
    assert again.inspection == first.inspection
    assert again.disks == first.disks


def test_two_disk_guest_converted_with_var_on_the_second_disk(real: Session, tmp_path: Path) -> None:
    result: ConversionResult = real.jobs["two-disk"].result()
    manifest = real.images.manifest
    root_disk, var_disk = result.disks
    assert result.inspection.root_device == "/dev/sda1"
    assert result.block_driver is BlockDriver.VIRTIO_SCSI

    fstab = read_file(root_disk, "/etc/fstab", tmp_path)
    assert fstab is not None
    assert b"/dev/sda1" not in fstab
    assert b"/dev/sdb1" not in fstab
    caps = detect_capabilities("virt-v2v-in-place")
    if needs_stable_fstab(caps, real.options("two-disk", block_driver=BlockDriver.VIRTIO_SCSI)):
        # virt-v2v 2.2 would write vda/vdb; on virtio-scsi the disks stay sdX, so fstab went to UUIDs
        # ... each read from its own disk before the pass, whatever the appliance called the disks
        assert fstab_specs(fstab) == {
            "/": f"UUID={manifest['images']['two-disk-root']['root_uuid']}",
            "/var": f"UUID={manifest['images']['two-disk-var']['var_uuid']}",
        }
        assert [run.tool for run in result.runs] == ["virt-customize", "virt-v2v-in-place"]
        customize_log = result.runs[0].log_bytes()
        for spec, point in (("/dev/sda1", "/"), ("/dev/sdb1", "/var")):  # the pass mounted them right
            assert (
                f"vmferry: fstab {spec}: {point} is mounted from it, as it should be".encode()
                in customize_log
            )

    modules = modules_in(initramfs_files(root_disk, f"/boot/initrd.img-{manifest['kernel']}", tmp_path))
    assert {"virtio_scsi", "virtio_blk"} <= modules

    # dpkg's database lives on the second disk: open-vm-tools could only be purged with it mounted
    status = read_file(var_disk, "/lib/dpkg/status", tmp_path)
    assert status is not None
    assert not dpkg_installed(status, "open-vm-tools")
    assert (
        sha256(read_file(var_disk, "/lib/vmferry/data.bin", tmp_path))
        == manifest["files"]["/var/lib/vmferry/data.bin"]
    )
    assert (
        sha256(read_file(root_disk, "/srv/vmferry-data.bin", tmp_path))
        == manifest["files"]["/srv/vmferry-data.bin"]
    )


def test_disk_without_an_os_is_stopped_by_the_preflight(real: Session) -> None:
    with pytest.raises(ConversionError) as caught:
        real.jobs["no-os"].result()
    error = caught.value
    assert error.kind is FailureKind.NO_ROOT_DEVICE
    assert not error.retryable
    assert "No root device found in this operating system image." in error.decisive_lines
    assert "every disk" in error.hint
    work = real.root / "no-os"
    assert error.log_path == work / "logs" / "preflight.log"  # virt-v2v-inspector stopped it ...
    assert error.log_path.stat().st_size > 10_000  # ... and its whole -v -x log is kept
    assert not (work / "disks" / "0-no-os.raw").exists()  # ... before any clone was made
    assert not (work / "logs" / "convert.log").exists()
    assert real.converter.ledger.get(str((work / "disks" / "0-no-os.raw").resolve())) is None
    progress = real.progress["no-os"]
    assert any(report.kind == "error" for report in progress)


def test_unconverted_guest_does_not_boot_on_virtio(real: Session) -> None:
    outcome = real.jobs["source-boot"].result()
    assert not outcome.reached_login, outcome.console_text()[-2000:]
    assert outcome.failure is not None, "no boot failure recognised before the deadline"


def test_converted_guest_boots_to_login_with_its_static_ip(real: Session, tmp_path: Path) -> None:
    result: ConversionResult = real.jobs["single"].result()
    manifest = real.images.manifest
    outcome = boot(
        result.disks[0],
        tmp_path / "boot-converted.log",
        bus="virtio-blk",
        accelerator=choose_accelerator(),
        mac=manifest["mac"],
        timeout_s=420,
        also_wait_for=(f"{FIRSTBOOT_MARK}: end".encode(),),
    )
    console = outcome.console_text()
    assert outcome.reached_login, f"{outcome.failure}: {console[-3000:]}"
    assert "virtio_blk" in console or "vda" in console
    # the user firstboot script ran and saw the VMware-era interface name with its static address
    report = console[console.index(f"{FIRSTBOOT_MARK}: begin") : console.index(f"{FIRSTBOOT_MARK}: end")]
    assert manifest["interface"] in report
    assert manifest["address"] in report
