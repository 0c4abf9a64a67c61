"""The composition root: turns settings into a NATS connection, a registry and a state store."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.js import JetStreamContext
from platformdirs import user_cache_path

from vmferry.bus.connection import connect
from vmferry.bus.errors import BusUnavailableError
from vmferry.bus.function import Registry
from vmferry.bus.handles import BusHandle
from vmferry.bus.naming import Naming
from vmferry.bus.state import StateStore
from vmferry.cli.config import Settings, SourceConfig, embedded_url

if TYPE_CHECKING:
    from vmferry.adapters.dataplane.snapshot_sources import TransportSettings
    from vmferry.functions import Dependencies


def registry_for(settings: Settings, bus: BusHandle | None = None) -> Registry:
    """Every function, with dependencies built from the settings; ``bus`` is bound once connected."""
    from vmferry.functions import build_registry  # noqa: PLC0415 - keeps light commands fast

    return build_registry(dependencies_for(settings, bus or BusHandle()))


def dependencies_for(settings: Settings, bus: BusHandle) -> Dependencies:
    """The functions' dependencies; vSphere and OpenStack connect on first use."""
    # Imported here: the adapters pull in openstacksdk and pyvmomi, which commands that only
    # talk to NATS (status, events, migrate) do not need.
    from vmferry.adapters.conversion.model import HostConfig  # noqa: PLC0415
    from vmferry.adapters.openstack.client import OpenStackClients  # noqa: PLC0415
    from vmferry.adapters.vsphere.aio import VsphereClients  # noqa: PLC0415
    from vmferry.functions import ConversionHostConfig, Dependencies  # noqa: PLC0415

    conversion = settings.conversion
    work_dir = Path(conversion.work_dir) if conversion.work_dir else settings.state_dir / "work"
    cache = os.environ.get("VMFERRY_CACHE")
    appliance = (
        Path(conversion.appliance_cache)
        if conversion.appliance_cache
        else (Path(cache) if cache else user_cache_path("vmferry")) / "libguestfs"
    )
    return Dependencies(
        known_sources=frozenset(settings.sources),
        known_destinations=frozenset(settings.destinations),
        concurrency=dict(settings.concurrency),
        bus=bus,
        vsphere=VsphereClients.from_sources(settings.sources),
        openstack=OpenStackClients.from_destinations(settings.destinations),
        conversion_hosts={
            name: ConversionHostConfig(d.conversion_host_id, Path(d.device_root))
            for name, d in settings.destinations.items()
        },
        transports={name: _transport(source) for name, source in settings.sources.items()},
        conversion=HostConfig(
            appliance_cache=appliance,
            virtio_win=Path(conversion.virtio_win) if conversion.virtio_win else None,
        ),
        work_dir=work_dir,
    )


def _transport(source: SourceConfig) -> TransportSettings:
    """The nbdkit transport settings of one configured source."""
    from vmferry.adapters.dataplane.snapshot_sources import (  # noqa: PLC0415
        SshSettings,
        TransportSettings,
        VddkSettings,
    )

    vddk = source.vddk
    ssh = source.ssh
    return TransportSettings(
        vddk=VddkSettings(
            libdir=Path(vddk.libdir),
            thumbprint=vddk.thumbprint,
            transports=tuple(vddk.transports),
            compression=vddk.compression,
        )
        if vddk
        else None,
        ssh=SshSettings(
            host=ssh.host,
            user=ssh.user,
            port=ssh.port,
            identity=Path(ssh.identity_file) if ssh.identity_file else None,
            known_hosts=Path(ssh.known_hosts_file) if ssh.known_hosts_file else None,
        )
        if ssh
        else None,
        https_timeout=source.https_timeout,
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
