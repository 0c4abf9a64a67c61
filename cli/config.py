"""Configuration from a YAML file, the environment and flags (flags win, then environment, then file).

Secrets are never taken from flags (they would show in the process table): only from files or the
environment. The file's schema is typed; an error names the offending key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
import yaml
from platformdirs import user_config_path, user_state_path

from vmferry.bus.connection import NatsSettings, Secret
from vmferry.bus.errors import FerryError
from vmferry.bus.provision import Limits

ENV_PREFIX = "VMFERRY_"


class ConfigError(FerryError):
    """The configuration is missing, unreadable or wrong; the cause names the key."""


class _NatsFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    servers: list[str] = []
    user: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class VddkConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Transport ``vddk``: where VMware's VDDK is unpacked on the conversion host."""

    libdir: str
    #: SHA-1 thumbprint VDDK checks; default: the source's thumbprint
    thumbprint: str | None = None
    transports: tuple[str, ...] = ("file", "nbdssl", "nbd")
    compression: str | None = "fastlz"


class SshConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Transport ``ssh``: the ESXi host holding the source's datastores, reached with a key."""

    host: str
    user: str = "root"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 22
    identity_file: str | None = None
    known_hosts_file: str | None = None


class SourceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A vSphere endpoint (vCenter or ESXi) requests refer to by name."""

    host: str
    user: str = ""
    password_file: str | None = None
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 443
    ca_file: str | None = None
    #: SHA-256 or SHA-1 thumbprint of the server certificate, as an alternative to a CA
    thumbprint: str | None = None
    insecure: bool = False
    vddk: VddkConfig | None = None
    ssh: SshConfig | None = None
    #: seconds nbdkit's curl plugin waits on the datastore (transport ``https``)
    https_timeout: int | None = None


class DestinationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """An OpenStack cloud requests refer to by name (usually a clouds.yaml entry)."""

    #: clouds.yaml entry (default: the destination's name); ``envvars`` reads OS_* variables
    cloud: str | None = None
    clouds_yaml: str | None = None
    #: application credential instead of clouds.yaml: id, secret in a 0600 file, Keystone URL
    auth_url: str | None = None
    application_credential_id: str | None = None
    application_credential_secret_file: str | None = None
    #: the Nova server (instance UUID) this process runs on, where replicas are attached
    conversion_host_id: str | None = None
    #: where attached volumes appear as dev/disk/by-id/virtio-<id>: "/" on a real conversion host
    device_root: str = "/"


class _StreamsFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    #: 3 on a three-node NATS cluster
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    duplicate_window_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    event_max_age_days: Annotated[float, msgspec.Meta(gt=0)] = 90.0
    state_history: Annotated[int, msgspec.Meta(ge=10, le=64)] = 16


class _FunctionFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None


class ConversionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The conversion host's tools and folders."""

    #: scratch space for conversions and nbdkit sockets (default: <state_dir>/work)
    work_dir: str | None = None
    #: libguestfs appliance cache, reused between conversions (default: the user cache folder)
    appliance_cache: str | None = None
    #: virtio-win ISO or folder, needed for Windows guests
    virtio_win: str | None = None


class _ConfigFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prefix: str = "ferry"
    nats: _NatsFile = msgspec.field(default_factory=_NatsFile)
    sources: dict[str, SourceConfig] = {}
    destinations: dict[str, DestinationConfig] = {}
    functions: dict[str, _FunctionFile] = {}
    streams: _StreamsFile = msgspec.field(default_factory=_StreamsFile)
    conversion: ConversionConfig = msgspec.field(default_factory=ConversionConfig)
    state_dir: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a vmferry process needs to know, resolved."""

    nats: NatsSettings
    nats_configured: bool
    prefix: str = "ferry"
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    destinations: dict[str, DestinationConfig] = field(default_factory=dict)
    concurrency: dict[str, int] = field(default_factory=dict)
    state_dir: Path = field(default_factory=lambda: user_state_path("vmferry"))
    config_file: Path | None = None
    limits: Limits = field(default_factory=Limits)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)

    @property
    def embedded_record(self) -> Path:
        """Where `vmferry up` writes the URL of the embedded server for other commands."""
        return self.state_dir / "embedded.json"


def default_config_file() -> Path:
    """``$VMFERRY_CONFIG`` or the per-user config file."""
    return Path(os.environ.get(f"{ENV_PREFIX}CONFIG") or user_config_path("vmferry") / "config.yaml")


def _read_file(path: Path) -> _ConfigFile:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    try:
        return msgspec.convert(raw, _ConfigFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(
            f"config file {path}: {exc}", "see the Configuration section of the README"
        ) from exc


def _secret_from_file(path: str | None, what: str) -> Secret | None:
    if not path:
        return None
    try:
        return Secret(Path(path).read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} from {path}: {exc.strerror}") from exc


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def load(
    config_file: Path | None = None,
    nats_url: str | None = None,
    prefix: str | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Resolve settings from the file (if any), then ``VMFERRY_*`` variables, then flags."""
    env = dict(os.environ if env is None else env)
    explicit = config_file is not None
    path = config_file or default_config_file()
    data = _read_file(path) if (explicit or path.exists()) else _ConfigFile()
    if explicit and not path.exists():
        raise ConfigError(f"config file {path} does not exist")

    def get(name: str) -> str | None:
        return env.get(ENV_PREFIX + name) or None

    servers_text = nats_url or get("NATS_URL")
    servers = tuple(s.strip() for s in servers_text.split(",")) if servers_text else tuple(data.nats.servers)
    password = (
        Secret(p)
        if (p := get("NATS_PASSWORD"))
        else _secret_from_file(data.nats.password_file, "NATS password")
    )
    token = Secret(t) if (t := get("NATS_TOKEN")) else _secret_from_file(data.nats.token_file, "NATS token")
    nats_settings = NatsSettings(
        servers=servers or NatsSettings().servers,
        user=get("NATS_USER") or data.nats.user,
        password=password,
        token=token,
        nkey_seed_file=_path(get("NATS_NKEY_SEED") or data.nats.nkey_seed_file),
        creds_file=_path(get("NATS_CREDS") or data.nats.creds_file),
        tls_ca_file=_path(get("NATS_CA") or data.nats.tls_ca_file),
        tls_cert_file=_path(get("NATS_CERT") or data.nats.tls_cert_file),
        tls_key_file=_path(get("NATS_KEY") or data.nats.tls_key_file),
    )
    state_dir = _path(get("STATE_DIR") or data.state_dir) or user_state_path("vmferry")
    return Settings(
        nats=nats_settings,
        nats_configured=bool(servers),
        prefix=prefix or get("PREFIX") or data.prefix,
        sources=dict(data.sources),
        destinations=dict(data.destinations),
        concurrency={k: v.concurrency for k, v in data.functions.items() if v.concurrency},
        state_dir=state_dir,
        conversion=data.conversion,
        config_file=path if path.exists() else None,
        limits=Limits(
            duplicate_window_s=data.streams.duplicate_window_s,
            event_max_age_s=data.streams.event_max_age_days * 24 * 3600,
            state_history=data.streams.state_history,
            replicas=data.streams.replicas,
        ),
    )


def embedded_url(settings: Settings) -> str | None:
    """The URL a running `vmferry up` recorded, if its server is still alive."""
    try:
        record = json.loads(settings.embedded_record.read_text())
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    url = record.get("url")
    return url if isinstance(url, str) else None
