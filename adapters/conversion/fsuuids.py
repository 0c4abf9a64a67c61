"""Filesystem UUIDs of a guest's disks, keyed by the guest's own device names (``sda1``, ``sdb``, ...), read
on the conversion host BEFORE any appliance starts.

Why: the stable-fstab step turns ``/dev/sdb1`` into ``UUID=...``. Looking ``/dev/sdb1`` up inside the
libguestfs appliance is wrong: its kernel names the virtio-scsi disks in no fixed order (the first disk
may well be ``sdc``), so now and then ``/`` got the UUID of the ``/var`` disk. Here the identity is the
disk's position in the VM (disk N of the guest is ``sd`` + N-th letter, VMware's controller order, the
order vmferry passes the disks in), and each disk is read on its own, so there is nothing to mix up:

* raw files and block devices (replicas, attached volumes): ``sfdisk --json`` lists the partitions and
  ``blkid -p`` probes each one at its offset, in milliseconds and without root, loop devices or mounts;
* other formats (qcow2, vmdk): ``virt-filesystems`` with that disk alone, so the appliance's ``/dev/sda``
  can only be that disk (one appliance launch per disk).

A UUID found on more than one disk (disks cloned from one template) would make ``UUID=`` ambiguous, so
it is left out and the entry keeps its device name; btrfs is the exception (a multi-device btrfs has
one UUID on purpose).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .commands import disk_target
from .errors import ConversionError, FailureKind
from .model import SourceDisk
from .runner import run_tool

_log = logging.getLogger(__name__)

_TIMEOUT_S = 60.0
_TRAILING_NUMBER = re.compile(r"(\d+)$")
# Extended-partition containers hold logical partitions, never a filesystem of their own.
_CONTAINER_TYPES = frozenset({"5", "f", "85"})
# blkid usages fstab can mount: filesystems, and swap (reported as "other")
_MOUNTABLE_USAGES = frozenset({"filesystem", "other"})
_APPLIANCE_NAME = re.compile(r"^/dev/sda(\d*)$")  # the only disk the appliance has, whole or a partition


@dataclass(frozen=True)
class FoundFilesystem:
    """One filesystem (or swap area) on a guest disk."""

    device: str  # the guest's name for it: sda1, sdb5, sdc (a filesystem on the whole disk)
    uuid: str
    fs_type: str


@dataclass(frozen=True)
class ApplianceAccess:
    """How to start ``virt-filesystems`` for disks the host cannot probe itself (not raw)."""

    env: Mapping[str, str]
    log_dir: Path
    tool: str = "virt-filesystems"
    timeout_s: float = 1800.0
    cancel: threading.Event | None = None


def guest_filesystem_uuids(
    disks: Sequence[SourceDisk], appliance: ApplianceAccess | None = None
) -> dict[str, str]:
    """Guest device name (``sda1``) -> filesystem UUID, over all ``disks`` in the guest's order; UUIDs
    that would be ambiguous are left out (and logged)."""
    found: list[FoundFilesystem] = []
    for index, disk in enumerate(disks):
        found += disk_filesystems(disk, disk_target(index), appliance)
    return _unambiguous(found)


def disk_filesystems(
    disk: SourceDisk, guest_name: str, appliance: ApplianceAccess | None = None
) -> list[FoundFilesystem]:
    """The filesystems on one disk, named as the guest names them (``guest_name`` is its disk, ``sdb``)."""
    if not os.access(disk.path, os.R_OK):
        raise ConversionError(FailureKind.UNKNOWN, f"cannot read disk {disk.path} to find its filesystems")
    if disk.format == "raw":
        return _probe_raw(disk.path, guest_name)
    if appliance is None:
        raise ValueError(f"{disk.path} is {disk.format}: reading it needs the appliance (ApplianceAccess)")
    return _probe_in_appliance(disk, guest_name, appliance)


def _unambiguous(found: Iterable[FoundFilesystem]) -> dict[str, str]:
    by_uuid: defaultdict[str, list[FoundFilesystem]] = defaultdict(list)
    for filesystem in found:
        by_uuid[filesystem.uuid].append(filesystem)
    uuids: dict[str, str] = {}
    for uuid, holders in by_uuid.items():
        if len(holders) > 1 and any(holder.fs_type != "btrfs" for holder in holders):
            _log.warning(
                "UUID %s is on %s: fstab entries naming them keep their device names",
                uuid,
                ", ".join(holder.device for holder in holders),
            )
            continue
        uuids.update((holder.device, uuid) for holder in holders)
    return uuids


# --- raw disks: partition table and signatures read by util-linux on the host ----------------------


def _probe_raw(path: Path, guest_name: str) -> list[FoundFilesystem]:
    partitions = _partitions(path)
    if partitions is None:  # no partition table: perhaps a filesystem on the whole disk
        whole = _probe_at(path, 0, None)
        return [FoundFilesystem(guest_name, *whole)] if whole else []
    found = []
    for number, offset, size in partitions:
        probed = _probe_at(path, offset, size)
        if probed:
            found.append(FoundFilesystem(f"{guest_name}{number}", *probed))
    return found


def _partitions(path: Path) -> list[tuple[int, int, int]] | None:
    """(partition number, byte offset, byte size) of each partition, or None without a partition table."""
    done = subprocess.run(
        ["sfdisk", "--json", "--", str(path)], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        return None  # "does not contain a recognized partition table" (or too small to hold one)
    table = json.loads(done.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    device = str(table.get("device", path))
    partitions = []
    for entry in table.get("partitions", []):
        if str(entry.get("type", "")).lower() in _CONTAINER_TYPES:
            continue
        number = _partition_number(str(entry["node"]), device)
        if number is not None:
            partitions.append((number, int(entry["start"]) * sector, int(entry["size"]) * sector))
    return partitions


def _partition_number(node: str, device: str) -> int | None:
    """``disk.raw5`` -> 5, ``/dev/nbd0p2`` -> 2 (sfdisk appends ``p`` after a name ending in a digit)."""
    suffix = node[len(device) :] if node.startswith(device) else node
    match = _TRAILING_NUMBER.search(suffix)
    return int(match[1]) if match else None


def _probe_at(path: Path, offset: int, size: int | None) -> tuple[str, str] | None:
    """(UUID, type) of the filesystem or swap area at ``offset``, or None when there is none."""
    argv = ["blkid", "-p", "-o", "export", "--offset", str(offset)]
    if size is not None:
        argv += ["--size", str(size)]
    done = subprocess.run(
        [*argv, "--", str(path)], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    # 2: nothing found; 8: conflicting signatures (blkid will not choose, nor will we)
    if done.returncode in (2, 8):
        return None
    if done.returncode != 0:
        raise ConversionError(
            FailureKind.UNKNOWN, f"blkid could not probe {path} at offset {offset}: {done.stderr.strip()}"
        )
    tags = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if not tags.get("UUID") or tags.get("USAGE") not in _MOUNTABLE_USAGES:
        return None
    return tags["UUID"], tags.get("TYPE", "")


# --- other formats: the libguestfs appliance, with this one disk attached ---------------------------


def _probe_in_appliance(
    disk: SourceDisk, guest_name: str, appliance: ApplianceAccess
) -> list[FoundFilesystem]:
    log_path = appliance.log_dir / f"filesystems-{guest_name}.log"
    argv = [
        appliance.tool, f"--format={disk.format}", "-a", str(disk.path),
        "--filesystems", "--extra", "--long", "--uuid", "--csv",
    ]  # fmt: skip
    run = run_tool(argv, appliance.env, log_path, timeout_s=appliance.timeout_s, cancel=appliance.cancel)
    if run.returncode != 0:
        raise ConversionError(
            FailureKind.APPLIANCE_FAILED,
            f"{run.tool} could not list the filesystems of {disk.path} (exit code {run.returncode})",
            log_path=log_path,
        )
    return parse_filesystems_csv(log_path.read_text(errors="replace"), guest_name)


def parse_filesystems_csv(output: str, guest_name: str) -> list[FoundFilesystem]:
    """The filesystems in ``virt-filesystems --long --uuid --csv`` output (other lines are ignored) for a
    run with one disk, renamed from the appliance's ``/dev/sdaN`` to the guest's ``guest_name`` + N."""
    lines = output.splitlines()
    start = next((index for index, line in enumerate(lines) if line.startswith("Name,")), None)
    if start is None:
        return []
    found = []
    for row in csv.DictReader(lines[start:]):
        match = _APPLIANCE_NAME.match(row.get("Name") or "")
        uuid = (row.get("UUID") or "").strip()
        if match and uuid:
            found.append(FoundFilesystem(guest_name + match[1], uuid, (row.get("VFS") or "").strip()))
    return found
