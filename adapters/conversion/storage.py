"""Disk handling around a conversion: clone the replica before converting it (reflink when the
filesystem can share extents, else a sparse copy), and the ledger that records converted disks so no
disk is ever converted twice (virt-v2v is not idempotent: a second run overwrites the pre-v2v initrd
backup and stacks its changes)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import msgspec

from .model import Firmware, Inspection

_FICLONE = 0x40049409  # linux/fs.h: share all extents of one file with another (btrfs, XFS, bcachefs)


class CloneMethod(StrEnum):
    """How a clone was made."""

    REFLINK = "reflink"
    COPY = "copy"


def clone_disk(source: Path, target: Path) -> CloneMethod:
    """Make ``target`` an independent copy of ``source`` (a file or a block device).

    A reflink is instant and shares storage until either side is written; where the filesystem cannot
    (ext4, different filesystems, block devices) a sparse copy is made. ``target`` is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    if source.is_file() and _reflink(source, partial):
        partial.replace(target)
        return CloneMethod.REFLINK
    # GNU cp keeps holes (SEEK_DATA/SEEK_HOLE) and uses copy_file_range where it can.
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=never", "--", str(source), str(partial)],
        check=True,
        capture_output=True,
    )
    partial.replace(target)
    return CloneMethod.COPY


def _reflink(source: Path, target: Path) -> bool:
    with source.open("rb") as src, target.open("wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        except OSError:
            pass
        else:
            return True
    target.unlink(missing_ok=True)
    return False


class InspectionRecord(msgspec.Struct, frozen=True):
    """The inspection as stored in the ledger."""

    os_type: str
    distribution: str
    major_version: int
    minor_version: int
    product_name: str
    arch: str
    firmware: str
    root_device: str

    @classmethod
    def of(cls, inspection: Inspection) -> InspectionRecord:
        """From the adapter's value type."""
        return cls(**{**inspection.__dict__, "firmware": inspection.firmware.value})

    def to_inspection(self) -> Inspection:
        """Back to the adapter's value type."""
        return Inspection(**{**msgspec.structs.asdict(self), "firmware": Firmware(self.firmware)})


class ConvertedRecord(msgspec.Struct, frozen=True):
    """Proof that a disk set was converted: what, when, by which tool version, with what result."""

    key: str
    disks: list[str]  # ledger keys of the converted disks
    paths: list[str]  # where the converted disks are
    inspection: InspectionRecord
    block_driver: str
    tool_version: str
    converted_at: float
    logs: list[str] = msgspec.field(default_factory=list)


class ConversionLedger(Protocol):
    """Where "this disk is converted" is remembered (a file ledger here; the per-VM KV state later)."""

    def get(self, key: str) -> ConvertedRecord | None:
        """The record for a disk key, if it was converted."""
        ...

    def put(self, record: ConvertedRecord) -> None:
        """Remember a conversion (atomically)."""
        ...


@dataclass(frozen=True)
class FileLedger:
    """One JSON file per converted disk key in ``directory``; writes are atomic (rename)."""

    directory: Path

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, key: str) -> ConvertedRecord | None:
        """The record for ``key``, or None."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return msgspec.json.decode(data, type=ConvertedRecord)

    def put(self, record: ConvertedRecord) -> None:
        """Write the record for every disk key it covers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = msgspec.json.encode(record)
        for key in {record.key, *record.disks}:
            path = self._path(key)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(payload)
            partial.replace(path)


def new_record(
    key: str,
    disks: list[str],
    inspection: Inspection,
    block_driver: str,
    tool_version: str,
    logs: list[str],
    paths: list[str] | None = None,
) -> ConvertedRecord:
    """A record stamped now (``paths`` default to the keys, which are paths for clones)."""
    return ConvertedRecord(
        key=key,
        disks=disks,
        paths=paths if paths is not None else disks,
        inspection=InspectionRecord.of(inspection),
        block_driver=block_driver,
        tool_version=tool_version,
        converted_at=time.time(),
        logs=logs,
    )
