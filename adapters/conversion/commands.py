"""Argument builders for the libguestfs tools: the libvirt domain XML that hands virt-v2v every disk of a
VM at once, and the argv of virt-v2v-in-place, virt-v2v-inspector and virt-customize. Pure functions:
they return lists and strings, run nothing, and never put a secret in argv (LUKS keys go by file)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from .capabilities import Capabilities
from .model import BlockDriver, ConversionOptions, Firmware, GuestSpec, StaticIp

# Where VMware puts disks and what the guest calls them: sda, sdb, ... on the first SCSI controller.
_SOURCE_BUS = "scsi"


def disk_target(index: int) -> str:
    """Linux-style device name of the index-th disk: sda .. sdz, sdaa .."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return "sd" + letters


def libvirt_xml(guest: GuestSpec, disks: Sequence[Path] | None = None) -> str:
    """A libvirt domain describing the VM with ALL its disks, for ``-i libvirtxml``.

    virt-v2v inspects the guest across every disk it is given (fstab may mount /var or /home from a
    second disk), so the disks must go in together. ``disks`` overrides the paths (the clones).
    """
    paths = list(disks) if disks is not None else [disk.path for disk in guest.disks]
    if len(paths) != len(guest.disks):
        raise ValueError("one path per disk of the guest is needed")
    domain = ET.Element("domain", type="kvm")
    ET.SubElement(domain, "name").text = guest.name
    ET.SubElement(domain, "memory", unit="KiB").text = str(guest.memory_mib * 1024)
    ET.SubElement(domain, "vcpu").text = str(guest.vcpus)
    os_element = ET.SubElement(domain, "os")
    if guest.firmware is Firmware.UEFI:
        os_element.set("firmware", "efi")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    for index, (disk, path) in enumerate(zip(guest.disks, paths, strict=True)):
        is_block = path.is_block_device()
        element = ET.SubElement(devices, "disk", type="block" if is_block else "file", device="disk")
        ET.SubElement(element, "driver", name="qemu", type=disk.format)
        ET.SubElement(element, "source", {"dev" if is_block else "file": str(path)})
        ET.SubElement(element, "target", dev=disk_target(index), bus=_SOURCE_BUS)
    for nic in guest.nics:
        element = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(element, "mac", address=nic.mac)
        ET.SubElement(element, "source", network=nic.network)
        ET.SubElement(element, "model", type=nic.model)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def mac_ip_argument(static: StaticIp) -> str:
    """``--mac`` value that makes virt-v2v give a Windows NIC a static address:
    ``MAC:ip:ADDRESS,GATEWAY,PREFIX[,NS...]`` (virt-v2v reads the fields by position, so a missing
    gateway stays an empty field in front of the prefix)."""
    fields = [str(static.address.ip), str(static.gateway) if static.gateway else ""]
    fields.append(str(static.address.network.prefixlen))
    fields.extend(str(server) for server in static.nameservers)
    return f"{static.mac}:ip:{','.join(fields)}"


def _common_args(options: ConversionOptions, machine_readable: Path | None) -> list[str]:
    args = ["-v", "-x"]  # the full debug log is what makes a failure diagnosable later
    if machine_readable is not None:
        args.append(f"--machine-readable=file:{machine_readable}")
    args += ["--root", options.root]
    for device, key_file in options.luks_keys:
        args += ["--key", f"{device}:file:{key_file}"]
    return args


def in_place_args(
    caps: Capabilities,
    options: ConversionOptions,
    domain_xml: Path,
    machine_readable: Path | None,
    scripts_in_tool: bool = False,
    extra_run: Sequence[Path] = (),
) -> list[str]:
    """argv of virt-v2v-in-place over the domain XML (every disk).

    ``scripts_in_tool``: the installed version accepts ``--run``/``--firstboot`` and the caller wants
    them there (otherwise they go to a separate virt-customize pass). ``extra_run`` are vmferry's own
    scripts (NIC names, fstab) to run before the user's.
    """
    args = [caps.tool, "-i", "libvirtxml", *(_common_args(options, machine_readable))]
    if caps.supports_block_driver:
        args += ["--block-driver", options.block_driver.value]
    if options.static_ips:
        if not caps.supports_mac_ip:
            raise ValueError(f"{caps.tool} {caps.version_text} cannot set static IPs (--mac ...:ip:)")
        for static in options.static_ips:
            args += ["--mac", mac_ip_argument(static)]
    if scripts_in_tool:
        for script in (*extra_run, *options.run_scripts):
            args += ["--run", str(script)]
        for script in options.firstboot_scripts:
            args += ["--firstboot", str(script)]
    args.append(str(domain_xml))
    return args


def inspector_args(
    caps: Capabilities, options: ConversionOptions, domain_xml: Path, output_xml: Path, machine_readable: Path
) -> list[str]:
    """argv of virt-v2v-inspector: the conversion is rehearsed in throw-away overlays (the disks are
    not written) and the inspection lands in ``output_xml``."""
    args = [caps.tool, "-i", "libvirtxml", *(_common_args(options, machine_readable))]
    args += ["-O", str(output_xml), str(domain_xml)]
    return args


def customize_args(
    tool: str,
    disks: Sequence[tuple[Path, str]],
    options: ConversionOptions,
    run_scripts: Sequence[Path],
    firstboot_scripts: Sequence[Path],
) -> list[str]:
    """argv of a virt-customize pass over all disks, for what the installed virt-v2v-in-place cannot do
    itself (``--run``/``--firstboot`` before 2.5). No network: the pass must not depend on the guest
    reaching anything."""
    args = [tool, "-v", "-x", "--no-network"]
    for device, key_file in options.luks_keys:
        args += ["--key", f"{device}:file:{key_file}"]
    for path, disk_format in disks:
        args += ["--format", disk_format, "-a", str(path)]
    for script in run_scripts:
        args += ["--run", str(script)]
    for script in firstboot_scripts:
        args += ["--firstboot", str(script)]
    return args


def needs_stable_fstab(caps: Capabilities, options: ConversionOptions) -> bool:
    """Whether /dev/sdX entries must become UUID= before conversion: virt-v2v without ``--block-driver``
    always renames sdX to vdX (virtio-blk), which does not boot on virtio-scsi where disks stay sdX."""
    if options.stable_fstab is not None:
        return options.stable_fstab
    return options.block_driver is BlockDriver.VIRTIO_SCSI and not caps.supports_block_driver


def windows_environment(virtio_win: Path | None) -> dict[str, str]:
    """Environment that tells virt-v2v where the virtio-win drivers are (ISO or unpacked directory)."""
    return {"VIRTIO_WIN": str(virtio_win)} if virtio_win is not None else {}
