"""Disk sources: how to read one VMware disk (a snapshot's view of it) as an nbdkit export.

* ``VddkSource`` -- production path: nbdkit's vddk plugin (VMware VDDK, NBD/NBDSSL/SAN/HotAdd transports).
* ``HttpsSource`` -- datastore download over HTTPS (vCenter/ESXi ``/folder`` URL) via the curl plugin.
* ``LocalSource`` -- a datastore mounted here over NFS: raw/flat files through the file plugin, sparse
  or multi-extent VMDKs through ``qemu-nbd --read-only`` run by nbdkit's nbd plugin.
* ``SshSource`` -- an ESXi host reachable over SSH, read over SFTP by the ssh plugin.

Each builds an ``NbdkitCommand`` (argument list, secrets kept apart); ``NbdkitServer`` runs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit

from vmferry.adapters.dataplane.errors import SourceStartError
from vmferry.adapters.dataplane.nbdkit import NbdkitCommand, NbdkitFilter

if TYPE_CHECKING:  # the bus module pulls in nats; the data plane only needs the type
    from vmferry.bus.connection import Secret

_MOREF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_THUMBPRINT = re.compile(r"^([0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}$|^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")
_DATASTORE_PATH = re.compile(r"^\[[^\]]+\] \S.*\.vmdk$")
_TRANSPORTS = frozenset({"file", "san", "hotadd", "nbdssl", "nbd"})
_COMPRESSION = frozenset({"none", "zlib", "fastlz", "skipz"})
_DEFAULT_VDDK_FILTERS = (NbdkitFilter("cacheextents"), NbdkitFilter("retry"))


class SourceConfigError(SourceStartError):
    """A source is described with missing or malformed settings (caught before nbdkit runs)."""


class DiskSource(Protocol):
    """Anything that can describe itself as an nbdkit invocation."""

    def nbdkit_command(self) -> NbdkitCommand:
        """The plugin, parameters, secrets and filters serving this disk read-only."""
        ...


def _require(condition: bool, cause: str, fix: str) -> None:
    if not condition:
        raise SourceConfigError(cause, fix)


@dataclass(frozen=True)
class VddkSource:
    """A disk of a VM snapshot read through VMware's VDDK.

    ``file`` is the disk's datastore path as vSphere shows it (``[datastore1] vm/vm.vmdk``);
    ``thumbprint`` the SHA-1 fingerprint of the vCenter/ESXi certificate (``xx:xx:...``).
    """

    libdir: Path
    server: str
    user: str
    password: Secret
    thumbprint: str
    vm_moref: str
    snapshot_moref: str
    file: str
    transports: Sequence[str] = ("file", "nbdssl", "nbd")
    compression: str | None = "fastlz"
    port: int | None = None
    config: Path | None = None
    filters: tuple[NbdkitFilter, ...] = _DEFAULT_VDDK_FILTERS

    def nbdkit_command(self) -> NbdkitCommand:
        """vddk plugin invocation; the password goes by file or descriptor, never in argv."""
        self._validate()
        params: list[tuple[str, str]] = [
            ("libdir", str(self.libdir)),
            ("server", self.server),
            ("user", self.user),
            ("thumbprint", self.thumbprint),
            ("vm", f"moref={self.vm_moref}"),
            ("snapshot", self.snapshot_moref),
            ("transports", ":".join(self.transports)),
        ]
        if self.compression:
            params.append(("compression", self.compression))
        if self.port is not None:
            params.append(("port", str(self.port)))
        if self.config is not None:
            params.append(("config", str(self.config)))
        params.append(("file", self.file))
        return NbdkitCommand(
            plugin="vddk",
            params=tuple(params),
            secrets=(("password", self.password),),
            filters=self.filters,
            description=f"vddk {self.server} {self.vm_moref}/{self.snapshot_moref} {self.file}",
        )

    def _validate(self) -> None:
        _require(
            self.libdir.is_absolute(), f"VDDK libdir {self.libdir} is not absolute", "give the absolute path"
        )
        _require(
            bool(self.server) and "/" not in self.server, f"bad server {self.server!r}", "host name only"
        )
        _require(bool(self.user), "no vSphere user given", "configure the source credentials")
        _require(
            bool(_THUMBPRINT.match(self.thumbprint)),
            f"thumbprint {self.thumbprint!r} is not a colon-separated SHA-1 or SHA-256 fingerprint",
            "read it with: openssl s_client -connect SERVER:443 </dev/null | openssl x509 -fingerprint -sha1",
        )
        for name, moref in (("VM", self.vm_moref), ("snapshot", self.snapshot_moref)):
            _require(
                bool(_MOREF.match(moref)),
                f"{name} moref {moref!r} is malformed",
                f"pass the managed object id, e.g. {'vm-123' if name == 'VM' else 'snapshot-45'}",
            )
        _require(
            bool(_DATASTORE_PATH.match(self.file)),
            f"disk path {self.file!r} is not a datastore path",
            "use the form '[datastore] folder/disk.vmdk' from the VM's disk backing",
        )
        unknown = set(self.transports) - _TRANSPORTS
        _require(
            bool(self.transports) and not unknown,
            f"unknown VDDK transports {sorted(unknown)}",
            f"choose from {sorted(_TRANSPORTS)}",
        )
        _require(
            self.compression is None or self.compression in _COMPRESSION,
            f"unknown VDDK compression {self.compression!r}",
            f"choose from {sorted(_COMPRESSION)}",
        )


def datastore_folder_url(host: str, datacenter: str, datastore: str, path: str) -> str:
    """The vCenter/ESXi datastore-browser URL of ``path`` (e.g. ``vm1/vm1-flat.vmdk``) on a datastore."""
    query = urlencode({"dcPath": datacenter, "dsName": datastore})
    return f"https://{host}/folder/{quote(path.lstrip('/'))}?{query}"


@dataclass(frozen=True)
class HttpsSource:
    """A flat disk file downloaded with HTTP range requests (datastore ``/folder`` URL).

    ``cookie`` is the vCenter session cookie (``vmware_soap_session="..."``); ``user``/``password`` are
    for hosts that take basic authentication. TLS is verified against ``cainfo`` or the system store.
    """

    url: str
    cookie: Secret | None = None
    user: str | None = None
    password: Secret | None = None
    cainfo: Path | None = None
    verify_tls: bool = True
    timeout: int | None = None
    filters: tuple[NbdkitFilter, ...] = ()

    def nbdkit_command(self) -> NbdkitCommand:
        """curl plugin invocation restricted to HTTPS, credentials by file or descriptor."""
        parts = urlsplit(self.url)
        _require(
            parts.scheme == "https" and bool(parts.hostname),
            f"URL {self.url!r} is not an https:// URL",
            "use the datastore /folder URL over HTTPS (see datastore_folder_url)",
        )
        _require(
            parts.username is None and parts.password is None,
            "the URL holds credentials",
            "pass user and password separately so they stay out of the process table",
        )
        params: list[tuple[str, str]] = [("url", self.url), ("protocols", "https")]
        secrets: list[tuple[str, Secret]] = []
        if self.cookie is not None:
            secrets.append(("cookie", self.cookie))
        if self.user is not None:
            params.append(("user", self.user))
        if self.password is not None:
            secrets.append(("password", self.password))
        if self.cainfo is not None:
            params.append(("cainfo", str(self.cainfo)))
        if not self.verify_tls:
            params.append(("sslverify", "false"))
        if self.timeout is not None:
            params.append(("timeout", str(self.timeout)))
        return NbdkitCommand(
            plugin="curl",
            params=tuple(params),
            secrets=tuple(secrets),
            filters=self.filters,
            description=f"https {parts.hostname}{parts.path}",
        )


@dataclass(frozen=True)
class VmdkLayout:
    """How a local disk file is laid out: served directly (``path``) or through qemu-nbd."""

    path: Path
    via_qemu: bool
    kind: str


_EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?', re.MULTILINE)


def inspect_local_disk(path: Path, fmt: Literal["auto", "raw", "vmdk"] = "auto") -> VmdkLayout:
    """Decide how to serve a local disk file.

    A raw image or a flat VMDK (descriptor with one FLAT/VMFS extent at offset 0 and no parent) is read
    directly; sparse, streamOptimized, multi-extent or delta VMDKs need qemu's VMDK driver.
    """
    _require(path.exists(), f"disk file {path} does not exist", "check the datastore mount and the path")
    with path.open("rb") as handle:
        head = handle.read(65536)
    if fmt == "raw":
        return VmdkLayout(path, via_qemu=False, kind="raw")
    if head[:4] in (b"KDMV", b"COWD"):
        return VmdkLayout(path, via_qemu=True, kind="sparse vmdk")
    text = head.decode("latin-1")
    if text.lstrip().startswith("# Disk DescriptorFile"):
        return _layout_from_descriptor(path, text)
    _require(fmt == "auto", f"{path} is not a VMDK", "pass format='raw' for a raw image")
    return VmdkLayout(path, via_qemu=False, kind="raw")


def _layout_from_descriptor(path: Path, text: str) -> VmdkLayout:
    extents = _EXTENT.findall(text)
    parent = re.search(r'^\s*parentCID\s*=\s*"?([0-9a-fA-F]+)', text, re.MULTILINE)
    has_parent = parent is not None and parent.group(1).lower() != "ffffffff"
    if len(extents) == 1 and not has_parent:
        _access, sectors, kind, filename, offset = extents[0]
        flat = (path.parent / filename).resolve()
        direct = kind in ("FLAT", "VMFS") and offset in ("", "0") and flat.exists()
        if direct and flat.stat().st_size == int(sectors) * 512:
            return VmdkLayout(flat, via_qemu=False, kind=f"{kind.lower()} vmdk")
    return VmdkLayout(path, via_qemu=True, kind="vmdk descriptor")


@dataclass(frozen=True)
class LocalSource:
    """A disk on a datastore mounted on this host (NFS), read without VMware in the path."""

    path: Path
    format: Literal["auto", "raw", "vmdk"] = "auto"
    bypass_cache: bool = False
    filters: tuple[NbdkitFilter, ...] = ()

    def nbdkit_command(self) -> NbdkitCommand:
        """file plugin for raw/flat data, nbd plugin running ``qemu-nbd --read-only`` otherwise."""
        layout = inspect_local_disk(self.path.resolve(), self.format)
        if not layout.via_qemu:
            params: list[tuple[str, str]] = [("file", str(layout.path))]
            if self.bypass_cache:
                params.append(("cache", "none"))
            return NbdkitCommand(
                plugin="file",
                params=tuple(params),
                filters=self.filters,
                description=f"local {layout.kind} {layout.path}",
            )
        qemu_args = ["--read-only", "--format=vmdk"]
        if self.bypass_cache:
            qemu_args.append("--cache=none")
        qemu_args.append(str(layout.path))
        return NbdkitCommand(
            plugin="nbd",
            params=(("command", "qemu-nbd"), *(("arg", value) for value in qemu_args)),
            filters=self.filters,
            description=f"local {layout.kind} {layout.path} via qemu-nbd",
        )


@dataclass(frozen=True)
class SshSource:
    """A flat disk file on an ESXi host (``/vmfs/volumes/...-flat.vmdk``) read over SFTP.

    Host keys are verified against ``known_hosts`` unless ``verify_host`` is explicitly False.
    """

    host: str
    path: str
    user: str = "root"
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None
    verify_host: bool = True
    password: Secret | None = None
    timeout: int | None = None
    ssh_config: Path | None = None
    filters: tuple[NbdkitFilter, ...] = field(default=())

    def nbdkit_command(self) -> NbdkitCommand:
        """ssh plugin invocation; the local ~/.ssh/config is ignored unless ``ssh_config`` is given."""
        _require(bool(self.host), "no SSH host given", "name the ESXi host")
        _require(
            self.path.startswith("/"), f"remote path {self.path!r} is not absolute", "use /vmfs/volumes/..."
        )
        _require(
            not self.verify_host or self.known_hosts is not None,
            "host key verification needs a known_hosts file",
            "give known_hosts with the ESXi host key (ssh-keyscan), or set verify_host=False knowingly",
        )
        params: list[tuple[str, str]] = [
            ("host", self.host),
            ("port", str(self.port)),
            ("user", self.user),
            ("path", self.path),
            ("config", str(self.ssh_config) if self.ssh_config else ""),
        ]
        if self.identity is not None:
            params.append(("identity", str(self.identity)))
        if self.known_hosts is not None:
            params.append(("known-hosts", str(self.known_hosts)))
        if not self.verify_host:
            params.append(("verify-remote-host", "false"))
        if self.timeout is not None:
            params.append(("timeout", str(self.timeout)))
        secrets = (("password", self.password),) if self.password is not None else ()
        return NbdkitCommand(
            plugin="ssh",
            params=tuple(params),
            secrets=secrets,
            filters=self.filters,
            description=f"ssh {self.user}@{self.host}:{self.path}",
        )
