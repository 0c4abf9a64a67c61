"""The ssh source end to end: an OpenSSH server started by the test on loopback (own config, random
port, key-only login) serves a disk image over SFTP to nbdkit's ssh plugin; host keys are verified."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import missing_component
from tests.dataplane.conftest import Images
from vmferry.adapters.dataplane.destinations import FileDestination
from vmferry.adapters.dataplane.engine import CopyEngine
from vmferry.adapters.dataplane.errors import SourceStartError
from vmferry.adapters.dataplane.nbdkit import NbdkitServer
from vmferry.adapters.dataplane.sources import SshSource

pytestmark = pytest.mark.usefixtures("dataplane_tools")

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class SshHost:
    port: int
    identity: Path
    known_hosts: Path
    other_known_hosts: Path  # lists a different key for the same host


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def ssh_host(tmp_path: Path) -> Iterator[SshHost]:
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        missing_component("OpenSSH server", "run scripts/setup-dataplane (installs openssh-server)")
    if os.geteuid() != 0:
        missing_component("an sshd the tests can start", "run the tests as root (sshd needs it for logins)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's compiled-in privilege separation folder
    folder = tmp_path / "sshd"
    folder.mkdir()
    host_key = _keygen(folder / "host_key")
    other_key = _keygen(folder / "other_key")
    client_key = _keygen(folder / "id_ed25519")
    (folder / "authorized_keys").write_text(client_key + "\n")
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key}\n")
    other = folder / "other_known_hosts"
    other.write_text(f"[127.0.0.1]:{port} {other_key}\n")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    error = process.stderr.read().decode() if process.stderr else ""
                    pytest.fail(f"sshd did not start: {error}")
                time.sleep(0.05)
        yield SshHost(port, folder / "id_ed25519", known_hosts, other)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_ssh_source_copies_a_disk_over_sftp(images: Images, tmp_path: Path, ssh_host: SshHost) -> None:
    source = SshSource(
        host="127.0.0.1",
        port=ssh_host.port,
        path=str(images.sparse),
        identity=ssh_host.identity,
        known_hosts=ssh_host.known_hosts,
    )
    destination = FileDestination.create(tmp_path / "dst.img", images.sparse.stat().st_size)
    with NbdkitServer(source.nbdkit_command()) as server:
        result = CopyEngine().full_copy(server.uri, destination, job="ssh", verify=True)
    assert (
        hashlib.sha256(destination.path.read_bytes()).digest()
        == hashlib.sha256(images.sparse.read_bytes()).digest()
    )
    assert result.bytes_written == images.data_bytes  # no block status over SFTP: zeroes found by detection


def test_ssh_source_refuses_an_unknown_host_key(images: Images, ssh_host: SshHost) -> None:
    source = SshSource(
        host="127.0.0.1",
        port=ssh_host.port,
        path=str(images.sparse),
        identity=ssh_host.identity,
        known_hosts=ssh_host.other_known_hosts,
    )
    with pytest.raises(SourceStartError) as caught:
        NbdkitServer(source.nbdkit_command()).start()
    assert "host key for server changed" in caught.value.cause
