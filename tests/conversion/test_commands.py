"""Argument construction for virt-v2v-in-place, virt-v2v-inspector and virt-customize (Linux and
Windows), the libvirt XML covering all disks, and capability detection from the captured 2.2.0 output."""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmferry.adapters.conversion import commands
from vmferry.adapters.conversion.capabilities import Capabilities, parse_capabilities
from vmferry.adapters.conversion.model import (
    BlockDriver,
    ConversionOptions,
    Firmware,
    GuestSpec,
    SourceDisk,
    SourceNic,
    StaticIp,
)

DATA = Path(__file__).parent / "data"


def installed_2_2() -> Capabilities:
    """Capabilities parsed from what Debian 12's virt-v2v-in-place 2.2.0 printed (captured files)."""
    return parse_capabilities(
        "virt-v2v-in-place",
        (DATA / "in-place-2.2.0-version.txt").read_text(),
        (DATA / "in-place-2.2.0-features.txt").read_text(),
        (DATA / "in-place-2.2.0-help.txt").read_text(),
    )


def newer() -> Capabilities:
    """A later virt-v2v-in-place (2.5+): it takes customize options and --block-driver. Not installable on
    Debian 12, so its abilities are spelled out here."""
    base = installed_2_2()
    return Capabilities(
        tool="virt-v2v-in-place",
        version=(2, 7, 1),
        features=base.features,
        options=base.options | {"--block-driver", "--firstboot", "--run", "-O"},
    )


def guest(tmp_path: Path, disks: int = 2, **kwargs: object) -> GuestSpec:
    paths = []
    for index in range(disks):
        path = tmp_path / f"disk{index}.raw"
        path.write_bytes(b"")
        paths.append(SourceDisk(path))
    return GuestSpec(
        name="web-01",
        disks=tuple(paths),
        nics=(SourceNic("00:50:56:AB:CD:EF", interface="ens192"),),
        **kwargs,
    )  # type: ignore[arg-type]


def test_capabilities_of_debian_2_2() -> None:
    caps = installed_2_2()
    assert caps.version == (2, 2, 0)
    assert caps.supports_mac_ip
    assert not caps.supports_firstboot
    assert not caps.supports_run
    assert not caps.supports_block_driver
    assert not caps.supports_output_xml
    assert {"--root", "--mac", "--key", "--machine-readable"} <= caps.options
    assert "input:libvirtxml" in caps.features


def test_libvirt_xml_lists_every_disk_in_order(tmp_path: Path) -> None:
    spec = guest(tmp_path, disks=3, firmware=Firmware.UEFI, memory_mib=4096, vcpus=2)
    clones = [tmp_path / f"clone{index}.raw" for index in range(3)]
    domain = ET.fromstring(commands.libvirt_xml(spec, clones))
    disks = domain.findall("devices/disk")
    assert [disk.find("source").get("file") for disk in disks] == [str(path) for path in clones]  # type: ignore[union-attr]
    assert [disk.find("target").get("dev") for disk in disks] == ["sda", "sdb", "sdc"]  # type: ignore[union-attr]
    assert {disk.find("driver").get("type") for disk in disks} == {"raw"}  # type: ignore[union-attr]
    assert domain.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert domain.findtext("memory") == str(4096 * 1024)
    assert domain.findtext("vcpu") == "2"
    nic = domain.find("devices/interface")
    assert nic is not None
    assert nic.find("mac").get("address") == "00:50:56:ab:cd:ef"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "vmxnet3"  # type: ignore[union-attr]


def test_libvirt_xml_uses_block_type_for_devices(tmp_path: Path) -> None:
    spec = GuestSpec(name="vol", disks=(SourceDisk(Path("/dev/null")),))
    # /dev/null is a character device, not a block device: must stay a file source
    domain = ET.fromstring(commands.libvirt_xml(spec))
    assert domain.find("devices/disk").get("type") == "file"  # type: ignore[union-attr]
    block = next(
        (path for path in Path("/sys/block").iterdir() if (Path("/dev") / path.name).is_block_device()), None
    )
    if block is None:
        pytest.skip("no block device visible on this machine")
    domain = ET.fromstring(
        commands.libvirt_xml(GuestSpec(name="vol", disks=(SourceDisk(Path("/dev") / block.name),)))
    )
    disk = domain.find("devices/disk")
    assert disk is not None
    assert disk.get("type") == "block"
    assert disk.find("source").get("dev") == f"/dev/{block.name}"  # type: ignore[union-attr]


def test_disk_target_names() -> None:
    assert [commands.disk_target(index) for index in (0, 1, 25, 26, 27, 701, 702)] == [
        "sda", "sdb", "sdz", "sdaa", "sdab", "sdzz", "sdaaa",
    ]  # fmt: skip


def test_in_place_args_on_2_2(tmp_path: Path) -> None:
    options = ConversionOptions(work_dir=tmp_path, luks_keys=(("/dev/sda2", tmp_path / "key"),))
    argv = commands.in_place_args(installed_2_2(), options, tmp_path / "d.xml", tmp_path / "p.jsonl")
    assert argv[:3] == ["virt-v2v-in-place", "-i", "libvirtxml"]
    assert argv[-1] == str(tmp_path / "d.xml")
    assert f"--machine-readable=file:{tmp_path / 'p.jsonl'}" in argv
    assert argv[argv.index("--root") + 1] == "first"
    assert argv[argv.index("--key") + 1] == f"/dev/sda2:file:{tmp_path / 'key'}"  # the key itself never
    assert "-v" in argv
    assert "-x" in argv
    assert "--block-driver" not in argv  # 2.2 would reject it
    assert "--run" not in argv
    assert "--firstboot" not in argv


def test_in_place_args_pass_block_driver_and_scripts_when_supported(tmp_path: Path) -> None:
    options = ConversionOptions(
        work_dir=tmp_path,
        block_driver=BlockDriver.VIRTIO_SCSI,
        run_scripts=(tmp_path / "user-run.sh",),
        firstboot_scripts=(tmp_path / "first.sh",),
    )
    argv = commands.in_place_args(
        newer(), options, tmp_path / "d.xml", None, scripts_in_tool=True, extra_run=(tmp_path / "nic.sh",)
    )
    assert argv[argv.index("--block-driver") + 1] == "virtio-scsi"
    runs = [argv[index + 1] for index, arg in enumerate(argv) if arg == "--run"]
    assert runs == [str(tmp_path / "nic.sh"), str(tmp_path / "user-run.sh")]  # vmferry's scripts first
    assert argv[argv.index("--firstboot") + 1] == str(tmp_path / "first.sh")
    assert not any(arg.startswith("--machine-readable") for arg in argv)


def test_root_choice_is_passed(tmp_path: Path) -> None:
    argv = commands.in_place_args(
        installed_2_2(), ConversionOptions(work_dir=tmp_path, root="/dev/sdb2"), tmp_path / "d.xml", None
    )
    assert argv[argv.index("--root") + 1] == "/dev/sdb2"


def test_windows_static_ip_mapping(tmp_path: Path) -> None:
    static = (
        StaticIp(
            "00-50-56-AA-BB-01",
            ipaddress.ip_interface("10.20.30.40/24"),
            ipaddress.ip_address("10.20.30.1"),
            (ipaddress.ip_address("10.20.0.53"), ipaddress.ip_address("10.20.0.54")),
        ),
        StaticIp("00:50:56:aa:bb:02", ipaddress.ip_interface("2001:db8::10/64")),
    )
    options = ConversionOptions(work_dir=tmp_path, static_ips=static)
    argv = commands.in_place_args(installed_2_2(), options, tmp_path / "d.xml", None)
    macs = [argv[index + 1] for index, arg in enumerate(argv) if arg == "--mac"]
    assert macs == [
        "00:50:56:aa:bb:01:ip:10.20.30.40,10.20.30.1,24,10.20.0.53,10.20.0.54",
        "00:50:56:aa:bb:02:ip:2001:db8::10,,64",
    ]


def test_static_ips_refused_without_mac_ip_feature(tmp_path: Path) -> None:
    caps = installed_2_2()
    old = Capabilities(caps.tool, (1, 42, 0), caps.features - {"mac-ip-option"}, caps.options)
    options = ConversionOptions(
        work_dir=tmp_path, static_ips=(StaticIp("00:50:56:aa:bb:01", ipaddress.ip_interface("10.0.0.5/24")),)
    )
    with pytest.raises(ValueError, match="static IPs"):
        commands.in_place_args(old, options, tmp_path / "d.xml", None)


def test_windows_virtio_win_location_goes_by_environment() -> None:
    assert commands.windows_environment(Path("/srv/virtio-win-0.1.240.iso")) == {
        "VIRTIO_WIN": "/srv/virtio-win-0.1.240.iso"
    }
    assert commands.windows_environment(None) == {}


def test_inspector_args(tmp_path: Path) -> None:
    caps = parse_capabilities(
        "virt-v2v-inspector",
        "virt-v2v-inspector 2.2.0",
        "",
        (DATA / "inspector-2.2.0-help.txt").read_text(),
    )
    assert caps.supports_output_xml
    argv = commands.inspector_args(
        caps,
        ConversionOptions(work_dir=tmp_path),
        tmp_path / "d.xml",
        tmp_path / "o.xml",
        tmp_path / "p.jsonl",
    )
    assert argv[:3] == ["virt-v2v-inspector", "-i", "libvirtxml"]
    assert argv[argv.index("-O") + 1] == str(tmp_path / "o.xml")
    assert argv[-1] == str(tmp_path / "d.xml")
    assert argv[argv.index("--root") + 1] == "first"


def test_customize_fallback_args(tmp_path: Path) -> None:
    options = ConversionOptions(work_dir=tmp_path, luks_keys=(("/dev/sda2", tmp_path / "key"),))
    argv = commands.customize_args(
        "virt-customize",
        [(tmp_path / "a.raw", "raw"), (tmp_path / "b.qcow2", "qcow2")],
        options,
        [tmp_path / "nic.sh", tmp_path / "user.sh"],
        [tmp_path / "first.sh"],
    )
    assert argv[:2] == ["virt-customize", "-v"]
    assert "--no-network" in argv
    assert argv[argv.index("--key") + 1] == f"/dev/sda2:file:{tmp_path / 'key'}"
    # each disk is preceded by its own format
    first = argv.index(str(tmp_path / "a.raw"))
    second = argv.index(str(tmp_path / "b.qcow2"))
    assert argv[first - 3 : first] == ["--format", "raw", "-a"]
    assert argv[second - 3 : second] == ["--format", "qcow2", "-a"]
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "--run"] == [
        str(tmp_path / "nic.sh"),
        str(tmp_path / "user.sh"),
    ]
    assert argv[argv.index("--firstboot") + 1] == str(tmp_path / "first.sh")


def test_stable_fstab_only_when_the_tool_cannot_target_virtio_scsi(tmp_path: Path) -> None:
    scsi = ConversionOptions(work_dir=tmp_path, block_driver=BlockDriver.VIRTIO_SCSI)
    blk = ConversionOptions(work_dir=tmp_path)
    assert commands.needs_stable_fstab(installed_2_2(), scsi)
    assert not commands.needs_stable_fstab(newer(), scsi)
    assert not commands.needs_stable_fstab(installed_2_2(), blk)
    forced = ConversionOptions(work_dir=tmp_path, stable_fstab=True)
    assert commands.needs_stable_fstab(newer(), forced)


def test_bad_mac_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a MAC"):
        SourceNic("00:50:56:zz:00:01")
