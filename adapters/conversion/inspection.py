"""Read what libguestfs found in the guest: from the ``i_root = ...`` block virt-v2v prints in verbose
mode (virt-v2v-in-place 2.2 has no ``-O`` result file) or from virt-v2v-inspector's XML."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .model import Firmware, Inspection

_FIELD = re.compile(r"^i_(?P<name>[a-z_]+) = (?P<value>.*)$", re.MULTILINE)


def _firmware(text: str) -> Firmware:
    return Firmware.UEFI if "uefi" in text.lower() else Firmware.BIOS


def _number(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def inspection_from_log(log_text: str) -> Inspection | None:
    """The last inspection block of a ``-v`` virt-v2v log, or None when there is none."""
    fields: dict[str, str] = {}
    for match in _FIELD.finditer(log_text):
        if match["name"] == "root":
            fields = {}  # a later block (another pass) replaces an earlier one
        fields[match["name"]] = match["value"].strip()
    if "root" not in fields:
        return None
    return Inspection(
        os_type=fields.get("type", ""),
        distribution=fields.get("distro", ""),
        major_version=_number(fields.get("major_version", "0")),
        minor_version=_number(fields.get("minor_version", "0")),
        product_name=fields.get("product_name", ""),
        arch=fields.get("arch", ""),
        firmware=_firmware(fields.get("firmware", "")),
        root_device=fields["root"],
    )


def inspection_from_inspector_xml(path: Path, firmware_hint: Firmware = Firmware.BIOS) -> Inspection:
    """Parse virt-v2v-inspector's ``-O`` output. Version 2.2 writes neither the root device nor the
    firmware there: the root stays empty and the firmware is ``firmware_hint`` (the VM's setting)."""
    root = ET.parse(path).getroot()  # noqa: S314 -- written by the local virt-v2v-inspector we just ran
    system = root.find("operatingsystem")
    if system is None:
        raise ValueError(f"{path}: no <operatingsystem> element")

    def text(name: str) -> str:
        return (system.findtext(name) or "").strip()

    firmware = root.find("firmware")
    firmware_type = firmware.get("type", "") if firmware is not None else firmware_hint.value
    return Inspection(
        os_type=text("name"),
        distribution=text("distro"),
        major_version=_number(text("major_version") or "0"),
        minor_version=_number(text("minor_version") or "0"),
        product_name=text("product_name"),
        arch=text("arch"),
        firmware=_firmware(firmware_type),
        root_device=text("root"),
    )
