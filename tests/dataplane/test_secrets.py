"""Credentials never show: during a real HTTPS transfer (session cookie + basic-auth password passed to
nbdkit's curl plugin as +FILE or -FD) neither the process table, nor nbdkit's verbose log, nor our logs
hold them; wrong credentials fail at start-up with the server's answer, not mid-copy."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import psutil
import pytest

from tests.dataplane.conftest import Images
from tests.dataplane.https_server import DiskServer
from vmferry.adapters.dataplane.destinations import FileDestination
from vmferry.adapters.dataplane.engine import CopyEngine, EngineConfig, Progress
from vmferry.adapters.dataplane.errors import SourceStartError
from vmferry.adapters.dataplane.nbdkit import NbdkitFilter, NbdkitServer, SecretPassing
from vmferry.adapters.dataplane.sources import HttpsSource, datastore_folder_url
from vmferry.bus.connection import Secret

pytestmark = pytest.mark.usefixtures("dataplane_tools")

PASSWORD = "Esx-r00t-Pa55word-7781"
SESSION = "52a01262-bf93-ccce-d379-8dabb3e55560"
COOKIE = f'vmware_soap_session="{SESSION}"'
FOLDER_PATH = "/folder/web01/web01-flat.vmdk"


def secrets_in_process_table() -> list[str]:
    found = []
    for process in psutil.process_iter():
        try:
            text = " ".join(process.cmdline()) + " ".join(f"{k}={v}" for k, v in process.environ().items())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if PASSWORD in text or SESSION in text:
            found.append(f"{process.pid}: {process.name()}")
    return found


def https_source(disk: DiskServer, password: str = PASSWORD) -> HttpsSource:
    return HttpsSource(
        url=datastore_folder_url(f"127.0.0.1:{disk.port}", "DC1", "ds1", "web01/web01-flat.vmdk"),
        cookie=Secret(COOKIE),
        user="root",
        password=Secret(password),
        cainfo=disk.certificate,
        filters=(NbdkitFilter("delay", (("delay-read", "10ms"),)),),
    )


@pytest.mark.parametrize("passing", [SecretPassing.FILE, SecretPassing.FD])
def test_no_secret_in_process_table_or_logs_during_a_transfer(
    images: Images, tmp_path: Path, passing: SecretPassing, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    scans: list[list[str]] = []
    with DiskServer(images.dense, FOLDER_PATH, COOKIE, "root", PASSWORD, tmp_path) as disk:
        server = NbdkitServer(https_source(disk).nbdkit_command(), secret_passing=passing, verbose=True)
        with server:
            logs_during: list[str] = []
            leftover_secret_files: list[Path] = []

            def inspect(_: Progress) -> None:
                scans.append(secrets_in_process_table())
                logs_during.append(server.log_path.read_text(errors="replace"))
                leftover_secret_files.extend(server.folder.glob("*.secret"))

            destination = FileDestination.create(tmp_path / "dst.img", images.dense.stat().st_size)
            config = EngineConfig(request_size=256 * 1024, requests=2, progress_interval=0.1)
            CopyEngine(config).full_copy(server.uri, destination, job="t", progress=inspect)
            nbdkit_log = server.log_path.read_text(errors="replace")
        assert disk.refused == 0
        assert disk.requests > 10
    assert (
        hashlib.sha256(destination.path.read_bytes()).digest()
        == hashlib.sha256(images.dense.read_bytes()).digest()
    )
    assert scans, "the transfer ended before the process table could be inspected"
    assert scans == [[] for _ in scans]
    assert leftover_secret_files == []
    assert "debug" in nbdkit_log  # verbose: the log holds the configuration nbdkit parsed
    for text in [nbdkit_log, *logs_during, caplog.text]:
        assert PASSWORD not in text
        assert SESSION not in text


def test_wrong_password_fails_at_start_up_without_showing_it(images: Images, tmp_path: Path) -> None:
    with DiskServer(images.dense, FOLDER_PATH, COOKIE, "root", PASSWORD, tmp_path) as disk:
        wrong = "Not-The-Pa55word-0042"
        with pytest.raises(SourceStartError) as caught:
            NbdkitServer(https_source(disk, password=wrong).nbdkit_command()).start()
    assert "401" in str(caught.value)
    assert wrong not in str(caught.value)
    assert PASSWORD not in str(caught.value)
