"""Connecting to NATS: auth methods, TLS with a CA file, one-line errors, reconnects, no secret leaks."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest

from vmferry.bus.connection import NatsSettings, Secret, connect
from vmferry.bus.embedded import EmbeddedNats
from vmferry.bus.errors import BusUnavailableError

PASSWORD = "s3cr3t-Pa55"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_server_is_one_clear_line() -> None:
    port = _free_port()
    with pytest.raises(BusUnavailableError) as caught:
        await connect(NatsSettings(servers=(f"nats://127.0.0.1:{port}",), connect_timeout=1))
    error = caught.value
    assert f"cannot reach NATS at nats://127.0.0.1:{port}" in error.cause
    assert "\n" not in str(error) and "vmferry up" in error.fix


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedNats:
    server = EmbeddedNats(
        tmp_path_factory.mktemp("auth"),
        config=f'authorization {{ user: ferry, password: "{PASSWORD}" }}\n',
    )
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


async def test_user_password(auth_server: EmbeddedNats) -> None:
    nc = await connect(NatsSettings(servers=(auth_server.url,), user="ferry", password=Secret(PASSWORD)))
    assert nc.is_connected
    await nc.close()


async def test_wrong_password_is_refused_clearly_without_the_secret(auth_server: EmbeddedNats) -> None:
    settings = NatsSettings(servers=(auth_server.url,), user="ferry", password=Secret("wrong-one"))
    with pytest.raises(BusUnavailableError) as caught:
        await connect(settings)
    text = f"{caught.value} {caught.value.fix} {settings!r}"
    assert "refused the credentials" in caught.value.cause
    assert "wrong-one" not in text and PASSWORD not in text


async def test_token(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path, config='authorization { token: "tok-123" }\n') as server:
        nc = await connect(NatsSettings(servers=(server.url,), token=Secret("tok-123")))
        await nc.close()
        with pytest.raises(BusUnavailableError, match="refused the credentials"):
            await connect(NatsSettings(servers=(server.url,), token=Secret("nope")))


# A public test key pair from the NATS documentation; the test checks they belong together.
NKEY_SEED = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"
NKEY_USER = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"


async def test_nkey_seed_file(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text(NKEY_SEED + "\n")
    seed.chmod(0o600)
    with EmbeddedNats(
        tmp_path / "srv", config=f"authorization {{ users: [ {{ nkey: {NKEY_USER} }} ] }}\n"
    ) as server:
        nc = await connect(NatsSettings(servers=(server.url,), nkey_seed_file=seed))
        assert nc.is_connected
        await nc.close()
        with pytest.raises(BusUnavailableError, match="refused the credentials"):
            await connect(NatsSettings(servers=(server.url,)))


def _make_tls(folder: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=vmferry test CA")  # fmt: skip
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


async def test_tls_verified_with_ca_file(tmp_path: Path) -> None:
    ca, cert, key = _make_tls(tmp_path)
    config = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    with EmbeddedNats(tmp_path / "srv", config=config) as server:
        url = server.url.replace("nats://", "tls://")
        nc = await connect(NatsSettings(servers=(url,), tls_ca_file=ca))
        assert nc.is_connected
        await nc.close()
        with pytest.raises(BusUnavailableError, match=r"TLS|certificate|cannot reach"):
            await connect(NatsSettings(servers=(url,), connect_timeout=2))  # system CAs don't know it


async def test_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path, port=_free_port())
    server.start()
    nc = await connect(NatsSettings(servers=(server.url,), reconnect_wait=0.2))
    try:
        server.stop()
        await asyncio.sleep(0.5)
        server.start()
        js = nc.jetstream()
        for _ in range(100):
            if nc.is_connected:
                break
            await asyncio.sleep(0.1)
        assert nc.is_connected
        await js.add_stream(name="RECONNECT", subjects=["reconnect.>"])
        ack = await js.publish("reconnect.x", b"1")
        assert ack.seq == 1
    finally:
        await nc.close()
        server.stop()


def test_secret_never_renders() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) + str(secret) + repr(NatsSettings(password=secret))
    assert secret.reveal() == "hunter2"
