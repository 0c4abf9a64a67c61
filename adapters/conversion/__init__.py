"""Guest conversion: make a VMware guest's disks boot on KVM with virt-v2v-in-place (libguestfs).

The pieces: argument builders (``commands``: libvirt XML covering every disk, virt-v2v-in-place,
virt-v2v-inspector and virt-customize argv, Windows virtio-win and static-IP arguments), what the
installed tools can do (``capabilities``), the KVM-or-TCG choice (``accel``), the process runner with
progress and kept logs (``runner``), failure classification (``errors``), in-guest scripts for NIC names
and fstab (``guestscripts``), the filesystem UUIDs of each disk read on the host for the fstab script
(``fsuuids``), clones and the converted-disk ledger (``storage``) and the orchestration
(``converter.Converter``). Nothing here knows about NATS or events: the ``convert`` function wires it.
"""

from .accel import choose_accelerator, guestfs_environment
from .capabilities import Capabilities, detect_capabilities
from .converter import Converter
from .errors import ConversionError, Diagnosis, FailureKind, classify
from .model import (
    Accelerator,
    BlockDriver,
    ConversionOptions,
    ConversionResult,
    Firmware,
    GuestSpec,
    HostConfig,
    Inspection,
    Progress,
    SourceDisk,
    SourceNic,
    StaticIp,
    ToolRun,
)
from .storage import CloneMethod, ConversionLedger, ConvertedRecord, FileLedger, clone_disk

__all__ = [
    "Accelerator",
    "BlockDriver",
    "Capabilities",
    "CloneMethod",
    "ConversionError",
    "ConversionLedger",
    "ConversionOptions",
    "ConversionResult",
    "ConvertedRecord",
    "Converter",
    "Diagnosis",
    "FailureKind",
    "FileLedger",
    "Firmware",
    "GuestSpec",
    "HostConfig",
    "Inspection",
    "Progress",
    "SourceDisk",
    "SourceNic",
    "StaticIp",
    "ToolRun",
    "choose_accelerator",
    "classify",
    "clone_disk",
    "detect_capabilities",
    "guestfs_environment",
]
