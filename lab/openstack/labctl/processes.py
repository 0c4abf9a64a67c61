"""Start, record, probe and stop the lab's processes.

Each process starts in its own session (its PID is its process-group id) with output in
``log/<name>.log``; ``run/<name>.pid`` records its PID and kernel start time, so stopping signals
exactly the processes this lab started, never a PID the kernel has since given to someone else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from labctl.layout import Lab

# Services are signalled before the broker and database they need to shut down cleanly.
INFRASTRUCTURE = ("rabbitmq", "epmd", "mariadb")


class LabError(RuntimeError):
    """A lab step failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Recorded:
    """A process named in run/: its PID and the start time that proves it is still the same one."""

    name: str
    pid: int
    start_time: str

    def alive(self) -> bool:
        """True while the PID exists and is still the process the lab started."""
        return start_time_of(self.pid) == self.start_time


def start_time_of(pid: int) -> str | None:
    """The kernel's start time of a PID (field 22 of /proc/<pid>/stat), None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def launch(lab: Lab, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
    """Start a long-running process in its own session, log its output, record it; return its PID."""
    log_path = lab.log / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd or lab.root,
            start_new_session=True,
        )
    started = start_time_of(process.pid)
    if started is None:
        raise LabError(f"{name} exited at once; see {log_path}")
    (lab.run / f"{name}.pid").write_text(f"{process.pid} {started}\n")
    return process.pid


def run_step(
    lab: Lab,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdin: str | None = None,
    timeout: float = 600,
) -> str:
    """Run a one-shot command (a db sync, a bootstrap); log it; raise with the log's tail on failure."""
    log_path = lab.log / f"{name}.log"
    result = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=lab.root,
        timeout=timeout,
        check=False,
    )
    with log_path.open("a") as log:
        log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise LabError(f"{name} failed (exit {result.returncode}); see {log_path}:\n{tail}")
    return result.stdout


def recorded(lab: Lab) -> list[Recorded]:
    """Every process named in run/, alive or not."""
    found = []
    for pid_file in sorted(lab.run.glob("*.pid")):
        try:
            pid, started = pid_file.read_text().split()
            found.append(Recorded(pid_file.stem, int(pid), started))
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
    return found


def wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    log: Path | None = None,
    process: str | None = None,
    lab: Lab | None = None,
) -> float:
    """Poll ``ready`` until true; fail early if the named process died. Returns the seconds waited."""
    began = time.monotonic()
    while True:
        if ready():
            return time.monotonic() - began
        if process and lab and not any(p.name == process and p.alive() for p in recorded(lab)):
            raise LabError(f"{process} died while waiting for {what}; see {log}")
        if time.monotonic() - began > timeout:
            raise LabError(f"{what} not ready after {timeout:.0f} s; see {log}")
        time.sleep(0.3)


def group_memory(leader: int) -> int:
    """Proportional set size (bytes) of a process and every process in its group (its workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != leader:  # field 5 of stat: the process group id
                continue
            rollup = (stat.parent / "smaps_rollup").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def port_open(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def http_answers(url: str) -> bool:
    """True once an API answers below 500 (401 counts: the app is up and checks tokens)."""
    try:
        with urllib.request.urlopen(url, timeout=5):  # noqa: S310 (loopback URL the lab built)
            return True
    except urllib.error.HTTPError as error:
        return error.code < 500
    except (OSError, TimeoutError):
        return False


def stop(lab: Lab, grace: float = 20) -> list[str]:
    """SIGTERM the recorded processes (services, then infrastructure), SIGKILL stragglers; return names."""
    everything = recorded(lab)
    services = [p for p in everything if p.name not in INFRASTRUCTURE]
    infra = sorted(
        (p for p in everything if p.name in INFRASTRUCTURE), key=lambda p: INFRASTRUCTURE.index(p.name)
    )
    stopped = []
    for group in (services, infra):
        stopped += _stop_group(group, grace)
    for pid_file in lab.run.glob("*.pid"):
        pid_file.unlink(missing_ok=True)
    return stopped


def _signal_group(process: Recorded, signum: int) -> None:
    # The process leads its own session and group, so the group holds it and its workers only.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _stop_group(group: list[Recorded], grace: float) -> list[str]:
    alive = [p for p in group if p.alive()]
    for process in alive:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.alive() for p in alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Workers can outlive a leader that was alive a moment ago; the group id cannot be reused
    # while any of them exists, so killing the group only ever reaches this lab's processes.
    for process in alive:
        _signal_group(process, signal.SIGKILL)
    return [p.name for p in alive]
