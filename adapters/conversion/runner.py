"""Run one libguestfs tool (virt-v2v-in-place, virt-v2v-inspector, virt-customize) as an argument list
in its own process group, keep its whole output as a log file, turn its progress messages into
callbacks, and enforce a deadline and cancellation.

Blocking by design and free of global state: call it from a worker thread (``asyncio.to_thread``); the
callbacks run on that thread. Progress comes from virt-v2v's ``--machine-readable=file:`` JSON lines,
or, for tools without it, from the ``[  12.3] Message`` lines of the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError, FailureKind
from .model import Progress, ToolRun

ProgressCallback = Callable[[Progress], None]

POLL_INTERVAL_S = 0.5
KILL_GRACE_S = 10.0

# virt-v2v's stage messages, in the order they appear, with a completion estimate. Inside "Converting"
# the guest's initramfs rebuild dominates (about half of the run), hence the jump after it.
_STAGES: tuple[tuple[re.Pattern[str], str, float], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), stage, fraction)
    for pattern, stage, fraction in (
        (r"^(Setting up the source|Opening the source|Examining the guest)", "open", 0.05),
        (r"^Inspecting the (source|overlay)", "inspect", 0.12),
        (r"^Checking for sufficient free disk space", "check-space", 0.25),
        (r"^Converting .* to run on KVM", "convert", 0.30),
        (r"^(Running|Installing firstboot|Setting a random seed|Uninstalling)", "customize", 0.50),
        (r"^This guest (has|does not have) virtio drivers", "drivers-installed", 0.85),
        (r"^Mapping filesystem data", "trim", 0.90),
        (r"^(Closing the overlay|Finishing off|SELinux relabelling)", "finish", 0.97),
    )
)
_HUMAN_PROGRESS = re.compile(r"^\[\s*\d+\.\d\]\s+(?P<message>\S.*)$")  # "[  12.3] Msg", not dmesg


@dataclass
class _Follower:
    """Reads complete new lines of a file that another process is still writing."""

    path: Path
    offset: int = 0
    pending: bytes = b""

    def new_lines(self) -> Iterator[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        data = self.pending + chunk
        *complete, self.pending = data.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace")


@dataclass
class ProgressTracker:
    """Maps messages to monotonic Progress reports within [start, end] of the whole conversion."""

    callback: ProgressCallback | None
    start: float = 0.0
    end: float = 1.0
    stage: str = "start"
    local: float = 0.0

    def report(self, message: str, kind: str = "message") -> None:
        """Forward one message, advancing the stage when the message names one."""
        for pattern, stage, fraction in _STAGES:
            if pattern.search(message) and fraction >= self.local:
                self.stage, self.local = stage, fraction
                break
        if self.callback is not None:
            overall = self.start + (self.end - self.start) * self.local
            self.callback(Progress(stage=self.stage, fraction=round(overall, 4), message=message, kind=kind))


def _json_messages(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "message" in record:
            yield str(record.get("type", "message")), str(record["message"]).strip()


def _human_messages(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    for line in lines:
        match = _HUMAN_PROGRESS.match(line)
        if match:
            yield "message", match["message"].rstrip(". ")


def _kill_group(process: subprocess.Popen[bytes]) -> tuple[int, int]:
    """SIGTERM the tool's process group (the tool, its qemu, helpers), SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                return status, usage.ru_maxrss
            time.sleep(0.1)
    pid, status, usage = os.wait4(process.pid, 0)
    return status, usage.ru_maxrss


def run_tool(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    *,
    machine_readable: Path | None = None,
    progress: ProgressTracker | None = None,
    timeout_s: float = 4 * 3600.0,
    cancel: threading.Event | None = None,
) -> ToolRun:
    """Run ``argv`` to completion and return its ToolRun (any exit code); raise ConversionError only
    for a timeout or a cancellation, after killing the whole process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    follower = _Follower(machine_readable) if machine_readable else _Follower(log_path)
    parse = _json_messages if machine_readable else _human_messages
    started = time.monotonic()
    with log_path.open("wb") as log:
        header = f"# vmferry: {shlex.join(argv)}\n# env: " + " ".join(
            f"{key}={value}"
            for key, value in sorted(env.items())
            if key.startswith(("LIBGUESTFS_", "VIRTIO_WIN"))
        )
        header_bytes = header.encode() + b"\n"
        log.write(header_bytes)
        log.flush()
        process = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,  # nothing can answer a prompt; --root first avoids the one we know
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        follower.offset = 0 if machine_readable else len(header_bytes)
        deadline = started + timeout_s
        stop: FailureKind | None = None
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    peak = usage.ru_maxrss
                    # helpers the tool left behind (a qemu after a crash) go with it
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    break
                _forward(parse(follower.new_lines()), progress)
                if cancel is not None and cancel.is_set():
                    stop = FailureKind.CANCELLED
                elif time.monotonic() > deadline:
                    stop = FailureKind.TIMEOUT
                if stop is not None:
                    status, peak = _kill_group(process)
                    break
                time.sleep(POLL_INTERVAL_S)
        except BaseException:
            # a failing progress callback (or KeyboardInterrupt) must not leave the tool running
            if process.returncode is None:
                killed, _ = _kill_group(process)
                process.returncode = os.waitstatus_to_exitcode(killed)
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    _forward(parse(follower.new_lines()), progress)
    run = ToolRun(
        tool=Path(argv[0]).name,
        argv=tuple(argv),
        returncode=process.returncode,
        duration_s=round(time.monotonic() - started, 2),
        log_path=log_path,
        peak_rss_kib=peak,
    )
    if stop is FailureKind.TIMEOUT:
        raise ConversionError(
            stop,
            f"{run.tool} did not finish within {timeout_s:.0f} s and was stopped",
            hint="a conversion under TCG emulation takes minutes, not hours: check that the appliance "
            "runs (libguestfs-test-tool) and the host is not overloaded",
            retryable=True,
            log_path=log_path,
        )
    if stop is FailureKind.CANCELLED:
        raise ConversionError(stop, f"{run.tool} was cancelled", retryable=True, log_path=log_path)
    return run


def _forward(messages: Iterator[tuple[str, str]], progress: ProgressTracker | None) -> None:
    for kind, message in messages:
        if progress is not None and message:
            progress.report(message, kind)
