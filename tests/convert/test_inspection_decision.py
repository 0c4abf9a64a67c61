"""The pre-flight inspection's decisions that need neither OpenStack nor libguestfs: which vm.synced
events start one, that a redelivery after a recorded success (or a cancelled migration, or a cutover
that began first) does not inspect, and how its failures read (real nats-server for the VM's state)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.convert.conftest import Step, inventory
from vmferry.adapters.conversion import ConversionError, FailureKind, HostConfig
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.bus.handles import BusHandle
from vmferry.functions.convert import Convert
from vmferry.functions.convert_support import with_progress
from vmferry.functions.inspection import STEP, inspection_failure, wants_inspection
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.events import CutoverRequested, DiskInfo, SyncedVolume, VmSynced
from vmferry.schemas.request import (
    ConversionMode,
    DestinationRef,
    MigrationOptions,
    MigrationPlan,
    Mode,
    SourceRef,
)
from vmferry.schemas.state import Cancellation, SourcePower, StepProgress, VmState


class ReachedCloud(Exception):
    """The handler went on to inspect (it asked for the destination cloud)."""


async def to_the_cloud(destination: DestinationRef) -> OpenStackAdapter:
    raise ReachedCloud(destination.cloud)


def handler(bus: BusHandle, work_root: Path) -> Convert:
    return Convert(
        adapters=to_the_cloud,
        bus=bus,
        host=HostConfig(appliance_cache=work_root / "appliance"),
        work_root=work_root,
        conversion_host=lambda _plan: "host-1",
    )


def synced(
    mode: Mode = "warm",
    pass_no: int = 1,
    final: bool = False,
    conversion: ConversionMode = "clone",
    inspect: bool = True,
    at: datetime | None = None,
) -> CloudEvent[VmSynced]:
    instance = str(uuid.uuid4())
    data = VmSynced(
        request_id="req-inspect",
        vm_key=vm_key_for(instance),
        plan=MigrationPlan(
            source=SourceRef(name="vc"),
            destination=DestinationRef(cloud="dest"),
            mode=mode,
            options=MigrationOptions(conversion=conversion, inspect_before_cutover=inspect),
        ),
        vm=inventory(instance, [DiskInfo(key=2000, capacity_bytes=1 << 30)]),
        pass_no=pass_no,
        final=final,
        volumes=[SyncedVolume(disk_key=2000, volume_id="vol-root")],
    )
    return CloudEvent(
        id=uuid.uuid4().hex,
        type=VmSynced.spec.ce_type,
        source="test",
        subject=data.vm_key,
        data=data,
        time=at or datetime.now(UTC),
    )


@pytest.mark.parametrize(
    ("event", "wanted"),
    [
        ({}, True),
        ({"conversion": "in-place"}, True),
        ({"conversion": "skip"}, False),
        ({"mode": "cold"}, False),
        ({"pass_no": 2}, False),
        ({"final": True}, False),
        ({"inspect": False}, False),
    ],
    ids=["warm-pass-1", "in-place", "skip", "cold", "pass-2", "final", "opted-out"],
)
def test_only_the_first_precopy_pass_of_a_warm_migration_is_inspected(
    event: dict[str, Any], wanted: bool
) -> None:
    assert wants_inspection(synced(**event).data) is wanted


@pytest.mark.parametrize(
    "event",
    [{"conversion": "skip"}, {"mode": "cold"}, {"pass_no": 2}, {"inspect": False}],
    ids=["skip", "cold", "pass-2", "opted-out"],
)
async def test_other_precopy_passes_emit_nothing_and_touch_nothing(
    bus: BusHandle, work_root: Path, event: dict[str, Any]
) -> None:
    step = Step()
    assert await handler(bus, work_root)(synced(**event), step) == []
    assert step.beats == 0


async def test_the_first_warm_pass_goes_on_to_inspect(bus: BusHandle, work_root: Path) -> None:
    with pytest.raises(ReachedCloud, match="dest"):
        await handler(bus, work_root)(synced(), Step())


async def record(bus: BusHandle, vm_key: str, progress: StepProgress) -> None:
    await bus.state.update(vm_key, with_progress(vm_key, "req-inspect", progress, STEP))


async def test_a_redelivery_after_success_does_not_inspect_again(bus: BusHandle, work_root: Path) -> None:
    event = synced()
    done = StepProgress(percent=100.0, detail="debian 12.5, root /dev/sda1", at=datetime.now(UTC))
    await record(bus, event.data.vm_key, done)

    emits = await handler(bus, work_root)(event, Step(delivery=2))
    # nothing is inspected again; the cutover policy (immediate by default) applies as after success
    assert [type(e.data) for e in emits] == [CutoverRequested]

    state, _ = await bus.state.get(event.data.vm_key)
    assert state is not None
    assert state.progress[STEP] == done, "the record stays as it was"


async def test_a_success_recorded_before_the_event_is_not_this_events(
    bus: BusHandle, work_root: Path
) -> None:
    """An earlier request of the same VM was inspected; this request's first pass is inspected again."""
    event = synced()
    earlier = StepProgress(percent=100.0, detail="debian 12.5", at=event.time - timedelta(days=3))
    await record(bus, event.data.vm_key, earlier)
    with pytest.raises(ReachedCloud):
        await handler(bus, work_root)(event, Step())


async def test_a_skipped_or_unfinished_inspection_is_tried_again(bus: BusHandle, work_root: Path) -> None:
    event = synced()
    skipped = StepProgress(percent=0.0, detail="skipped: replica busy", at=datetime.now(UTC))
    await record(bus, event.data.vm_key, skipped)
    with pytest.raises(ReachedCloud):
        await handler(bus, work_root)(event, Step(delivery=2))


async def test_a_cancelled_migration_is_not_inspected(bus: BusHandle, work_root: Path) -> None:
    event = synced()
    cancelled = VmState(
        key=event.data.vm_key,
        request_id="req-inspect",
        cancelled=Cancellation(request_id="req-inspect", at=datetime.now(UTC)),
    )
    await bus.state.update(event.data.vm_key, lambda _state: cancelled)
    assert await handler(bus, work_root)(event, Step()) == []


async def test_no_inspection_once_cutover_powered_the_source_off(bus: BusHandle, work_root: Path) -> None:
    event = synced()
    power = SourcePower(source="vc", instance_uuid="x", powered_off_at=datetime.now(UTC))
    await bus.state.update(
        event.data.vm_key, lambda _state: VmState(key=event.data.vm_key, source_power=power)
    )
    assert await handler(bus, work_root)(event, Step()) == []

    # A power-off of an earlier request (before this event) does not count.
    old = msgspec.structs.replace(power, powered_off_at=event.time - timedelta(hours=1))
    await bus.state.update(event.data.vm_key, lambda _state: VmState(key=event.data.vm_key, source_power=old))
    with pytest.raises(ReachedCloud):
        await handler(bus, work_root)(event, Step())


def test_a_finding_says_it_was_found_before_cutover_with_the_lines_the_hint_and_the_log() -> None:
    event = synced()
    error = ConversionError(
        FailureKind.ENCRYPTED_DISK,
        "virt-v2v-inspector failed (encrypted-disk): virt-v2v-inspector: error: inspection could not detect",
        hint="the guest has LUKS-encrypted volumes: supply their passphrases as key files",
        decisive_lines=(
            "virt-v2v-inspector: error: inspection could not detect",
            "No root device found in this operating system image.",
        ),
        log_path=Path("/tmp/x/preflight.log"),
    )
    failure = inspection_failure(event.data, error, "nats-object://t_logs/vm-1/inspect-a.log")
    assert isinstance(failure, PermanentError)
    assert "BEFORE cutover, while the source VM still runs" in failure.cause
    assert "(encrypted-disk)" in failure.cause
    assert "No root device found in this operating system image." in failure.cause
    assert failure.cause.count("inspection could not detect") == 1
    assert failure.cause.endswith("full log: nats-object://t_logs/vm-1/inspect-a.log")
    assert failure.fix.startswith("the guest has LUKS-encrypted volumes")
    assert "source VM runs on" in failure.fix

    appliance = ConversionError(FailureKind.APPLIANCE_FAILED, "guestfs_launch failed", retryable=True)
    retried = inspection_failure(event.data, appliance, None)
    assert isinstance(retried, RetryableError)
    assert "could not finish (appliance-failed)" in retried.cause
    assert retried.cause.endswith("no tool ran")
