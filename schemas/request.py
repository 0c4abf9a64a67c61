"""The MigrationRequest: the public input other systems send to start migrations.

A request names configured references (source credentials, destination cloud), never secrets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from vmferry.schemas.base import Contract, NonEmpty, RefName, RequestId

Mode = Literal["cold", "warm"]
Transport = Literal["vddk", "https", "local", "ssh"]
FlavorPolicy = Literal["closest", "create", "explicit"]
ConversionMode = Literal["clone", "in-place", "skip"]
DiskBus = Literal["virtio-blk", "virtio-scsi"]

Seconds = Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)]
PositiveSeconds = Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)]


class SourceRef(Contract, frozen=True, kw_only=True):
    """Which configured vSphere endpoint to read from; its credentials stay in configuration."""

    name: RefName
    datacenter: NonEmpty | None = None


class DestinationRef(Contract, frozen=True, kw_only=True):
    """Which configured OpenStack cloud (clouds.yaml entry) receives the VMs."""

    cloud: RefName
    project: NonEmpty | None = None
    region: NonEmpty | None = None


class VmSelector(Contract, frozen=True, kw_only=True):
    """Selects VMs by exactly one of name, folder, managed-object reference or instanceUuid."""

    name: NonEmpty | None = None
    folder: NonEmpty | None = None
    #: vCenter morefs look like vm-42; a standalone ESXi host numbers its VMs: 42
    moref: Annotated[str, msgspec.Meta(pattern=r"^(vm-)?[0-9]+$")] | None = None
    instance_uuid: (
        Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")] | None
    ) = None

    def __post_init__(self) -> None:
        given = [f for f in ("name", "folder", "moref", "instance_uuid") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(
                "a VM selector takes exactly one of name, folder, moref or instance_uuid"
                f" (got {', '.join(given) or 'none'})"
            )

    def describe(self) -> str:
        """Return a human label such as ``name='web 01'``."""
        for field in ("name", "folder", "moref", "instance_uuid"):
            value = getattr(self, field)
            if value:
                return f"{field}={value!r}"
        return "empty selector"


class NetworkTarget(Contract, frozen=True, kw_only=True):
    """Where a source portgroup lands: a Neutron network and optionally a subnet."""

    network: NonEmpty
    subnet: NonEmpty | None = None


class Mappings(Contract, frozen=True, kw_only=True):
    """Source-to-destination mappings: networks, flavors and volume types."""

    #: source portgroup or distributed portgroup name -> destination network
    networks: dict[str, NetworkTarget] = {}
    #: used for NICs whose portgroup is not in ``networks``; None makes such NICs an error
    default_network: NetworkTarget | None = None
    #: VM name -> flavor name or id (used with flavor_policy "explicit", and as overrides)
    flavors: dict[str, NonEmpty] = {}
    #: source datastore name -> Cinder volume type
    volume_types: dict[str, NonEmpty] = {}
    default_volume_type: NonEmpty | None = None
    availability_zone: NonEmpty | None = None


class CutoverPolicy(Contract, frozen=True, kw_only=True):
    """When and how the source is stopped and the final sync is done (warm migrations)."""

    #: immediate: right after the first full pass; manual: on `vmferry cutover`; scheduled: at ``at``
    when: Literal["immediate", "manual", "scheduled"] = "immediate"
    at: datetime | None = None
    #: seconds between precopy passes while waiting for cutover
    precopy_interval_s: PositiveSeconds = 3600
    #: graceful guest shutdown gets this long before a hard power-off
    shutdown_timeout_s: Seconds = 300
    #: power the source back on when a later step fails after vmferry powered it off
    power_on_source_on_failure: bool = True

    def __post_init__(self) -> None:
        if self.when == "scheduled" and self.at is None:
            raise ValueError("cutover.when = 'scheduled' needs cutover.at (an ISO 8601 time)")
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("cutover.at must carry a time zone, e.g. 2026-12-01T22:00:00Z")


class MigrationOptions(Contract, frozen=True, kw_only=True):
    """Behaviour switches; they mirror what operators of the reference kit set as variables."""

    enable_cbt: bool = True
    transport: Transport = "vddk"
    #: mount point of an NFS datastore on the conversion host (transport "local")
    local_disk_path: NonEmpty | None = None
    conversion_host: NonEmpty | None = None
    conversion: ConversionMode = "clone"
    #: warm migrations: inspect the guest (virt-v2v-inspector on clones of the first pass) while
    #: the source still runs, so "no root device", LUKS or unsupported filesystems show before cutover
    inspect_before_cutover: bool = True
    disk_bus: DiskBus = "virtio-blk"
    flavor_policy: FlavorPolicy = "closest"
    create_ports: bool = True
    preserve_mac: bool = True
    preserve_ip: bool = False
    security_groups: list[NonEmpty] = []
    key_name: NonEmpty | None = None
    boot_from_volume: bool = True
    upload_to_glance: bool = False
    verify_copies: bool = True
    quiesce_snapshots: bool = False
    teardown_on_failure: bool = False
    max_parallel_disks: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    debug: bool = False


class MigrationRequest(Contract, frozen=True, kw_only=True):
    """A request to migrate one or more VMs from one source to one destination."""

    request_id: RequestId
    source: SourceRef
    destination: DestinationRef
    vms: Annotated[list[VmSelector], msgspec.Meta(min_length=1, max_length=10000)]
    mode: Mode = "cold"
    mappings: Mappings = Mappings()
    cutover: CutoverPolicy = CutoverPolicy()
    options: MigrationOptions = MigrationOptions()
    labels: dict[
        Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=256)]
    ] = {}
    requested_by: NonEmpty | None = None

    def __post_init__(self) -> None:
        if self.options.transport == "local" and not self.options.local_disk_path:
            raise ValueError("options.transport = 'local' needs options.local_disk_path")
        if self.options.transport == "local" and self.mode == "warm":
            raise ValueError("a warm migration needs changed block tracking; transport 'local' is cold only")
        if self.options.flavor_policy == "explicit":
            named = {s.name for s in self.vms if s.name}
            missing = sorted(named - set(self.mappings.flavors))
            if missing or any(not s.name for s in self.vms):
                raise ValueError(
                    "flavor_policy 'explicit' needs mappings.flavors for every VM, selected by name;"
                    f" missing: {', '.join(missing) or 'VMs selected by folder, moref or uuid'}"
                )


class MigrationPlan(Contract, frozen=True, kw_only=True):
    """What every step of one VM's migration needs from its request: all of it but the VM list.

    VM-level events carry it, so each function is a pure function of its input event.
    """

    source: SourceRef
    destination: DestinationRef
    mode: Mode = "cold"
    mappings: Mappings = Mappings()
    cutover: CutoverPolicy = CutoverPolicy()
    options: MigrationOptions = MigrationOptions()

    @classmethod
    def of(cls, request: MigrationRequest) -> MigrationPlan:
        """The plan of a request."""
        return cls(
            source=request.source,
            destination=request.destination,
            mode=request.mode,
            mappings=request.mappings,
            cutover=request.cutover,
            options=request.options,
        )
