"""Running one nbdkit server for one disk: argument list (never a shell string), a private 0700 folder
holding the unix socket, log and pid file, credentials passed as ``key=+FILE`` (a 0600 file removed as
soon as the server is ready) or ``key=-FD`` (a pipe), readiness detection and cleanup.

nbdkit is started with ``--exit-with-parent``: it dies with the *thread* that started it (Linux
``PR_SET_PDEATHSIG`` semantics), so start and stop a server from one long-lived thread (the event
loop's, or the thread running the copy), not from a short-lived pool thread.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.errors import SourceStartError

if TYPE_CHECKING:  # the bus module pulls in nats; the data plane only needs the type
    from vmferry.bus.connection import Secret

log = logging.getLogger(__name__)

_FOLDER_PREFIX = "vmferry-nbd-"
_OWNER_FILE = "owner.pid"
_SETUP_GRACE = 60.0  # seconds a folder may lack owner.pid while it is being created

_PLUGIN_PACKAGES = {
    "vddk": "nbdkit-plugin-vddk is not packaged by Debian: build nbdkit's vddk plugin for this nbdkit "
    "version (nbdkit --version) from nbdkit's source and install it into nbdkit's plugin folder "
    "(nbdkit --dump-config: plugindir), and install VMware's VDDK into the folder given as libdir",
}


@dataclass(frozen=True)
class NbdkitFilter:
    """A filter (``--filter=NAME``) with parameters, e.g. ``NbdkitFilter("delay", (("rdelay", "5ms"),))``.

    Filters given first are outermost (they see requests first).
    """

    name: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NbdkitCommand:
    """What to serve: plugin, parameters, secret parameters and filters (outermost first)."""

    plugin: str
    params: tuple[tuple[str, str], ...]
    description: str
    secrets: tuple[tuple[str, Secret], ...] = ()
    filters: tuple[NbdkitFilter, ...] = ()
    readonly: bool = True
    threads: int | None = None

    def with_filters(self, *filters: NbdkitFilter) -> NbdkitCommand:
        """The same command with ``filters`` added outside the existing ones (used for fault injection)."""
        return NbdkitCommand(
            plugin=self.plugin,
            params=self.params,
            description=self.description,
            secrets=self.secrets,
            filters=(*filters, *self.filters),
            readonly=self.readonly,
            threads=self.threads,
        )


class SecretPassing(enum.Enum):
    """How secret parameters reach nbdkit; both keep them out of argv and the environment.

    FD is the default: nothing touches a file system, even if this process is killed during start-up.
    """

    FILE = "file"  # key=+/private/folder/key.secret, mode 0600, deleted once nbdkit is ready
    FD = "fd"  # key=-N, a pipe inherited by nbdkit and read once at start-up


@dataclass
class _Started:
    process: subprocess.Popen[bytes]
    folder: Path
    argv: list[str]
    secret_files: list[Path] = field(default_factory=list)


class NbdkitServer:
    """One nbdkit process serving one disk on a unix socket; a context manager."""

    def __init__(
        self,
        command: NbdkitCommand,
        *,
        nbdkit: str = "nbdkit",
        secret_passing: SecretPassing = SecretPassing.FD,
        verbose: bool = False,
        startup_timeout: float = 60.0,
        folder_parent: Path | None = None,
        probe: bool = True,
    ) -> None:
        self.command = command
        self.nbdkit = nbdkit
        self.secret_passing = secret_passing
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.folder_parent = folder_parent
        self.probe = probe
        self._started: _Started | None = None
        self._last_log = ""

    # ---- public surface -------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """The private folder (socket, log, pid file)."""
        return self._require().folder

    @property
    def socket_path(self) -> Path:
        """The unix socket nbdkit listens on."""
        return self.folder / "nbd.sock"

    @property
    def log_path(self) -> Path:
        """nbdkit's stderr."""
        return self.folder / "nbdkit.log"

    @property
    def uri(self) -> str:
        """NBD URI of the export, for libnbd, nbdcopy, nbdinfo or qemu-img."""
        return f"nbd+unix:///?socket={self.socket_path}"

    @property
    def pid(self) -> int:
        """Process id of nbdkit."""
        return self._require().process.pid

    @property
    def argv(self) -> list[str]:
        """The argument list nbdkit was started with (holds no secret values)."""
        return list(self._require().argv)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of nbdkit's log (kept after ``stop``), for error reports."""
        if self._started is not None and self.log_path.exists():
            text = self.log_path.read_text(errors="replace")
        else:
            text = self._last_log
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> NbdkitServer:
        """Start nbdkit and wait until it accepts connections."""
        if self._started is not None:
            raise RuntimeError("nbdkit server already started")
        binary = shutil.which(self.nbdkit)
        if binary is None:
            raise SourceStartError(
                f"cannot serve {self.command.description}: nbdkit is not installed",
                "run scripts/setup-dataplane (installs Debian's nbdkit, libnbd-bin and python3-libnbd)",
            )
        sweep_stale_folders(self.folder_parent)
        folder = Path(tempfile.mkdtemp(prefix=_FOLDER_PREFIX, dir=self.folder_parent))
        folder.chmod(0o700)
        (folder / _OWNER_FILE).write_text(str(os.getpid()))
        try:
            self._started = self._spawn(binary, folder)
            self._wait_ready()
            self._forget_secrets()
            if self.probe:
                self._probe()
        except BaseException:
            self.stop()
            raise
        log.info("nbdkit serving %s on %s (pid %d)", self.command.description, self.socket_path, self.pid)
        return self

    def stop(self) -> None:
        """Stop nbdkit (SIGTERM, then SIGKILL) and remove the private folder."""
        started = self._started
        if started is None:
            return
        process = started.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.log_path.exists():
            self._last_log = self.log_path.read_text(errors="replace")
        shutil.rmtree(started.folder, ignore_errors=True)
        self._started = None

    def running(self) -> bool:
        """True while the nbdkit process is alive."""
        return self._started is not None and self._started.process.poll() is None

    def __enter__(self) -> NbdkitServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    # ---- internals ------------------------------------------------------------------------------------

    def _require(self) -> _Started:
        if self._started is None:
            raise RuntimeError("nbdkit server is not running")
        return self._started

    def _spawn(self, binary: str, folder: Path) -> _Started:
        secret_params, pass_fds, secret_files = self._secret_params(folder)
        argv = [
            binary,
            "--exit-with-parent",
            "--foreground",
            "--unix",
            str(folder / "nbd.sock"),
            "--pidfile",
            str(folder / "nbdkit.pid"),
        ]
        if self.command.readonly:
            argv.append("--readonly")
        if self.command.threads:
            argv += ["--threads", str(self.command.threads)]
        if self.verbose:
            argv.append("--verbose")
        argv += [f"--filter={nbd_filter.name}" for nbd_filter in self.command.filters]
        argv.append(self.command.plugin)
        argv += [f"{key}={value}" for key, value in self.command.params]
        argv += secret_params
        for nbd_filter in self.command.filters:
            argv += [f"{key}={value}" for key, value in nbd_filter.params]
        log.debug("starting %s", argv)
        with open(folder / "nbdkit.log", "wb") as log_file:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=pass_fds,
                    cwd=folder,
                )
            finally:
                for descriptor in pass_fds:
                    os.close(descriptor)
        return _Started(process=process, folder=folder, argv=argv, secret_files=secret_files)

    def _secret_params(self, folder: Path) -> tuple[list[str], list[int], list[Path]]:
        params: list[str] = []
        descriptors: list[int] = []
        files: list[Path] = []
        for key, secret in self.command.secrets:
            if self.secret_passing is SecretPassing.FD:
                descriptor = _pipe_holding(secret.reveal().encode())
                descriptors.append(descriptor)
                params.append(f"{key}=-{descriptor}")
            else:
                path = folder / f"{key}.secret"
                _write_private(path, secret.reveal().encode())
                files.append(path)
                params.append(f"{key}=+{path}")
        return params, descriptors, files

    def _wait_ready(self) -> None:
        started = self._require()
        pid_file = started.folder / "nbdkit.pid"
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        while True:
            status = started.process.poll()
            if status is not None:
                raise self._start_error(status)
            if self.socket_path.exists() and _read_pid(pid_file) == started.process.pid:
                return
            if time.monotonic() > deadline:
                raise SourceStartError(
                    f"nbdkit serving {self.command.description} was not ready after "
                    f"{self.startup_timeout:.0f} s; log:\n{self.log_tail()}",
                    "check that the source host is reachable and answers (for vddk: vCenter/ESXi "
                    "port 443 and 902), then try again",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _probe(self) -> None:
        """Open the export once: plugins log in and open the disk per connection (vddk, curl, ssh,
        qemu-nbd), so bad credentials or a missing disk show up here, with the log, not mid-copy."""
        if not nbdlib.available():
            return
        try:
            handle = nbdlib.connect(self.uri)
        except nbdlib.error_type() as error:
            time.sleep(0.2)  # let nbdkit finish writing its side of the story
            raise SourceStartError(
                f"nbdkit serving {self.command.description} started but the disk cannot be opened "
                f"({error}); log:\n{self.log_tail()}",
                "read the log above: refused credentials, an unknown host key, a missing disk file or "
                "snapshot, or an unreadable image format is named there",
            ) from error
        nbdlib.shutdown_quietly(handle)

    def _start_error(self, status: int) -> SourceStartError:
        tail = self.log_tail()
        plugin = self.command.plugin
        if f"cannot open plugin '{plugin}'" in tail or f'cannot open plugin "{plugin}"' in tail:
            fix = _PLUGIN_PACKAGES.get(
                plugin, f"install the nbdkit {plugin} plugin (run scripts/setup-dataplane)"
            )
            return SourceStartError(f"the nbdkit plugin '{plugin}' is not installed: {tail}", fix)
        for nbd_filter in self.command.filters:
            if f"cannot open filter '{nbd_filter.name}'" in tail:
                return SourceStartError(
                    f"the nbdkit filter '{nbd_filter.name}' is not installed: {tail}",
                    "install Debian's nbdkit package (run scripts/setup-dataplane)",
                )
        return SourceStartError(
            f"nbdkit serving {self.command.description} exited with status {status} during start-up; "
            f"log:\n{tail}",
            "read the log above: a wrong parameter, unreachable host, refused credentials or missing "
            "file is named there",
        )

    def _forget_secrets(self) -> None:
        # nbdkit reads +FILE parameters while parsing its configuration, before it listens.
        for path in self._require().secret_files:
            path.unlink(missing_ok=True)


def sweep_stale_folders(parent: Path | None = None) -> list[Path]:
    """Remove private folders left by processes that died without stopping their server.

    A folder is stale when the process that created it (``owner.pid``) is gone; --exit-with-parent
    has then ended its nbdkit too. Folders of other users, and very young folders still being set
    up, are left alone. Returns the folders removed.
    """
    base = parent or Path(tempfile.gettempdir())
    removed: list[Path] = []
    for folder in base.glob(f"{_FOLDER_PREFIX}*"):
        try:
            info = folder.stat()
            if info.st_uid != os.getuid():
                continue
            owner = _read_pid(folder / _OWNER_FILE)
            if owner is None:  # being set up right now, or left by an older version
                if time.time() - info.st_mtime < _SETUP_GRACE:
                    continue
                owner = _read_pid(folder / "nbdkit.pid")
        except OSError:
            continue
        if owner is None or not _alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _pipe_holding(data: bytes) -> int:
    """A pipe's read end that yields ``data`` then end-of-file (the write end is closed here)."""
    if len(data) >= 65536:
        raise ValueError("secret too long for a pipe")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None
