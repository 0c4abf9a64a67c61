"""Conversion failures a human can act on: the error type carried out of the adapter, and the classifier
that turns a virt-v2v / virt-customize log into a failure kind, the decisive lines and a hint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class FailureKind(StrEnum):
    """Known causes; each has a hint and says whether trying again can help."""

    NO_ROOT_DEVICE = "no-root-device"
    ENCRYPTED_DISK = "encrypted-disk"
    UNSUPPORTED_FILESYSTEM = "unsupported-filesystem"
    MULTI_BOOT = "multi-boot"
    GUEST_OUT_OF_SPACE = "guest-out-of-space"
    HOST_OUT_OF_SPACE = "host-out-of-space"
    MISSING_VIRTIO_WIN = "missing-virtio-win"
    MISSING_WINDOWS_FIRSTBOOT_TOOL = "missing-windows-firstboot-tool"
    UNSUPPORTED_BLOCK_DRIVER = "unsupported-block-driver"
    UNSUPPORTED_GUEST = "unsupported-guest"
    GUEST_SCRIPT_FAILED = "guest-script-failed"
    APPLIANCE_FAILED = "appliance-failed"
    TOOL_MISSING = "tool-missing"
    ALREADY_CONVERTED = "already-converted"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class _Rule:
    kind: FailureKind
    pattern: re.Pattern[str]
    hint: str
    retryable: bool = False


def _rule(kind: FailureKind, pattern: str, hint: str, retryable: bool = False) -> _Rule:
    return _Rule(kind, re.compile(pattern, re.IGNORECASE), hint, retryable)


# Ordered: the first rule matching the decisive text wins. Patterns are virt-v2v 2.2 / libguestfs 1.48
# message texts (see tests/conversion/logs for captured runs).
_RULES = (
    _rule(
        FailureKind.ENCRYPTED_DISK,
        r"could not find key to open LUKS|clevis_luks_unlock|crypto_LUKS.*(?:key|passphrase)",
        "the guest has LUKS-encrypted volumes: supply their passphrases as key files "
        "(--key DEVICE:file:PATH)",
    ),
    _rule(
        FailureKind.UNSUPPORTED_FILESYSTEM,
        r"unknown filesystem type|wrong fs type|unsupported filesystem|filesystem type .* is not supported",
        "a filesystem of the guest cannot be mounted by libguestfs here (e.g. ZFS, ReFS, a newer XFS "
        "feature set): convert on a host whose libguestfs supports it",
    ),
    _rule(
        FailureKind.NO_ROOT_DEVICE,
        r"No root device found|inspection could not detect the source guest",
        "no operating system was found on the disks: check that every disk of the VM was passed (a root "
        "filesystem on LVM may span disks), that the disks hold the VM's data, and that the OS is "
        "supported by virt-v2v",
    ),
    _rule(
        FailureKind.MULTI_BOOT,
        r"multi-boot operating systems are not supported|Dual- or multi-boot operating system detected",
        "several operating systems were found: name the root device (--root /dev/sdXN)",
    ),
    _rule(
        FailureKind.GUEST_OUT_OF_SPACE,
        r"not enough free space for conversion on filesystem|inodes available <",
        "a guest filesystem is too full for the conversion (virt-v2v needs ~100 MB on /, 50 MB on /boot): "
        "free space in the VM or grow the disk, then sync and convert again",
    ),
    _rule(
        FailureKind.HOST_OUT_OF_SPACE,
        r"insufficient free space in the conversion server|No space left on device",
        "the conversion host ran out of space for the appliance or its overlays: free space under "
        "LIBGUESTFS_CACHEDIR / TMPDIR (at least 1 GB)",
        retryable=True,
    ),
    _rule(
        FailureKind.MISSING_VIRTIO_WIN,
        r"virtio-win|no virtio drivers available for this version of Windows",
        "the virtio-win drivers were not found: install virtio-win and point the conversion host's "
        "virtio_win setting (VIRTIO_WIN) at the ISO or directory",
    ),
    _rule(
        FailureKind.MISSING_WINDOWS_FIRSTBOOT_TOOL,
        r"rhsrvany\.exe or pvvxsvc\.exe is missing",
        "Windows conversion needs rhsrvany.exe in /usr/share/virt-tools on the conversion host "
        "(Debian does not ship it)",
    ),
    _rule(
        FailureKind.UNSUPPORTED_GUEST,
        r"guest type .* is not supported|inspection of the package database failed",
        "virt-v2v does not support this guest operating system; see the virt-v2v support matrix",
    ),
    _rule(
        FailureKind.GUEST_SCRIPT_FAILED,
        r"command exited with an error",
        "a script run inside the guest (vmferry's NIC-name / fstab scripts or a user --run script) failed; "
        "its output precedes the error in the log",
    ),
    _rule(
        FailureKind.APPLIANCE_FAILED,
        r"guestfs_launch failed|libguestfs error: .*launch|supermin .* failed|qemu.*(?:killed|terminated)",
        "the libguestfs appliance did not start: run libguestfs-test-tool on the conversion host "
        "(KVM that hangs needs LIBGUESTFS_BACKEND_SETTINGS=force_tcg)",
        retryable=True,
    ),
)

# The tool's own final error comes first; libguestfs errors also appear for harmless probing in -v logs,
# so they only count when the tool printed none.
_TOOL_ERROR = re.compile(r"^virt-[\w-]+: error: ")
_LIBRARY_ERROR = re.compile(r"^(?:libguestfs|guestfish|supermin): error: ")
_ERROR_END = re.compile(r"^(?:If reporting bugs|virt-[\w-]+: Exiting)", re.IGNORECASE)
_MAX_DECISIVE_LINES = 20


@dataclass(frozen=True)
class Diagnosis:
    """What went wrong, in the tool's words and in ours."""

    kind: FailureKind
    decisive_lines: tuple[str, ...]
    hint: str
    retryable: bool


class ConversionError(Exception):
    """A conversion step failed; carries the cause for the failure event and the log for the record."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        hint: str = "",
        retryable: bool = False,
        decisive_lines: tuple[str, ...] = (),
        log_path: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint
        self.retryable = retryable
        self.decisive_lines = decisive_lines
        self.log_path = log_path

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


def machine_readable_errors(text: str) -> list[str]:
    """The ``error`` messages of a ``--machine-readable`` JSON stream (one complete message each)."""
    errors: list[str] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("type") == "error":
            errors.append(str(record.get("message", "")))
    return errors


def _paragraphs(lines: list[str], start: re.Pattern[str]) -> list[str]:
    """Error messages as printed without --wrap: one line per paragraph, paragraphs separated by one
    blank line; the next log line follows the last paragraph directly."""
    found: list[str] = []
    index = 0
    while index < len(lines):
        if not start.match(lines[index]):
            index += 1
            continue
        found.append(lines[index].rstrip())
        index += 1
        while (
            index + 1 < len(lines)
            and not lines[index].strip()
            and lines[index + 1].strip()
            and not _ERROR_END.match(lines[index + 1])
        ):
            found.append(lines[index + 1].rstrip())
            index += 2
    return found


def decisive_lines(log_text: str, machine_readable_text: str = "") -> tuple[str, ...]:
    """The lines that say what went wrong: virt-v2v's machine-readable error messages when there are
    any, else the ``virt-...: error:`` paragraphs of the log, else libguestfs's own errors, else the
    last lines of the log."""
    found = [
        line.strip()
        for message in machine_readable_errors(machine_readable_text)
        for line in message.splitlines()
        if line.strip()
    ]
    lines = log_text.splitlines()
    found = found or _paragraphs(lines, _TOOL_ERROR) or _paragraphs(lines, _LIBRARY_ERROR)
    if not found:
        found = [line.rstrip() for line in lines[-10:] if line.strip()]
    return tuple(found[-_MAX_DECISIVE_LINES:])


# Inspection finds no root when the OS hides behind LUKS or on a filesystem libguestfs cannot read;
# the -x trace of list_filesystems / vfs_type shows which, so "no root device" is refined with it.
_LUKS_IN_TRACE = re.compile(r'"crypto_LUKS"|= "crypto_LUKS"')
_ODD_FS_IN_TRACE = re.compile(r'"(zfs_member|refs|bcachefs|vmfs\w*|ufs|hfsplus|apfs)"')


def _refine_no_root(log_text: str) -> FailureKind:
    if _LUKS_IN_TRACE.search(log_text):
        return FailureKind.ENCRYPTED_DISK
    if _ODD_FS_IN_TRACE.search(log_text):
        return FailureKind.UNSUPPORTED_FILESYSTEM
    return FailureKind.NO_ROOT_DEVICE


def _rule_for(kind: FailureKind) -> _Rule:
    return next(rule for rule in _RULES if rule.kind is kind)


def classify(log_text: str, machine_readable_text: str = "") -> Diagnosis:
    """Map a failed run's output to a known cause. The machine-readable error (the whole message in one
    string) is preferred; the human log is the fallback and also gives the decisive lines."""
    lines = decisive_lines(log_text, machine_readable_text)
    candidates = [*machine_readable_errors(machine_readable_text), "\n".join(lines)]
    for text in candidates:
        flat = " ".join(text.split())
        for rule in _RULES:
            if rule.pattern.search(flat):
                found = rule
                if rule.kind is FailureKind.NO_ROOT_DEVICE:
                    found = _rule_for(_refine_no_root(log_text))
                return Diagnosis(found.kind, lines, found.hint, found.retryable)
    return Diagnosis(
        FailureKind.UNKNOWN,
        lines,
        "see the decisive lines and the full log of the run",
        retryable=False,
    )
