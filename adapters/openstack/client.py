"""Auth and the asyncio facade: every openstacksdk call runs in a worker thread, errors mapped.

Credentials come from a clouds.yaml entry (optionally a given clouds.yaml file), from the OS_*
environment (cloud ``envvars``), or from an application credential whose secret is read from a file;
secrets never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from openstack import connection
from openstack.config import loader

from vmferry.adapters.openstack.errors import ferry_error, is_unauthorized
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.cli.config import DestinationConfig
from vmferry.schemas.request import DestinationRef

T = TypeVar("T")


@dataclass(frozen=True)
class CloudAuth:
    """Where a cloud's credentials come from.

    ``cloud`` names a clouds.yaml entry (``envvars`` means the OS_* environment). With
    ``application_credential_id`` set, the secret is read from ``application_credential_secret_file``
    and ``auth_url`` is required.
    """

    cloud: str
    clouds_yaml: Path | None = None
    auth_url: str | None = None
    application_credential_id: str | None = None
    application_credential_secret_file: Path | None = None
    region: str | None = None
    project: str | None = None

    def connect(self) -> connection.Connection:
        """An authenticated-on-demand connection (the first call authenticates)."""
        if self.application_credential_id:
            return self._connect_app_credential()
        files = [str(self.clouds_yaml)] if self.clouds_yaml else None
        config = loader.OpenStackConfig(config_files=files, load_envvars=self.cloud == "envvars")
        extra: dict[str, Any] = {}
        if self.region:
            extra["region_name"] = self.region
        if self.project:
            extra["project_name"] = self.project
        region = config.get_one(cloud=self.cloud, **extra)
        return connection.Connection(config=region)

    def _connect_app_credential(self) -> connection.Connection:
        if not self.auth_url or not self.application_credential_secret_file:
            raise ferry_error(
                ValueError("application credential needs auth_url and a secret file"),
                "building the application-credential auth",
                self.cloud,
            )
        secret = self.application_credential_secret_file.read_text().strip()
        return connection.Connection(
            auth_type="v3applicationcredential",
            auth={
                "auth_url": self.auth_url,
                "application_credential_id": self.application_credential_id,
                "application_credential_secret": secret,
            },
            region_name=self.region,
        )


async def wait_until(
    what: str,
    probe: Callable[[], Awaitable[T | None]],
    timeout: float,
    first: float = 0.5,
    cap: float = 10.0,
) -> T:
    """Poll ``probe`` with exponential backoff until it returns something; RetryableError at timeout."""
    deadline = time.monotonic() + timeout
    delay = first
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() + delay > deadline:
            raise RetryableError(
                f"timed out after {timeout:.0f} s waiting for {what}", "retry; check the service logs"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 1.6, cap)


class OpenStackAdapter:
    """One cloud's connection behind async methods; the other modules build on ``call``."""

    def __init__(self, auth: CloudAuth, conn: connection.Connection | None = None) -> None:
        self.auth = auth
        self._conn = conn

    @property
    def conn(self) -> connection.Connection:
        """The SDK connection, created on first use."""
        if self._conn is None:
            self._conn = self.auth.connect()
        return self._conn

    async def call(self, doing: str, fn: Callable[..., T], *args: Any, needs: str = "", **kwargs: Any) -> T:
        """Run one SDK call in a thread; re-authenticate once on a 401 (expired token), map errors."""
        return await asyncio.to_thread(self._guarded, doing, needs, fn, args, kwargs)

    def _guarded(self, doing: str, needs: str, fn: Callable[..., T], args: Any, kwargs: Any) -> T:
        try:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_unauthorized(exc):
                    raise
                # An expired or revoked token: drop it and try once with a fresh one.
                self.conn.session.invalidate()
                return fn(*args, **kwargs)
        except FerryError:
            raise
        except Exception as exc:
            raise ferry_error(exc, doing, self.auth.cloud, needs) from exc

    async def check_auth(self) -> str:
        """Authenticate now; return the project id (fails with a clear error on bad credentials)."""
        await self.call("authenticating", self.conn.authorize)
        return str(self.conn.current_project_id)

    async def project_id(self) -> str:
        """The project the connection is scoped to."""
        return await self.call("reading the token's project", lambda: str(self.conn.current_project_id))

    def close(self) -> None:
        """Close the HTTP session."""
        if self._conn is not None:
            self._conn.close()


class OpenStackClients:
    """Adapters by configured destination name, created on first use and kept."""

    def __init__(self, auths: Mapping[str, CloudAuth]) -> None:
        self._auths = dict(auths)
        self._adapters: dict[tuple[str, str | None, str | None], OpenStackAdapter] = {}

    @classmethod
    def from_destinations(cls, destinations: Mapping[str, DestinationConfig]) -> OpenStackClients:
        """From the ``destinations`` section of the vmferry configuration."""
        return cls({name: auth_from_destination(name, config) for name, config in destinations.items()})

    async def __call__(self, destination: DestinationRef) -> OpenStackAdapter:
        """The adapter for a request's destination (its project and region override the entry's)."""
        auth = self._auths.get(destination.cloud)
        if auth is None:
            known = ", ".join(sorted(self._auths)) or "none"
            raise PermanentError(
                f"OpenStack destination {destination.cloud!r} is not configured (configured: {known})",
                "add it under `destinations` in the vmferry configuration of the functions",
            )
        key = (destination.cloud, destination.project, destination.region)
        adapter = self._adapters.get(key)
        if adapter is None:
            scoped = replace(
                auth, project=destination.project or auth.project, region=destination.region or auth.region
            )
            adapter = self._adapters[key] = OpenStackAdapter(scoped)
        return adapter

    def close(self) -> None:
        """Close every adapter's HTTP session."""
        adapters, self._adapters = list(self._adapters.values()), {}
        for adapter in adapters:
            adapter.close()


def auth_from_destination(name: str, config: DestinationConfig) -> CloudAuth:
    """How to authenticate to one configured destination."""
    return CloudAuth(
        cloud=config.cloud or name,
        clouds_yaml=Path(config.clouds_yaml) if config.clouds_yaml else None,
        auth_url=config.auth_url,
        application_credential_id=config.application_credential_id,
        application_credential_secret_file=(
            Path(config.application_credential_secret_file)
            if config.application_credential_secret_file
            else None
        ),
    )
