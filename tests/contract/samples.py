"""One realistic, valid instance of every contract type, built from the structs themselves."""

from __future__ import annotations

from datetime import UTC, datetime

from vmferry.schemas.base import EventPayload, request_key_for, vm_key_for
from vmferry.schemas.events import (
    CbtDeltaRequested,
    ConversionDone,
    CutoverRequested,
    DiskInfo,
    DiskSnapshotReady,
    Finding,
    GuestInspection,
    InstanceCreated,
    MigrationAccepted,
    MigrationCompleted,
    MigrationFailed,
    MigrationRequested,
    NicInfo,
    SyncedVolume,
    VmDiscovered,
    VmIdentity,
    VmInventory,
    VmSynced,
    VolumeSynced,
)
from vmferry.schemas.request import (
    CutoverPolicy,
    DestinationRef,
    Mappings,
    MigrationOptions,
    MigrationPlan,
    MigrationRequest,
    NetworkTarget,
    SourceRef,
    VmSelector,
)
from vmferry.schemas.state import DiskProgress, FailureRecord, StepRecord, VmState

INSTANCE_UUID = "4207aa1c-2b3d-4e5f-6071-8293a4b5c6d7"
VM_KEY = vm_key_for(INSTANCE_UUID)
REQUEST_ID = "nightly-42"
REQUEST_KEY = request_key_for(REQUEST_ID)
AT = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)

REQUEST = MigrationRequest(
    request_id=REQUEST_ID,
    source=SourceRef(name="vc-lab", datacenter="DC0"),
    destination=DestinationRef(cloud="lab", project="migrated", region="RegionOne"),
    vms=[VmSelector(name="web 01"), VmSelector(instance_uuid=INSTANCE_UUID)],
    mode="warm",
    mappings=Mappings(
        networks={"VM Network": NetworkTarget(network="private", subnet="private-v4")},
        volume_types={"datastore1": "ssd"},
    ),
    cutover=CutoverPolicy(when="scheduled", at=AT),
    options=MigrationOptions(security_groups=["default"], max_parallel_disks=2),
    labels={"team": "platform"},
    requested_by="ops@example.org",
)

DISK = DiskInfo(
    key=2000,
    label="Hard disk 1",
    controller="lsilogic",
    capacity_bytes=10 * 2**30,
    backing_file="[datastore1] web01/web01.vmdk",
    datastore="datastore1",
    cbt_enabled=True,
)

PLAN = MigrationPlan.of(REQUEST)
INVENTORY = VmInventory(
    identity=VmIdentity(instance_uuid=INSTANCE_UUID, moref="vm-42", name="web 01"),
    cpus=2,
    memory_mib=4096,
    firmware="efi",
    guest_id="debian12_64Guest",
    disks=[DISK],
    nics=[NicInfo(key=4000, mac="00:50:56:aa:bb:cc", network="VM Network", ip_addresses=["10.0.0.5"])],
)

EVENTS: dict[type[EventPayload], EventPayload] = {
    MigrationRequested: MigrationRequested(request=REQUEST),
    MigrationAccepted: MigrationAccepted(request=REQUEST, warnings=["VM selectors repeated"]),
    VmDiscovered: VmDiscovered(
        request_id=REQUEST_ID,
        vm_key=VM_KEY,
        plan=PLAN,
        identity=VmIdentity(instance_uuid=INSTANCE_UUID, moref="vm-42", name="web 01"),
        cpus=2,
        memory_mib=4096,
        firmware="efi",
        power_state="poweredOn",
        disks=[DISK],
        nics=[NicInfo(key=4000, mac="00:50:56:aa:bb:cc", network="VM Network", ip_addresses=["10.0.0.5"])],
        findings=[Finding(code="tools-old", severity="warning", message="tools are old", fix="upgrade")],
    ),
    DiskSnapshotReady: DiskSnapshotReady(
        request_id=REQUEST_ID,
        vm_key=VM_KEY,
        plan=PLAN,
        vm=INVENTORY,
        pass_no=1,
        snapshot_moref="snapshot-7",
        disk=DISK,
        disk_count=1,
        change_id="52 d4 6a 7c/12",
    ),
    VolumeSynced: VolumeSynced(
        request_id=REQUEST_ID,
        vm_key=VM_KEY,
        plan=PLAN,
        vm=INVENTORY,
        pass_no=1,
        disk_key=2000,
        disk_count=1,
        volume_id="0b1e7c3a-volume",
        change_id="52 d4 6a 7c/12",
        bytes_copied=1 << 20,
        bytes_total=10 * 2**30,
        verified=True,
    ),
    VmSynced: VmSynced(
        request_id=REQUEST_ID,
        vm_key=VM_KEY,
        plan=PLAN,
        vm=INVENTORY,
        pass_no=2,
        final=True,
        volumes=[SyncedVolume(disk_key=2000, volume_id="0b1e7c3a-volume", change_id="52 d4 6a 7c/12")],
    ),
    CbtDeltaRequested: CbtDeltaRequested(
        request_id=REQUEST_ID, vm_key=VM_KEY, plan=PLAN, pass_no=2, reason="manual"
    ),
    CutoverRequested: CutoverRequested(request_id=REQUEST_ID, vm_key=VM_KEY, plan=PLAN, requested_by="ops"),
    ConversionDone: ConversionDone(
        request_id=REQUEST_ID,
        vm_key=VM_KEY,
        plan=PLAN,
        vm=INVENTORY,
        pass_no=2,
        volume_ids=["0b1e7c3a-volume"],
        inspection=GuestInspection(os_type="linux", distro="debian", version="12", root_device="/dev/vda1"),
    ),
    InstanceCreated: InstanceCreated(
        request_id=REQUEST_ID, vm_key=VM_KEY, server_id="srv-1", port_ids=["p-1"], volume_ids=["v-1"]
    ),
    MigrationCompleted: MigrationCompleted(request_id=REQUEST_ID, vm_key=VM_KEY, server_id="srv-1", passes=3),
    MigrationFailed: MigrationFailed(
        request_id=REQUEST_ID,
        vm_key=VM_KEY,
        step="transfer",
        cause="the datastore is unreachable",
        fix="check the ESXi host's network",
        retryable=True,
        failed_event_id="e-1",
        failed_event_type=DiskSnapshotReady.spec.ce_type,
        failed_subject=f"ferry.{VM_KEY}.disk.snapshot.ready",
        failed_stream_seq=17,
        deliveries=5,
    ),
}

STATE = VmState(
    key=VM_KEY,
    request_id=REQUEST_ID,
    name="web 01",
    phase="failed",
    pass_no=1,
    steps={
        "transfer": StepRecord(
            status="failed", event_id="e-1", event_type=DiskSnapshotReady.spec.ce_type, stream_seq=17, at=AT
        )
    },
    disks={"2000": DiskProgress(pass_no=1, bytes_done=1 << 20, bytes_total=10 * 2**30, eta_s=12.5)},
    failure=FailureRecord(
        step="transfer",
        cause="the datastore is unreachable",
        fix="check the ESXi host's network",
        retryable=True,
        failed_event_id="e-1",
        failed_subject=f"ferry.{VM_KEY}.disk.snapshot.ready",
        failed_stream_seq=17,
        at=AT,
    ),
    last_event_type=MigrationFailed.spec.ce_type,
    last_event_seq=18,
    updated_at=AT,
)
