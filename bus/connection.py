"""Connecting to NATS: servers, every auth method, TLS, endless reconnects and one-line errors."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.errors import NoServersError

from vmferry.bus.errors import BusUnavailableError

log = logging.getLogger(__name__)


class Secret:
    """A secret value that never shows in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself; call only where it is handed to the library that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class NatsSettings:
    """How to reach and authenticate to NATS. Secrets are read from files or the environment."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    name: str = "vmferry"
    connect_timeout: float = 5.0
    reconnect_wait: float = 2.0

    def describe(self) -> str:
        """The server list, without credentials, for messages."""
        return ", ".join(_strip_userinfo(s) for s in self.servers)

    def tls_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context when a CA or client certificate is configured."""
        uses_tls = any(s.startswith("tls://") for s in self.servers)
        if not (self.tls_ca_file or self.tls_cert_file or uses_tls):
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca_file) if self.tls_ca_file else None)
        if self.tls_cert_file:
            context.load_cert_chain(
                str(self.tls_cert_file), str(self.tls_key_file) if self.tls_key_file else None
            )
        return context


def _strip_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


_DECISIVE = ("authorization", "authentication", "permissions", "certificate", "ssl", "tls")


class _ConnectionWatch:
    """Remembers the last connection error so a failed connect can say why in one line."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    async def on_error(self, error: Exception) -> None:
        self.errors.append(error)
        del self.errors[:-10]
        log.warning("NATS connection problem: %s", _one_line(error))

    def telling_error(self) -> Exception | None:
        """The error that best explains a failed connect: auth and TLS beat a reset socket."""
        for error in reversed(self.errors):
            text = _one_line(error).lower()
            if isinstance(error, ssl.SSLError) or any(w in text for w in _DECISIVE):
                return error
        return self.errors[-1] if self.errors else None

    @staticmethod
    async def on_disconnected() -> None:
        # Also fires on a deliberate close(), so it is not a warning by itself.
        log.info("disconnected from NATS")

    @staticmethod
    async def on_reconnected() -> None:
        log.info("reconnected to NATS")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _explain(settings: NatsSettings, error: BaseException | None) -> BusUnavailableError:
    where = settings.describe()
    text = _one_line(error) if error else "no server answered"
    lowered = text.lower()
    if "authorization" in lowered or "authentication" in lowered or "permissions" in lowered:
        return BusUnavailableError(
            f"NATS at {where} refused the credentials ({text})",
            "check the user/password, token, NKEY seed or creds file configured for vmferry",
        )
    if isinstance(error, ssl.SSLError) or "certificate" in lowered or "ssl" in lowered:
        return BusUnavailableError(
            f"TLS to NATS at {where} failed ({text})",
            "set nats.tls_ca_file to the CA that signed the server certificate",
        )
    return BusUnavailableError(
        f"cannot reach NATS at {where} ({text})",
        "start a server (`vmferry up` runs an embedded one) or set VMFERRY_NATS_URL",
    )


async def connect(settings: NatsSettings) -> Client:
    """Connect once (fail fast with an actionable error), then reconnect forever on outages."""
    watch = _ConnectionWatch()
    options: dict[str, object] = {
        "servers": list(settings.servers),
        "name": settings.name,
        "connect_timeout": settings.connect_timeout,
        "reconnect_time_wait": settings.reconnect_wait,
        # nats-py applies this to the first connect too: try each server twice, then say why.
        "max_reconnect_attempts": 1,
        "allow_reconnect": True,
        "error_cb": watch.on_error,
        "disconnected_cb": watch.on_disconnected,
        "reconnected_cb": watch.on_reconnected,
    }
    if settings.user is not None:
        options["user"] = settings.user
        options["password"] = settings.password.reveal() if settings.password else ""
    if settings.token is not None:
        options["token"] = settings.token.reveal()
    if settings.nkey_seed_file is not None:
        options["nkeys_seed"] = str(settings.nkey_seed_file)
    if settings.creds_file is not None:
        options["user_credentials"] = str(settings.creds_file)
    tls = settings.tls_context()
    if tls is not None:
        options["tls"] = tls
    # nats-py can wait forever after a failed TLS handshake, so the whole attempt has a deadline.
    deadline = 2 * len(settings.servers) * (settings.connect_timeout + settings.reconnect_wait) + 1
    try:
        async with asyncio.timeout(deadline):
            client: Client = await nats.connect(**options)  # type: ignore[arg-type]
    except (NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
        raise _explain(settings, watch.telling_error() or exc) from None
    # Once connected, never give up reconnecting: long-lived consumers must survive outages.
    client.options["max_reconnect_attempts"] = -1
    return client
