"""Fixtures for tests against vcsim-ferry, the vCenter simulator with changed block tracking.

``vcsim_binary`` builds (or finds in the cache) tools/vcsim once per session via
scripts/build-vcsim; ``vcsim`` starts one simulator per test on 127.0.0.1 with a random port,
a generated password and certificate, and its own datastore folder under the test's tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import selectors
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import missing_component
from tests.vsphere.lab import Lab
from vmferry.adapters.vsphere.aio import VsphereClients
from vmferry.adapters.vsphere.client import VsphereClient

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-vcsim"
MISSING_PREREQUISITES = 3  # exit status of scripts/build-vcsim --no-install
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Change tracking settings of the test servers: small pages so that callers must page.
BLOCK_SIZE = 64 * 1024
PAGE_SPAN = 1024 * 1024
PAGE_EXTENTS = 2


@dataclass(frozen=True)
class VcsimServer:
    """How to reach one running simulator; the password is only in ``password_file``."""

    url: str
    host: str
    port: int
    user: str
    password_file: Path
    ca_file: Path
    thumbprint_sha256: str
    thumbprint_sha1: str
    datastore: str
    datastore_dir: Path
    pid: int
    block_size: int = BLOCK_SIZE
    page_span: int = PAGE_SPAN
    page_extents: int = PAGE_EXTENTS

    def password(self) -> str:
        """The password, read from its 0600 file."""
        return self.password_file.read_text()

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server against its own certificate."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def thumbprint(der: bytes, algorithm: str) -> str:
    """A certificate thumbprint as vSphere writes it: upper-case hex pairs joined by colons."""
    digest = hashlib.new(algorithm, der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    """Path of vcsim-ferry: $VMFERRY_VCSIM, or built (cached) by scripts/build-vcsim."""
    override = os.environ.get("VMFERRY_VCSIM")
    if override:
        return Path(override)
    result = subprocess.run(
        [str(BUILD_SCRIPT), "--no-install"], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode == MISSING_PREREQUISITES:
        missing_component(
            "Go and govmomi from Debian (to build vcsim-ferry)",
            "run scripts/build-vcsim (installs golang-go and golang-github-vmware-govmomi-dev with apt)",
        )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-vcsim failed ({result.returncode}):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def _read_ready_line(process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    """The JSON line vcsim-ferry prints once it listens; fails the test if none comes."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        readable = selector.select(START_TIMEOUT)
    line = process.stdout.readline() if readable else b""
    if not line:
        process.kill()
        process.wait()
        pytest.fail(f"vcsim-ferry did not start within {START_TIMEOUT} s:\n{log.read_text()}")
    ready: dict[str, object] = json.loads(line)
    return ready


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


@pytest.fixture
def vcsim(vcsim_binary: Path, tmp_path: Path) -> Iterator[VcsimServer]:
    """One simulator for this test: no VMs, one datastore ("ferry") over tmp_path/datastore."""
    datastore_dir = tmp_path / "datastore"
    password_file = tmp_path / "vcsim-password"
    ca_file = tmp_path / "vcsim-cert.pem"
    log = tmp_path / "vcsim.log"
    _write_secret(password_file, secrets.token_urlsafe(24))
    command = [
        str(vcsim_binary),
        "-l", "127.0.0.1:0",
        "-vm", "0", "-ds", "0",
        "-datastore", f"ferry={datastore_dir}",
        "-username", "vmferry",
        "-password-file", str(password_file),
        "-cert-out", str(ca_file),
        "-cbt-block-size", str(BLOCK_SIZE),
        "-cbt-page-span", str(PAGE_SPAN),
        "-cbt-page-extents", str(PAGE_EXTENTS),
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, cwd=tmp_path
        )
    try:
        ready = _read_ready_line(process, log)
        url = str(ready["url"])
        der = ssl.PEM_cert_to_DER_cert(ca_file.read_text())
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        yield VcsimServer(
            url=url,
            host=parts.hostname,
            port=parts.port,
            user="vmferry",
            password_file=password_file,
            ca_file=ca_file,
            thumbprint_sha256=thumbprint(der, "sha256"),
            thumbprint_sha1=thumbprint(der, "sha1"),
            datastore="ferry",
            datastore_dir=datastore_dir,
            pid=process.pid,
        )
        if process.poll() is not None:
            pytest.fail(f"vcsim-ferry exited during the test ({process.returncode}):\n{log.read_text()}")
    finally:
        _stop(process)


@pytest.fixture
def lab(vcsim: VcsimServer) -> Iterator[Lab]:
    """A builder session on the simulator; at the end no vmferry snapshot may be left anywhere."""
    builder = Lab(vcsim)
    try:
        yield builder
        left = builder.vmferry_snapshots()
        assert left == [], f"vmferry snapshots left behind: {left}"
    finally:
        builder.close()


@pytest.fixture
def client(lab: Lab) -> Iterator[VsphereClient]:
    """The adapter's client, connected to the simulator with verified TLS."""
    with VsphereClient(lab.settings()) as connected:
        yield connected


@pytest.fixture
async def clients(lab: Lab) -> AsyncIterator[VsphereClients]:
    """The functions' client factory with one configured source, ``lab``."""
    factory = VsphereClients({"lab": lab.settings()})
    try:
        yield factory
    finally:
        await factory.close()


@dataclass
class Step:
    """What the runner offers a handler (StepContext), counting heartbeats."""

    delivery: int = 1
    function: str = "test"
    beats: int = 0

    async def heartbeat(self) -> None:
        self.beats += 1
