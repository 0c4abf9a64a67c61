"""What the transfer reads from a volume's metadata, and how it writes a disk's progress (pure parts)."""

from __future__ import annotations

from vmferry.functions.transfer import VolumeRecord, definition, disk_progress
from vmferry.schemas.events import DiskInfo, DiskSnapshotReady, VmIdentity, VmInventory
from vmferry.schemas.request import DestinationRef, MigrationPlan, SourceRef
from vmferry.schemas.state import DiskProgress, VmState

VM_KEY = "vm-0123456789abcdef0123456789abcdef"
DISK = DiskInfo(key=2000, capacity_bytes=1 << 20, backing_file="[ds1] vm/vm.vmdk")


def ready(
    pass_no: int = 2, change_id: str | None = "52 aa/2", request_id: str = "req-1"
) -> DiskSnapshotReady:
    return DiskSnapshotReady(
        request_id=request_id,
        vm_key=VM_KEY,
        plan=MigrationPlan(source=SourceRef(name="lab"), destination=DestinationRef(cloud="c")),
        vm=VmInventory(
            identity=VmIdentity(instance_uuid="u", name="web"), cpus=1, memory_mib=512, disks=[DISK]
        ),
        pass_no=pass_no,
        disk=DISK,
        disk_count=1,
        change_id=change_id,
    )


def test_the_volume_record_tells_a_redelivery_from_a_new_or_stale_pass() -> None:
    recorded = VolumeRecord.of(
        {"vmferry_change_id": "52 aa/2", "vmferry_pass": "2", "vmferry_request": "req-1"}
    )
    assert recorded.holds(ready())
    assert not recorded.holds(ready(change_id="52 aa/3"))  # the pass was taken again
    assert not recorded.holds(ready(request_id="req-2"))  # passes restart with every request
    assert recorded.is_newer_than(ready(pass_no=1)) and not recorded.is_newer_than(ready(pass_no=3))
    assert not recorded.is_newer_than(ready(pass_no=1, request_id="req-2"))
    without_cbt = VolumeRecord.of({"vmferry_change_id": "", "vmferry_pass": "1", "vmferry_request": "req-1"})
    assert without_cbt.holds(ready(pass_no=1, change_id=None))
    assert VolumeRecord.of({"vmferry_pass": "two"}) == VolumeRecord(None, 0, None)
    assert VolumeRecord.of(None) == VolumeRecord(None, 0, None)


def test_progress_never_overwrites_a_later_pass() -> None:
    later = VmState(key=VM_KEY, disks={"2000": DiskProgress(pass_no=3, bytes_done=7)})
    assert disk_progress(ready(pass_no=2), DiskProgress(pass_no=2, bytes_done=1))(later) == later
    fresh = disk_progress(ready(), DiskProgress(pass_no=2, bytes_done=5))(None)
    assert fresh is not None and fresh.request_id == "req-1" and fresh.disks["2000"].bytes_done == 5


def test_the_function_definition() -> None:
    function = definition(object())  # type: ignore[arg-type]
    assert (function.name, function.concurrency, function.ack_wait) == ("transfer", 4, 60.0)
    assert function.consumes is DiskSnapshotReady and function.heartbeat_interval == 20.0
    assert definition(object(), concurrency=2).concurrency == 2  # type: ignore[arg-type]
