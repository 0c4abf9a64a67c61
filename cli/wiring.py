"""The composition root: turns settings into a NATS connection, a registry and a state store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from nats.aio.client import Client
from nats.js import JetStreamContext

from vmferry.bus.connection import connect
from vmferry.bus.errors import BusUnavailableError
from vmferry.bus.function import Registry
from vmferry.bus.naming import Naming
from vmferry.bus.state import StateStore
from vmferry.cli.config import Settings, embedded_url
from vmferry.functions import Dependencies, build_registry


def registry_for(settings: Settings) -> Registry:
    """Every function, with dependencies built from the settings."""
    return build_registry(
        Dependencies(
            known_sources=frozenset(settings.sources),
            known_destinations=frozenset(settings.destinations),
            concurrency=dict(settings.concurrency),
        )
    )


def with_server(settings: Settings) -> Settings:
    """Settings pointing at the configured server, else at a running `vmferry up`."""
    if settings.nats_configured:
        return settings
    url = embedded_url(settings)
    if url is None:
        raise BusUnavailableError(
            "no NATS server is configured and no `vmferry up` is running",
            "run `vmferry up` in another terminal, or set VMFERRY_NATS_URL / nats.servers",
        )
    return replace(settings, nats=replace(settings.nats, servers=(url,)), nats_configured=True)


@dataclass
class Session:
    """An open connection with what commands need from it."""

    nc: Client
    js: JetStreamContext
    naming: Naming

    async def store(self) -> StateStore:
        """The per-VM state store (must be provisioned)."""
        return await StateStore.open(self.js, self.naming.state_bucket)


@asynccontextmanager
async def session(settings: Settings) -> AsyncIterator[Session]:
    """Connect (to the configured or embedded server) for the duration of a command."""
    resolved = with_server(settings)
    nc = await connect(resolved.nats)
    try:
        yield Session(nc, nc.jetstream(), Naming(resolved.prefix))
    finally:
        await nc.close()
