"""What the installed virt-v2v tools can do: version, ``--machine-readable`` feature list and the options
their ``--help`` lists. virt-v2v-in-place 2.2 (Debian 12) has no ``--firstboot``, ``--run`` or
``--block-driver``; later versions do, so callers ask here instead of assuming."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass

from .errors import ConversionError, FailureKind

_OPTION = re.compile(r"(?:^|[\s,])(--?[A-Za-z][\w-]*)")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Capabilities:
    """Version and abilities of one virt-v2v tool binary."""

    tool: str
    version: tuple[int, int, int]
    features: frozenset[str]
    options: frozenset[str]

    @property
    def version_text(self) -> str:
        """Dotted version, for messages."""
        return ".".join(str(part) for part in self.version)

    @property
    def supports_firstboot(self) -> bool:
        """``--firstboot SCRIPT`` is accepted."""
        return "--firstboot" in self.options

    @property
    def supports_run(self) -> bool:
        """``--run SCRIPT`` is accepted."""
        return "--run" in self.options

    @property
    def supports_block_driver(self) -> bool:
        """``--block-driver virtio-blk|virtio-scsi`` is accepted."""
        return "--block-driver" in self.options

    @property
    def supports_mac_ip(self) -> bool:
        """``--mac MAC:ip:...`` static addresses (applied to Windows guests)."""
        return "mac-ip-option" in self.features

    @property
    def supports_output_xml(self) -> bool:
        """``-O FILE`` writes the inspection/conversion result as XML."""
        return "-O" in self.options


def parse_capabilities(tool: str, version_text: str, features_text: str, help_text: str) -> Capabilities:
    """Build Capabilities from the three outputs (separate from running them, for unit tests)."""
    match = _VERSION.search(version_text)
    if match is None:
        raise ValueError(f"no version in {version_text!r}")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    features = frozenset(line.strip() for line in features_text.splitlines() if line.strip())
    options = frozenset(found for line in help_text.splitlines() for found in _OPTION.findall(line))
    return Capabilities(tool=tool, version=version, features=features, options=options)


_cache: dict[str, Capabilities] = {}
_cache_lock = threading.Lock()


def detect_capabilities(tool: str) -> Capabilities:
    """Ask the installed ``tool`` (cached per tool name for the life of the process)."""
    with _cache_lock:
        if tool in _cache:
            return _cache[tool]
    if shutil.which(tool) is None:
        raise ConversionError(
            FailureKind.TOOL_MISSING,
            f"{tool} is not installed",
            hint="install virt-v2v and libguestfs-tools (scripts/setup-conversion on Debian)",
        )

    def output(*args: str) -> str:
        done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)
        return done.stdout + done.stderr

    caps = parse_capabilities(tool, output("--version"), output("--machine-readable"), output("--help"))
    with _cache_lock:
        _cache[tool] = caps
    return caps


_ADD_DRIVE = re.compile(r'trace: add_drive "([^"]+)"')
_reverses: dict[str, bool] = {}


def customize_reverses_disks(tool: str = "virt-customize") -> bool:
    """Whether ``tool`` attaches its ``-a`` disks in reverse order (virt-customize 1.48 does: its option
    parser prepends each ``-a`` to a list it never reverses). libguestfs's inspection resolves the guest's
    fstab ``/dev/sdb1`` to the second disk *added*, so with the disks reversed a guest whose fstab names
    sda/sdb is mounted wrongly. (This order is the tool's, fixed per version; the order in which the
    appliance's kernel names the disks is random, which is why nothing reads device names in there.)

    Found out from the tool itself: a dry run on two empty files prints its ``add_drive`` calls (with
    ``-x``) before the appliance starts, and is stopped right there. Cached per tool.
    """
    with _cache_lock:
        if tool in _reverses:
            return _reverses[tool]
    with tempfile.TemporaryDirectory(prefix="vmferry-order-") as scratch:
        first, second = os.path.join(scratch, "first.img"), os.path.join(scratch, "second.img")
        for path in (first, second):
            with open(path, "wb") as handle:
                handle.truncate(1 << 20)
        argv = [
            tool,
            "-x",
            "-n",
            "--no-network",
            "--format",
            "raw",
            "-a",
            first,
            "--format",
            "raw",
            "-a",
            second,
        ]
        order = _drive_order(argv)
    if sorted(order) != sorted([first, second]):
        raise ConversionError(
            FailureKind.TOOL_MISSING, f"could not tell how {tool} orders its disks: {order}"
        )
    reverses = order[0] == second
    with _cache_lock:
        _reverses[tool] = reverses
    return reverses


def _drive_order(argv: list[str]) -> list[str]:
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    watchdog = threading.Timer(60, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    order: list[str] = []
    try:
        assert process.stderr is not None  # noqa: S101 -- stderr=PIPE above
        for line in process.stderr:
            match = _ADD_DRIVE.search(line)
            if match:
                order.append(match[1])
                if len(order) == 2:
                    break
    finally:
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    return order
