"""The convert function's decisions that need neither OpenStack nor libguestfs: which passes it acts on,
"skip" mode, refusing bad guest facts before anything is cloned, how a conversion failure reads, and the
throttled progress written to the VM's state (real nats-server)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from tests.convert.conftest import Step, inventory
from vmferry.adapters.conversion import ConversionError, FailureKind, HostConfig
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.bus.handles import BusHandle
from vmferry.functions.convert import Convert, definition
from vmferry.functions.convert_support import ProgressReporter, conversion_failure
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.events import (
    ConversionDone,
    CutoverRequested,
    DiskInfo,
    GuestInspection,
    SyncedVolume,
    VmSynced,
)
from vmferry.schemas.request import (
    ConversionMode,
    DestinationRef,
    MigrationOptions,
    MigrationPlan,
    SourceRef,
)


async def no_cloud(destination: DestinationRef) -> OpenStackAdapter:
    raise AssertionError(f"the handler must not reach OpenStack ({destination.cloud})")


def offline_handler(work_root: Path) -> Convert:
    return Convert(
        adapters=no_cloud,
        bus=BusHandle(),  # unbound: using it fails the test
        host=HostConfig(appliance_cache=work_root / "appliance"),
        work_root=work_root,
        conversion_host=lambda _plan: "host-1",
    )


def synced(
    conversion: ConversionMode, final: bool = True, macs: tuple[str, ...] = ()
) -> CloudEvent[VmSynced]:
    instance = str(uuid.uuid4())
    disks = [DiskInfo(key=2000, capacity_bytes=1 << 30), DiskInfo(key=2001, capacity_bytes=1 << 30)]
    data = VmSynced(
        request_id="req-1",
        vm_key=vm_key_for(instance),
        plan=MigrationPlan(
            source=SourceRef(name="vc"),
            destination=DestinationRef(cloud="dest"),
            options=MigrationOptions(conversion=conversion),
        ),
        vm=inventory(instance, disks, macs),
        pass_no=3,
        final=final,
        volumes=[
            SyncedVolume(disk_key=2000, volume_id="vol-root"),
            SyncedVolume(disk_key=2001, volume_id="vol-data"),
        ],
    )
    return CloudEvent(id="e1", type=VmSynced.spec.ce_type, source="test", subject=data.vm_key, data=data)


async def test_precopy_passes_are_not_converted(work_root: Path) -> None:
    assert await offline_handler(work_root)(synced("clone", final=False), Step()) == []


async def test_skip_passes_the_replicas_through_in_disk_order(work_root: Path) -> None:
    event = synced("skip")
    (emit,) = await offline_handler(work_root)(event, Step())
    assert isinstance(emit.data, ConversionDone)
    assert emit.vm_key == event.data.vm_key
    assert emit.data.volume_ids == ["vol-root", "vol-data"]
    assert emit.data.inspection == GuestInspection()
    assert emit.data.log_ref is None
    assert emit.data.vm == event.data.vm
    assert emit.data.plan == event.data.plan


async def test_a_nic_the_converter_cannot_use_fails_before_anything_is_cloned(work_root: Path) -> None:
    with pytest.raises(PermanentError, match="not a MAC address"):
        await offline_handler(work_root)(synced("clone", macs=("00:50:56:zz:00:01",)), Step())


def test_definition_heartbeats_well_inside_the_ack_wait(work_root: Path) -> None:
    function = definition(offline_handler(work_root))
    assert function.name == "convert"
    assert function.consumes is VmSynced
    assert function.emits == (ConversionDone, CutoverRequested)
    assert function.ack_wait <= 60
    assert function.heartbeat_interval * 3 <= function.ack_wait


async def test_a_work_root_too_long_for_unix_sockets_is_refused_before_anything_is_cloned(
    work_root: Path,
) -> None:
    convert = replace(offline_handler(work_root), work_root=Path("/var/lib/vmferry") / ("x" * 60))
    with pytest.raises(PermanentError, match="107 bytes") as caught:
        await convert(synced("clone"), Step())
    assert "shorter path" in caught.value.fix


def test_failure_carries_the_decisive_lines_the_hint_and_the_log() -> None:
    error = ConversionError(
        FailureKind.NO_ROOT_DEVICE,
        "virt-v2v-in-place failed (no-root-device): virt-v2v-in-place: error: inspection could not detect",
        hint="no operating system was found on the disks",
        decisive_lines=(
            "virt-v2v-in-place: error: inspection could not detect",
            "No root device found in this operating system image.",
        ),
        log_path=Path("/tmp/x/convert.log"),
    )
    failure = conversion_failure(error, "nats-object://t_logs/vm-1/convert-a.log", in_place=False)
    assert isinstance(failure, PermanentError)
    assert "No root device found in this operating system image." in failure.cause
    assert failure.cause.count("inspection could not detect") == 1  # not repeated
    assert failure.cause.endswith("full log: nats-object://t_logs/vm-1/convert-a.log")
    assert failure.fix.startswith("no operating system was found")
    assert "replica volumes are untouched" in failure.fix

    retryable = ConversionError(
        FailureKind.APPLIANCE_FAILED, "x" * 5000, retryable=True, decisive_lines=("y" * 5000,)
    )
    failure = conversion_failure(retryable, None, in_place=True)
    assert isinstance(failure, RetryableError)
    assert len(failure.cause) < 4096  # fits migration.failed
    assert failure.cause.endswith("no tool ran")
    assert "untouched" not in failure.fix

    kept = ConversionError(FailureKind.UNKNOWN, "boom", log_path=Path("/var/tmp/convert.log"))
    assert conversion_failure(kept, None, in_place=False).cause.endswith(
        "on the conversion host: /var/tmp/convert.log"
    )


async def test_progress_is_written_at_most_every_interval(bus: BusHandle) -> None:
    reporter = ProgressReporter(bus, "vm-progress", "req-1", every=0.5)
    revisions = []
    for step in range(30):  # 3 s of reports, 10 a second
        reporter.offer(step * 3.0, f"stage {step}")
        await reporter.flush()
        _, revision = await bus.state.get("vm-progress")
        revisions.append(revision)
        await asyncio.sleep(0.1)
    await reporter.report(100.0, "converted", force=True)
    state, revision = await bus.state.get("vm-progress")
    assert state is not None
    assert state.request_id == "req-1"
    progress = state.progress["convert"]
    assert (progress.percent, progress.detail) == (100.0, "converted")
    assert progress.at is not None
    writes = len(set(revisions))
    assert 4 <= writes <= 8, revisions  # ~ every 0.5 s over 3 s, not 30 writes
    history = [s.progress["convert"].percent for s in await bus.state.history("vm-progress")]
    assert history == sorted(history)
