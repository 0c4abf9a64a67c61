"""The converter's checks that stop a conversion before any appliance starts (Windows without virtio-win,
virtio-scsi for Windows on a virt-v2v without --block-driver, a prompt that nobody answers, half-converted
disk sets), and the post-conversion Windows driver check. Capabilities come from the installed tools."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from vmferry.adapters.conversion import (
    BlockDriver,
    ConversionError,
    ConversionOptions,
    Converter,
    FailureKind,
    FileLedger,
    GuestSpec,
    HostConfig,
    SourceDisk,
    detect_capabilities,
)
from vmferry.adapters.conversion.capabilities import customize_reverses_disks
from vmferry.adapters.conversion.converter import _check_windows_drivers, _phases
from vmferry.adapters.conversion.model import Firmware, Inspection, ToolRun
from vmferry.adapters.conversion.storage import new_record


@pytest.fixture
def converter(tmp_path: Path, conversion_tools: None) -> Converter:
    return Converter(HostConfig(appliance_cache=tmp_path / "appliance"), FileLedger(tmp_path / "ledger"))


def windows_guest(tmp_path: Path) -> GuestSpec:
    disk = tmp_path / "c.raw"
    disk.write_bytes(b"\0" * 512)
    return GuestSpec(name="win-01", disks=(SourceDisk(disk),), os_hint="windows9Server64Guest")


def test_windows_without_virtio_win_fails_before_any_work(converter: Converter, tmp_path: Path) -> None:
    options = ConversionOptions(work_dir=tmp_path / "work")
    with pytest.raises(ConversionError) as caught:
        converter.convert(windows_guest(tmp_path), options)
    assert caught.value.kind is FailureKind.MISSING_VIRTIO_WIN
    assert "virtio_win" in caught.value.hint
    assert not (tmp_path / "work").exists()  # nothing cloned, nothing run


def test_windows_on_virtio_scsi_needs_block_driver_support(tmp_path: Path, conversion_tools: None) -> None:
    iso = tmp_path / "virtio-win.iso"
    iso.write_bytes(b"")
    converter = Converter(
        HostConfig(appliance_cache=tmp_path / "appliance", virtio_win=iso), FileLedger(tmp_path / "ledger")
    )
    options = ConversionOptions(work_dir=tmp_path / "work", block_driver=BlockDriver.VIRTIO_SCSI)
    if detect_capabilities("virt-v2v-in-place").supports_block_driver:
        pytest.skip("the installed virt-v2v-in-place can target virtio-scsi itself")
    with pytest.raises(ConversionError) as caught:
        converter.convert(windows_guest(tmp_path), options)
    assert caught.value.kind is FailureKind.UNSUPPORTED_BLOCK_DRIVER
    assert "hw_disk_bus" in caught.value.hint


def test_root_ask_is_refused(converter: Converter, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"")
    with pytest.raises(ValueError, match="ask"):
        converter.convert(
            GuestSpec(name="x", disks=(SourceDisk(disk),)), ConversionOptions(work_dir=tmp_path, root="ask")
        )


def test_run_scripts_are_refused_for_windows(tmp_path: Path, conversion_tools: None) -> None:
    iso = tmp_path / "virtio-win.iso"
    iso.write_bytes(b"")
    converter = Converter(
        HostConfig(appliance_cache=tmp_path / "appliance", virtio_win=iso), FileLedger(tmp_path / "ledger")
    )
    options = ConversionOptions(work_dir=tmp_path / "work", run_scripts=(tmp_path / "x.sh",))
    with pytest.raises(ConversionError) as caught:
        converter.convert(windows_guest(tmp_path), options)
    assert caught.value.kind is FailureKind.UNSUPPORTED_GUEST


def test_missing_disk(converter: Converter, tmp_path: Path) -> None:
    guest = GuestSpec(name="x", disks=(SourceDisk(tmp_path / "gone.raw"),))
    with pytest.raises(ConversionError, match="does not exist"):
        converter.convert(guest, ConversionOptions(work_dir=tmp_path))


def test_half_converted_disk_set_is_refused(converter: Converter, tmp_path: Path) -> None:
    first, second = tmp_path / "a.raw", tmp_path / "b.raw"
    first.write_bytes(b"")
    second.write_bytes(b"")
    inspection = Inspection("linux", "debian", 12, 0, "12", "x86_64", Firmware.BIOS, "/dev/sda1")
    converter.ledger.put(new_record("disk-a", ["disk-a"], inspection, "virtio-blk", "2.2.0", []))
    disks = (SourceDisk(first, identity="disk-a"), SourceDisk(second, identity="disk-b"))
    guest = GuestSpec(name="x", disks=disks)
    with pytest.raises(ConversionError) as caught:
        converter.convert(guest, ConversionOptions(work_dir=tmp_path / "w", in_place=True))
    assert caught.value.kind is FailureKind.ALREADY_CONVERTED


def test_in_place_disk_already_converted_is_not_touched(converter: Converter, tmp_path: Path) -> None:
    disk = tmp_path / "a.raw"
    disk.write_bytes(b"converted before")
    inspection = Inspection("linux", "debian", 12, 0, "12", "x86_64", Firmware.BIOS, "/dev/sda1")
    key = "vm-1/disk-2000"
    converter.ledger.put(new_record(key, [key], inspection, "virtio-blk", "2.2.0", [], paths=[str(disk)]))
    guest = GuestSpec(name="x", disks=(SourceDisk(disk, identity="vm-1/disk-2000"),))
    result = converter.convert(guest, ConversionOptions(work_dir=tmp_path / "w", in_place=True))
    assert result.already_converted
    assert result.inspection == inspection
    assert result.disks == (disk,)  # where the converted disk is, as recorded
    assert disk.read_bytes() == b"converted before"


def test_windows_without_drivers_for_its_version_is_a_failure(tmp_path: Path, conversion_tools: None) -> None:
    caps = detect_capabilities("virt-v2v-in-place")
    run = ToolRun("virt-v2v-in-place", (), 0, 1.0, tmp_path / "convert.log", 0)
    warning = (
        "there are no virtio drivers available for this version of Windows (10.0 x86_64 Server). "
        "virt-v2v looks for drivers in /usr/share/virtio-win"
    )
    with pytest.raises(ConversionError) as caught:
        _check_windows_drivers(caps, ConversionOptions(work_dir=tmp_path), (warning,), run)
    assert caught.value.kind is FailureKind.MISSING_VIRTIO_WIN
    assert caught.value.decisive_lines == (warning,)
    _check_windows_drivers(caps, ConversionOptions(work_dir=tmp_path), ("something harmless",), run)


def test_progress_spans_cover_the_whole_conversion() -> None:
    for preflight in (False, True):
        for customize in (False, True):
            spans = _phases(preflight, customize)
            assert spans["convert"][1] == pytest.approx(1.0)
            assert spans["preflight"][0] == 0.0
            assert spans["preflight"][1] <= spans["customize"][0] + 1e-9
            assert spans["customize"][1] <= spans["convert"][0] + 1e-9


def test_customize_disk_order_is_found_out_from_the_tool(conversion_tools: None) -> None:
    started = time.monotonic()
    reverses = customize_reverses_disks("virt-customize")
    assert isinstance(reverses, bool)
    assert time.monotonic() - started < 30  # stopped before the appliance starts
    version = subprocess.run(["virt-customize", "--version"], capture_output=True, text=True, check=True)
    if version.stdout.startswith("virt-customize 1.48."):
        assert reverses  # Debian 12's libguestfs attaches -a disks last to first
