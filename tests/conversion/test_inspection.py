"""Inspection parsing: from the verbose log of a real conversion (captured) and from inspector XML."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.adapters.conversion.inspection import inspection_from_inspector_xml, inspection_from_log
from vmferry.adapters.conversion.model import Firmware, Inspection

LOGS = Path(__file__).parent / "logs"


def test_inspection_from_a_real_conversion_log() -> None:
    inspection = inspection_from_log((LOGS / "converted-inspection.log").read_text())
    assert inspection == Inspection(
        os_type="linux",
        distribution="debian",
        major_version=12,
        minor_version=15,
        product_name="12.15",
        arch="x86_64",
        firmware=Firmware.BIOS,
        root_device="/dev/sda1",
    )


def test_no_inspection_in_a_failed_log() -> None:
    assert inspection_from_log((LOGS / "no-root-device.log").read_text()) is None


def test_the_last_block_wins_and_uefi_is_recognised() -> None:
    log = (
        "i_root = /dev/sda1\ni_type = linux\n...\n"
        "i_root = /dev/sda2\ni_type = windows\ni_distro = windows\ni_major_version = 10\n"
        "i_minor_version = 0\ni_firmware = UEFI (devices: /dev/sda1)\n"
    )
    inspection = inspection_from_log(log)
    assert inspection is not None
    assert inspection.root_device == "/dev/sda2"
    assert (inspection.os_type, inspection.firmware) == ("windows", Firmware.UEFI)


def test_inspector_xml_of_2_2_has_no_root_and_no_firmware() -> None:
    captured = Path(__file__).parent / "data" / "inspector-2.2.0-debian12.xml"  # real run on the test guest
    inspection = inspection_from_inspector_xml(captured, Firmware.UEFI)
    assert (inspection.os_type, inspection.distribution, inspection.major_version) == ("linux", "debian", 12)
    assert inspection.product_name == "12.15"
    assert inspection.root_device == ""
    assert inspection.firmware is Firmware.UEFI  # the hint: 2.2 does not say


def test_inspector_xml_of_later_versions(tmp_path: Path) -> None:
    path = tmp_path / "inspection.xml"
    path.write_text(
        "<?xml version='1.0' encoding='utf-8'?>\n<v2v-inspection>\n  <program>virt-v2v-inspector</program>\n"
        "  <operatingsystem>\n    <name>windows</name>\n    <distro>windows</distro>\n"
        "    <osinfo>win2k19</osinfo>\n    <arch>x86_64</arch>\n    <major_version>10</major_version>\n"
        "    <minor_version>0</minor_version>\n"
        "    <product_name>Windows Server 2019 Standard</product_name>\n"
        "    <root>/dev/sda2</root>\n  </operatingsystem>\n  <firmware type='uefi'/>\n</v2v-inspection>\n"
    )
    inspection = inspection_from_inspector_xml(path)
    assert inspection.product_name == "Windows Server 2019 Standard"
    assert inspection.firmware is Firmware.UEFI
    assert inspection.root_device == "/dev/sda2"
    assert inspection.major_version == 10


def test_inspector_xml_without_os_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.xml"
    path.write_text("<v2v-inspection/>")
    with pytest.raises(ValueError, match="operatingsystem"):
        inspection_from_inspector_xml(path)
