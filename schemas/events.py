"""Payloads of every event in the migration flow, each bound to a versioned CloudEvents type.

Subjects are ``<prefix>.<vm-key>.<event>``; the event part and the type of each payload are
declared once here, in ``spec``, and listed in ``EVENT_TYPES``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from vmferry.schemas.base import EventPayload, EventSpec, NonEmpty, RequestId, VmKey
from vmferry.schemas.request import MigrationPlan, MigrationRequest

TYPE_PREFIX = "io.vmferry."
Bytes = Annotated[int, msgspec.Meta(ge=0)]
PassNo = Annotated[int, msgspec.Meta(ge=0)]


def _spec(event: str, version: int = 1) -> EventSpec:
    return EventSpec(ce_type=f"{TYPE_PREFIX}{event}.v{version}", subject_event=event)


# ---------------------------------------------------------------------------------------------
# Inventory parts carried by vm.discovered


class VmIdentity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Who the VM is on the source; ``instance_uuid`` is the stable key."""

    instance_uuid: NonEmpty
    bios_uuid: str | None = None
    moref: str | None = None
    name: str


class DiskInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One virtual disk as the source describes it."""

    key: int
    label: str = ""
    controller: str = ""
    bus_number: int = 0
    unit_number: int = 0
    capacity_bytes: Bytes
    backing_file: str = ""
    datastore: str = ""
    thin: bool = True
    disk_mode: str = "persistent"
    rdm: bool = False
    sharing: str = "sharingNone"
    cbt_enabled: bool = False


class NicInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One network adapter: its MAC is the identity kept on the destination port."""

    key: int
    mac: str
    adapter_type: str = ""
    network: str = ""
    distributed: bool = False
    ip_addresses: list[str] = []


class Finding(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A validation result: what is wrong, how bad, and how to fix it."""

    code: str
    severity: Literal["blocker", "warning"]
    message: str
    fix: str


class VmInventory(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What later steps need to know about the source VM; it travels with every VM-level event
    after discovery so each function stays a pure function of its input."""

    identity: VmIdentity
    cpus: Annotated[int, msgspec.Meta(ge=1)]
    memory_mib: Annotated[int, msgspec.Meta(ge=1)]
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    guest_id: str = ""
    guest_name: str = ""
    disks: list[DiskInfo] = []
    nics: list[NicInfo] = []

    def disk(self, key: int) -> DiskInfo:
        """The disk with this device key."""
        for disk in self.disks:
            if disk.key == key:
                return disk
        raise KeyError(f"VM {self.identity.name!r} has no disk with key {key}")


class SyncedVolume(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One disk's replica after a pass."""

    disk_key: int
    volume_id: NonEmpty
    change_id: str | None = None
    bytes_copied: Bytes = 0


# ---------------------------------------------------------------------------------------------
# Events


class MigrationRequested(EventPayload, frozen=True, kw_only=True):
    """Intake: a MigrationRequest published by the CLI, another system or the HTTP receiver."""

    spec: ClassVar[EventSpec] = _spec("migration.requested")
    request: MigrationRequest


class MigrationAccepted(EventPayload, frozen=True, kw_only=True):
    """Intake checked the request against this installation's configuration; discovery may start."""

    spec: ClassVar[EventSpec] = _spec("migration.accepted")
    request: MigrationRequest
    #: non-blocking remarks about the request (e.g. options that have no effect in this mode)
    warnings: list[str] = []


class VmDiscovered(EventPayload, frozen=True, kw_only=True):
    """The full inventory of one VM, read from vSphere and validated."""

    spec: ClassVar[EventSpec] = _spec("vm.discovered")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    identity: VmIdentity
    cpus: Annotated[int, msgspec.Meta(ge=1)]
    memory_mib: Annotated[int, msgspec.Meta(ge=1)]
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    guest_id: str = ""
    guest_name: str = ""
    tools_status: str = ""
    power_state: Literal["poweredOn", "poweredOff", "suspended"] = "poweredOff"
    host: str = ""
    cluster: str = ""
    disks: list[DiskInfo] = []
    nics: list[NicInfo] = []
    snapshots: list[str] = []
    findings: list[Finding] = []

    def inventory(self) -> VmInventory:
        """The part of the discovery later steps carry along."""
        return VmInventory(
            identity=self.identity,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            firmware=self.firmware,
            secure_boot=self.secure_boot,
            guest_id=self.guest_id,
            guest_name=self.guest_name,
            disks=self.disks,
            nics=self.nics,
        )


class DiskSnapshotReady(EventPayload, frozen=True, kw_only=True):
    """One disk of a VM is frozen in a snapshot (one snapshot covers all disks of a pass)."""

    spec: ClassVar[EventSpec] = _spec("disk.snapshot.ready")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    vm: VmInventory
    pass_no: PassNo
    final: bool = False
    vm_moref: str | None = None
    snapshot_moref: str | None = None
    disk: DiskInfo
    disk_count: Annotated[int, msgspec.Meta(ge=1)]
    #: changeId of the disk at this snapshot; None when CBT is off (full copy every pass). The
    #: changeId the replica holds is read from the replica itself, so a lost event cannot skew it.
    change_id: str | None = None


class VolumeSynced(EventPayload, frozen=True, kw_only=True):
    """One disk's data is durably on its destination volume for this pass."""

    spec: ClassVar[EventSpec] = _spec("volume.synced")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    vm: VmInventory
    pass_no: PassNo
    final: bool = False
    disk_key: int
    disk_count: Annotated[int, msgspec.Meta(ge=1)]
    volume_id: NonEmpty
    change_id: str | None = None
    bytes_copied: Bytes = 0
    bytes_total: Bytes = 0
    verified: bool = False


class VmSynced(EventPayload, frozen=True, kw_only=True):
    """Every disk of a VM is synced for one pass; the pass's snapshot has been released."""

    spec: ClassVar[EventSpec] = _spec("vm.synced")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    vm: VmInventory
    pass_no: PassNo
    final: bool = False
    #: one per disk, in the VM's disk order
    volumes: Annotated[list[SyncedVolume], msgspec.Meta(min_length=1)]


class CbtDeltaRequested(EventPayload, frozen=True, kw_only=True):
    """Ask for another precopy pass (changed blocks only) of a VM."""

    spec: ClassVar[EventSpec] = _spec("cbt.delta.requested")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    pass_no: PassNo
    reason: Literal["schedule", "manual", "cutover"] = "schedule"


class CutoverRequested(EventPayload, frozen=True, kw_only=True):
    """Stop the source and run the final pass, conversion and launch."""

    spec: ClassVar[EventSpec] = _spec("cutover.requested")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    requested_by: str | None = None


class GuestInspection(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """What conversion found inside the guest; the launch step boots it accordingly."""

    os_type: str = ""
    distro: str = ""
    version: str = ""
    product_name: str = ""
    firmware: Literal["bios", "efi"] = "bios"
    root_device: str = ""


class ConversionDone(EventPayload, frozen=True, kw_only=True):
    """All disks of the VM were converted to boot on KVM."""

    spec: ClassVar[EventSpec] = _spec("conversion.done")
    request_id: RequestId
    vm_key: VmKey
    plan: MigrationPlan
    vm: VmInventory
    #: the final pass the converted volumes come from (= how many passes the migration took)
    pass_no: PassNo = 0
    #: the converted volumes, in the VM's disk order (root first as the guest sees it)
    volume_ids: list[NonEmpty]
    inspection: GuestInspection
    log_ref: str | None = None


class InstanceCreated(EventPayload, frozen=True, kw_only=True):
    """The destination instance exists and reached ACTIVE."""

    spec: ClassVar[EventSpec] = _spec("instance.created")
    request_id: RequestId
    vm_key: VmKey
    server_id: NonEmpty
    flavor_id: str = ""
    port_ids: list[str] = []
    volume_ids: list[str] = []


class MigrationCompleted(EventPayload, frozen=True, kw_only=True):
    """The VM runs on the destination; nothing more will happen for it."""

    spec: ClassVar[EventSpec] = _spec("migration.completed")
    request_id: RequestId
    vm_key: VmKey
    server_id: str | None = None
    passes: PassNo = 0


class MigrationFailed(EventPayload, frozen=True, kw_only=True):
    """A step failed: where, why in words a human can act on, and whether retrying can help."""

    spec: ClassVar[EventSpec] = _spec("migration.failed")
    request_id: str = ""
    vm_key: VmKey
    step: NonEmpty
    cause: NonEmpty
    fix: str = ""
    retryable: bool = False
    #: the event the failing step consumed, so `vmferry replay` can re-drive it
    failed_event_id: str | None = None
    failed_event_type: str | None = None
    failed_subject: str | None = None
    failed_stream_seq: int | None = None
    deliveries: int = 1
    dead_letter_seq: int | None = None


#: Every event payload type, in flow order.
EVENT_TYPES: tuple[type[EventPayload], ...] = (
    MigrationRequested,
    MigrationAccepted,
    VmDiscovered,
    DiskSnapshotReady,
    VolumeSynced,
    VmSynced,
    CbtDeltaRequested,
    CutoverRequested,
    ConversionDone,
    InstanceCreated,
    MigrationCompleted,
    MigrationFailed,
)

BY_CE_TYPE: dict[str, type[EventPayload]] = {t.spec.ce_type: t for t in EVENT_TYPES}
BY_SUBJECT_EVENT: dict[str, type[EventPayload]] = {t.spec.subject_event: t for t in EVENT_TYPES}
