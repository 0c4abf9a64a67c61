"""The vSphere client against vcsim-ferry: TLS verification and pinning, login failures, network
errors, and transparent re-login after the session was terminated (by another session)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pyVmomi import vim

from tests.vsphere.conftest import VcsimServer
from tests.vsphere.lab import Lab
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import load_index
from vmferry.bus.errors import FerryError, PermanentError, RetryableError


def connect_error(lab: Lab, **overrides: object) -> FerryError:
    with pytest.raises(FerryError) as caught:
        VsphereClient(lab.settings(**overrides)).connect()
    return caught.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_verified_tls_login_and_logout(lab: Lab) -> None:
    client = VsphereClient(lab.settings()).connect()
    try:
        assert client.is_vcenter
        assert client.login_generation == 1
        session = client.current_session()
        assert session is not None and session.userName == lab.vcsim.user
        assert session.key in lab.session_keys()
    finally:
        client.close()
    assert session.key not in lab.session_keys()  # close() logs out


@pytest.mark.parametrize("which", ["sha256", "sha1"])
def test_a_pinned_thumbprint_replaces_the_ca(lab: Lab, vcsim: VcsimServer, which: str) -> None:
    pin = vcsim.thumbprint_sha256 if which == "sha256" else vcsim.thumbprint_sha1
    # no CA at all: only the pin vouches for the server
    with VsphereClient(lab.settings(ca_file=None, thumbprint=pin.lower())) as client:
        assert client.current_session() is not None


def test_a_wrong_thumbprint_refuses_and_shows_the_real_one(lab: Lab, vcsim: VcsimServer) -> None:
    wrong = "AB:" * 31 + "CD"
    error = connect_error(lab, thumbprint=wrong)
    assert isinstance(error, PermanentError)
    assert vcsim.thumbprint_sha256 in error.cause
    assert "refusing to connect" in error.cause and "thumbprint" in error.fix


def test_an_untrusted_certificate_is_refused(lab: Lab) -> None:
    # the system store does not know the simulator's self-signed certificate
    error = connect_error(lab, ca_file=None)
    assert isinstance(error, PermanentError)
    assert "not trusted" in error.cause and "ca_file" in error.fix


def test_a_malformed_thumbprint_is_a_configuration_error(lab: Lab) -> None:
    with pytest.raises(PermanentError, match="not a SHA-1, SHA-256"):
        lab.settings(thumbprint="12:34")


def test_a_wrong_password_says_so_and_never_shows_a_password(lab: Lab, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-password"
    secret = "Sup3r-Secret-Wrong-Password"
    wrong.write_text(secret + "\n")
    error = connect_error(lab, password_file=wrong)
    assert isinstance(error, PermanentError)
    assert "login refused" in error.cause
    rendered = f"{error!r} {error} {error.__cause__!r} {error.__context__!r}"
    assert secret not in rendered and lab.vcsim.password() not in rendered


def test_a_missing_password_file_names_the_file(lab: Lab, tmp_path: Path) -> None:
    error = connect_error(lab, password_file=tmp_path / "nope")
    assert isinstance(error, PermanentError) and str(tmp_path / "nope") in error.cause


def test_nothing_listening_is_retryable(lab: Lab) -> None:
    error = connect_error(lab, port=free_port())
    assert isinstance(error, RetryableError)
    assert "connection refused" in error.cause


def test_an_unknown_host_name_is_permanent(lab: Lab) -> None:
    error = connect_error(lab, host="vcenter.does-not-exist.invalid")
    assert isinstance(error, PermanentError)
    assert "does not resolve" in error.cause


def test_a_terminated_session_is_replaced_on_the_next_call(lab: Lab, client: VsphereClient) -> None:
    session = client.current_session()
    assert session is not None
    lab.terminate(session.key)

    index = load_index(client)  # the read notices the lost session and logs in again

    assert client.login_generation == 2
    assert index.entities  # and returned real data, not empty "missing" properties
    new_session = client.current_session()
    assert new_session is not None and new_session.key != session.key
    # a method call (not a read) also re-logs in transparently
    lab.terminate(new_session.key)
    folder = client.bind(vim.Folder, lab.datacenter.vmFolder._moId)
    created = client.call("creating a folder", folder.CreateFolder, "after-relogin")
    assert created._moId and client.login_generation == 3


def test_threads_that_find_the_session_gone_log_in_once(lab: Lab, client: VsphereClient) -> None:
    session = client.current_session()
    assert session is not None
    lab.terminate(session.key)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            load_index(client)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert client.login_generation == 2


def test_keep_alive_replaces_an_expired_session(lab: Lab) -> None:
    with VsphereClient(lab.settings(keepalive=0.1)) as client:
        session = client.current_session()
        assert session is not None
        lab.terminate(session.key)
        deadline = time.monotonic() + 10
        while client.login_generation < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.login_generation >= 2
