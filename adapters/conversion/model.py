"""Value types of the guest-conversion adapter: what to convert (guest, disks, NICs), how (options,
host configuration) and what came out (inspection, progress, result). No I/O here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class BlockDriver(StrEnum):
    """The disk bus the destination instance will use (OpenStack ``hw_disk_bus`` / ``hw_scsi_model``)."""

    VIRTIO_BLK = "virtio-blk"
    VIRTIO_SCSI = "virtio-scsi"


class Firmware(StrEnum):
    """Boot firmware of the source VM."""

    BIOS = "bios"
    UEFI = "uefi"


class Accelerator(StrEnum):
    """How qemu runs the libguestfs appliance: hardware virtualisation or emulation."""

    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class SourceDisk:
    """One disk of the VM as the conversion host sees it: a local file or a block device (an attached
    volume). ``identity`` names it in the converted-disk ledger; it defaults to the resolved path."""

    path: Path
    format: str = "raw"
    identity: str | None = None

    @property
    def key(self) -> str:
        """The ledger key of this disk."""
        return self.identity or str(self.path.resolve())


@dataclass(frozen=True)
class SourceNic:
    """A NIC of the source VM. ``interface`` is the guest's name for it (e.g. ``ens192``), kept after the
    move to virtio-net so the guest's network configuration still applies; None lets the in-guest
    script look it up in the guest's own configuration."""

    mac: str
    interface: str | None = None
    model: str = "vmxnet3"
    network: str = "VM Network"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalise_mac(self.mac))


@dataclass(frozen=True)
class StaticIp:
    """A static address virt-v2v configures on the NIC with ``mac`` (Windows guests; ``--mac ...:ip:``)."""

    mac: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    nameservers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalise_mac(self.mac))


@dataclass(frozen=True)
class GuestSpec:
    """The VM to convert: every disk (all at once, in VMware order), its NICs and hardware."""

    name: str
    disks: tuple[SourceDisk, ...]
    nics: tuple[SourceNic, ...] = ()
    firmware: Firmware = Firmware.BIOS
    memory_mib: int = 1024
    vcpus: int = 1
    os_hint: str | None = None  # "linux" / "windows" from vSphere's guestId, for early checks

    def __post_init__(self) -> None:
        if not self.disks:
            raise ValueError("a guest needs at least one disk")


@dataclass(frozen=True)
class ConversionOptions:
    """Per-conversion choices.

    By default the disks are cloned into ``work_dir`` and the clones converted, so the replica stays
    syncable; ``in_place`` converts the given disks themselves. ``luks_keys`` maps a device (as the
    appliance sees it, e.g. ``/dev/sda2``) to a file holding its passphrase: only the path reaches argv.
    ``stable_fstab`` rewrites /dev/sdX entries in fstab to UUID= before conversion; None means "only
    when the installed virt-v2v cannot target the chosen block driver itself".
    """

    work_dir: Path
    block_driver: BlockDriver = BlockDriver.VIRTIO_BLK
    in_place: bool = False
    keep_interface_names: bool = True
    static_ips: tuple[StaticIp, ...] = ()
    firstboot_scripts: tuple[Path, ...] = ()
    run_scripts: tuple[Path, ...] = ()
    luks_keys: tuple[tuple[str, Path], ...] = ()
    stable_fstab: bool | None = None
    preflight: bool = False
    root: str = "first"  # never "ask": nothing can answer a prompt
    timeout_s: float = 4 * 3600.0


@dataclass(frozen=True)
class HostConfig:
    """Configuration of the conversion host (not per VM)."""

    appliance_cache: Path  # LIBGUESTFS_CACHEDIR: the supermin appliance, reused between runs
    virtio_win: Path | None = None  # virtio-win ISO or directory, needed for Windows guests
    accelerator: Accelerator | None = None  # None: probe once
    in_place_tool: str = "virt-v2v-in-place"
    inspector_tool: str = "virt-v2v-inspector"
    customize_tool: str = "virt-customize"
    filesystems_tool: str = "virt-filesystems"  # lists a non-raw disk's filesystem UUIDs


@dataclass(frozen=True)
class Inspection:
    """What libguestfs found in the guest."""

    os_type: str  # linux, windows, ...
    distribution: str  # debian, rhel, windows, ...
    major_version: int
    minor_version: int
    product_name: str
    arch: str
    firmware: Firmware
    root_device: str


@dataclass(frozen=True)
class Progress:
    """One progress report: a stage name, a monotonic completion estimate and virt-v2v's message."""

    stage: str
    fraction: float
    message: str
    kind: str = "message"  # message, info, warning, error (virt-v2v's --machine-readable types)


@dataclass(frozen=True)
class ToolRun:
    """One run of a libguestfs tool, with its full log kept on disk."""

    tool: str
    argv: tuple[str, ...]
    returncode: int
    duration_s: float
    log_path: Path
    peak_rss_kib: int  # largest resident set of the tool and the qemu it reaped

    def log_bytes(self) -> bytes:
        """The whole log, e.g. to store it in an object store."""
        return self.log_path.read_bytes()


@dataclass(frozen=True)
class ConversionResult:
    """The outcome of converting a guest (or of finding it already converted)."""

    inspection: Inspection
    disks: tuple[Path, ...]  # the converted disks (clones unless converted in place)
    runs: tuple[ToolRun, ...] = ()
    block_driver: BlockDriver = BlockDriver.VIRTIO_BLK
    already_converted: bool = False
    warnings: tuple[str, ...] = field(default=())


def normalise_mac(mac: str) -> str:
    """Lower-case colon form; vSphere, Neutron and guests disagree on case and separators."""
    digits = mac.replace("-", ":").lower()
    parts = digits.split(":")
    if len(parts) != 6 or not all(
        len(part) == 2 and all(c in "0123456789abcdef" for c in part) for part in parts
    ):
        raise ValueError(f"not a MAC address: {mac!r}")
    return digits
