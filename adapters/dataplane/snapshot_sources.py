"""From "this disk of this snapshot" to a ``DiskSource``: which file the snapshot froze, and how each
transport (``vddk``, ``https``, ``local``, ``ssh``) reads it.

Which file holds the frozen data: a snapshot's own configuration names, per disk, the file that was
current when it was taken. When the pass snapshot is the VM's oldest, that is the base disk
(``[ds] vm/vm.vmdk``), which stays frozen for as long as the snapshot exists (the VM writes to a
delta ``vm-000001.vmdk``); its bytes are in the flat extent ``vm-flat.vmdk``, which ``https``,
``ssh`` and ``local`` read as a raw image. When older snapshots exist, the snapshot names a delta
file instead: only VDDK (which reads through the chain) and ``local`` (qemu follows the chain's
descriptors) can read that; ``https`` and ``ssh`` refuse rather than copy the stale base.
vcsim-ferry has no delta disks: its snapshots always name the base disk, whose ``-flat.vmdk`` holds
the disk's bytes (its descriptors are empty files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from vmferry.adapters.dataplane.nbdkit import NbdkitFilter
from vmferry.adapters.dataplane.sources import (
    HttpsSource,
    LocalSource,
    SourceConfigError,
    SshSource,
    VddkSource,
    datastore_folder_url,
)

if TYPE_CHECKING:  # the bus module pulls in nats; the data plane only needs the type
    from vmferry.bus.connection import Secret

_BACKING = re.compile(r"^\[(?P<datastore>[^\]]+)\]\s*(?P<path>\S.*)$")
_DELTA = re.compile(r"^(?P<base>.+)-(?P<sequence>[0-9]{6})\.vmdk$")
#: where ESXi mounts datastores (ssh transport)
ESXI_DATASTORES = "/vmfs/volumes"


@dataclass(frozen=True)
class DatastoreFile:
    """A file on a datastore: ``[datastore] folder/name.vmdk``."""

    datastore: str
    path: str

    @classmethod
    def parse(cls, backing_file: str) -> DatastoreFile:
        """Parse a disk backing's ``fileName`` as vSphere shows it."""
        match = _BACKING.match(backing_file.strip())
        if match is None:
            raise SourceConfigError(
                f"disk file {backing_file!r} is not a datastore path",
                "a disk backing looks like '[datastore] folder/disk.vmdk'; check the snapshot event",
            )
        path = PurePosixPath(match.group("path"))
        if path.is_absolute() or ".." in path.parts or path.suffix != ".vmdk":
            raise SourceConfigError(
                f"disk file {backing_file!r} is not a .vmdk below its datastore",
                "check the snapshot event: the disk backing must name a .vmdk file on a datastore",
            )
        return cls(match.group("datastore"), str(path))

    @property
    def is_delta(self) -> bool:
        """True for a snapshot delta (``name-000001.vmdk``): it holds changes, not the disk."""
        return _DELTA.match(self.path) is not None

    def flat(self) -> DatastoreFile:
        """The flat extent of a base disk: ``vm/vm.vmdk`` -> ``vm/vm-flat.vmdk``."""
        return DatastoreFile(self.datastore, self.path.removesuffix(".vmdk") + "-flat.vmdk")

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


@dataclass(frozen=True)
class FrozenDisk:
    """One disk of one VM as a snapshot froze it (or as it is, when there is no snapshot)."""

    vm_moref: str
    snapshot_moref: str | None
    file: DatastoreFile
    capacity_bytes: int

    def raw_file(self, transport: str) -> DatastoreFile:
        """The flat file holding the frozen bytes, for transports that read raw files."""
        if self.file.is_delta:
            raise SourceConfigError(
                f"snapshot {self.snapshot_moref} of {self.vm_moref} froze {self.file}, a delta file (the VM"
                f" has older snapshots): the {transport} transport reads flat files only, and the base"
                " disk under the delta is stale",
                "remove the VM's other snapshots (`vmferry snapshots sweep` for stale vmferry ones), or use"
                " the vddk transport",
            )
        return self.file.flat()


@dataclass(frozen=True)
class HttpsAccess:
    """How to reach a datastore over the vCenter/ESXi ``/folder`` URL with an existing session."""

    host: str  # host or host:port of vCenter/ESXi
    datacenter_path: str
    cookie: Secret | None
    cainfo: Path | None = None
    verify_tls: bool = True
    timeout: int | None = None


@dataclass(frozen=True)
class VddkSettings:
    """The VDDK part of a source's configuration (server, user and password come from the source)."""

    libdir: Path
    #: SHA-1 fingerprint of the endpoint's certificate, ``xx:xx:...``; default: the source's thumbprint
    thumbprint: str | None = None
    transports: tuple[str, ...] = ("file", "nbdssl", "nbd")
    compression: str | None = "fastlz"
    config: Path | None = None


@dataclass(frozen=True)
class VddkLogin:
    """The vSphere login VDDK uses, from the source's settings."""

    server: str
    user: str
    password: Secret
    thumbprint: str
    port: int | None = None


@dataclass(frozen=True)
class SshSettings:
    """How to reach the ESXi host holding a source's datastores over SSH (SFTP)."""

    host: str
    user: str = "root"
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None
    verify_host: bool = True
    password: Secret | None = None
    timeout: int | None = None
    datastores_root: str = ESXI_DATASTORES


@dataclass(frozen=True)
class TransportSettings:
    """What one configured source needs beyond its vSphere login, per transport."""

    vddk: VddkSettings | None = None
    ssh: SshSettings | None = None
    https_timeout: int | None = None
    #: extra nbdkit filters around every source of this endpoint (e.g. ``rate``, ``retry``)
    filters: tuple[NbdkitFilter, ...] = ()


def https_source(
    disk: FrozenDisk, access: HttpsAccess, filters: tuple[NbdkitFilter, ...] = ()
) -> HttpsSource:
    """The frozen flat file over HTTPS, logged in with the session cookie (passed by descriptor)."""
    raw = disk.raw_file("https")
    return HttpsSource(
        url=datastore_folder_url(access.host, access.datacenter_path, raw.datastore, raw.path),
        cookie=access.cookie,
        cainfo=access.cainfo,
        verify_tls=access.verify_tls,
        timeout=access.timeout,
        filters=filters,
    )


def local_mount(template: str, datastore: str) -> Path:
    """Where a datastore is mounted here: ``local_disk_path``, with ``{datastore}`` replaced."""
    mount = Path(template.replace("{datastore}", datastore))
    if not mount.is_absolute():
        raise SourceConfigError(
            f"options.local_disk_path {template!r} is not an absolute path",
            "give the mount point of the NFS datastore on the conversion host, e.g. /mnt/ds1 or"
            " /mnt/{datastore}",
        )
    return mount


def local_source(disk: FrozenDisk, template: str, filters: tuple[NbdkitFilter, ...] = ()) -> LocalSource:
    """The disk from a datastore mounted here: its flat file when it has one, else the descriptor
    (sparse disks, and delta chains, which qemu-nbd follows)."""
    mount = local_mount(template, disk.file.datastore)
    if not disk.file.is_delta:
        flat = mount / disk.file.flat().path
        if flat.is_file():
            return LocalSource(flat, format="raw", filters=filters)
    return LocalSource(mount / disk.file.path, filters=filters)


def ssh_source(disk: FrozenDisk, settings: SshSettings, filters: tuple[NbdkitFilter, ...] = ()) -> SshSource:
    """The frozen flat file read over SFTP from the ESXi host."""
    raw = disk.raw_file("ssh")
    return SshSource(
        host=settings.host,
        path=f"{settings.datastores_root.rstrip('/')}/{raw.datastore}/{raw.path}",
        user=settings.user,
        port=settings.port,
        identity=settings.identity,
        known_hosts=settings.known_hosts,
        verify_host=settings.verify_host,
        password=settings.password,
        timeout=settings.timeout,
        filters=filters,
    )


def vddk_source(
    disk: FrozenDisk, settings: VddkSettings, login: VddkLogin, filters: tuple[NbdkitFilter, ...] = ()
) -> VddkSource:
    """The snapshot's disk through VDDK (reads through delta chains)."""
    if disk.snapshot_moref is None:
        raise SourceConfigError(
            f"the vddk transport reads disks of snapshots, and no snapshot of {disk.vm_moref} is given",
            "let the snapshot step take the pass snapshot (it always does for vddk)",
        )
    return VddkSource(
        libdir=settings.libdir,
        server=login.server,
        user=login.user,
        password=login.password,
        thumbprint=login.thumbprint,
        vm_moref=disk.vm_moref,
        snapshot_moref=disk.snapshot_moref,
        file=str(disk.file),
        transports=settings.transports,
        compression=settings.compression,
        port=login.port,
        config=settings.config,
        filters=(*filters, *VddkSource.filters),
    )


def colon_thumbprint(value: str) -> str:
    """A hex certificate fingerprint in VDDK's form: upper-case pairs joined by colons."""
    cleaned = value.replace(":", "").replace(" ", "").upper()
    return ":".join(cleaned[i : i + 2] for i in range(0, len(cleaned), 2))
