"""The transfer function end to end: vcsim-ferry disks (real flat files, read over the datastore's
https /folder access with the session cookie) copied by nbdkit + libnbd onto Cinder volumes of the
OpenStack lab attached to a conversion-host server, with checkpoints and state in NATS.

Between a snapshot and its copy nothing writes to the disk: vcsim-ferry's snapshots freeze the
changeIds, not the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from http.cookies import SimpleCookie
from pathlib import Path

import psutil
import pytest

from tests.transfer.conftest import MIB, REQUEST_ID, SOURCE, Rig, Step, assert_same_bytes
from tests.vsphere.lab import blocks_of, write
from vmferry.adapters.dataplane import EngineConfig, NbdkitFilter
from vmferry.adapters.dataplane.snapshot_sources import SshSettings, TransportSettings
from vmferry.adapters.openstack.model import CHANGE_ID_KEY, PASS_KEY, REQUEST_KEY
from vmferry.adapters.vsphere.snapshots import change_id_epoch
from vmferry.bus.checkpoints import KvCheckpointSink, checkpoint_key
from vmferry.bus.errors import PermanentError, RetryableError

pytestmark = [pytest.mark.timeout(900)]
KIB = 1024


def fill(flat_file: Path, writes: list[tuple[int, int]]) -> None:
    """Write random bytes at these (offset, length) places of a disk's flat file."""
    for offset, length in writes:
        write(flat_file, offset, os.urandom(length))


def processes_showing(secret: str) -> list[str]:
    """Processes whose command line or environment holds ``secret``."""
    found = []
    for process in psutil.process_iter():
        try:
            text = " ".join(process.cmdline()) + " ".join(f"{k}={v}" for k, v in process.environ().items())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if secret in text:
            found.append(f"{process.pid}: {process.name()}")
    return found


async def stored_checkpoint(rig: Rig, key: str) -> int | None:
    """bytes_done of the stored checkpoint, or None."""
    sink = await KvCheckpointSink.open(rig.bus, key)
    found = await sink.load_async()
    return found.bytes_done if found is not None else None


async def test_first_pass_copies_both_disks_and_a_redelivery_changes_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmferry.functions.transfer")
    vm = await rig.make_vm([4 * MIB, 6 * MIB])
    first, second = vm.disk_keys
    fill(vm.flat_files[first], [(0, 1 * MIB), (2 * MIB + 100 * KIB, 300 * KIB)])
    fill(vm.flat_files[second], [(5 * MIB, 1 * MIB - 4096)])
    plan = rig.plan()
    events = await rig.snapshot(vm, 1, plan)
    handler = rig.handler()
    step = Step()

    started = time.monotonic()
    synced = await asyncio.gather(*(rig.run(handler, ready, step) for ready in events))
    print(f"\nfirst pass, 2 disks (4 + 6 MiB) in parallel: {time.monotonic() - started:.1f} s")

    for ready, done in zip(events, synced, strict=True):
        assert (done.disk_key, done.pass_no, done.disk_count) == (ready.disk.key, 1, 2)
        assert done.change_id == ready.change_id and done.change_id is not None
        assert done.verified, "plan.options.verify_copies is on by default"
        assert done.bytes_total == ready.disk.capacity_bytes
        assert_same_bytes(rig, done.volume_id, vm.flat_files[ready.disk.key])
        volume = await rig.volume(done.volume_id)
        assert volume.status == "available", "detached once the pass is recorded"
        assert volume.metadata[CHANGE_ID_KEY] == done.change_id
        assert (volume.metadata[PASS_KEY], volume.metadata[REQUEST_KEY]) == ("1", REQUEST_ID)
        progress = await rig.progress(vm, ready.disk.key)
        assert progress is not None
        assert (progress.pass_no, progress.change_id, progress.volume_id) == (
            1,
            done.change_id,
            done.volume_id,
        )
        assert progress.bytes_done == progress.bytes_total == ready.disk.capacity_bytes
        key = checkpoint_key(vm.vm_key, REQUEST_ID, ready.disk.key, 1)
        assert await stored_checkpoint(rig, key) is None, "the checkpoint is cleared once recorded"
    assert "full copy" in caplog.text and "no recorded pass" in caplog.text
    assert step.heartbeats >= 2

    # A redelivery (e.g. the ack was lost) finds the pass recorded: same volume, no copy, same event.
    caplog.clear()
    again = await rig.run(handler, events[0])
    assert again.volume_id == synced[0].volume_id
    assert again.change_id == synced[0].change_id
    assert "already holds pass 1" in caplog.text and "copy onto volume" not in caplog.text
    assert sorted(v.id for v in await rig.vm_volumes(vm)) == sorted(d.volume_id for d in synced)
    await rig.release(vm, 1)


async def test_a_second_pass_copies_only_the_changed_blocks_and_then_advances_the_change_id(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmferry.functions.transfer")
    vm = await rig.make_vm([4 * MIB])
    [key] = vm.disk_keys
    data = vm.flat_files[key]
    fill(data, [(0, 4 * MIB)])
    plan = rig.plan()
    handler = rig.handler()
    [ready1] = await rig.snapshot(vm, 1, plan)
    first = await rig.run(handler, ready1)
    await rig.release(vm, 1)

    changed = [(100 * KIB + 5, 10), (1 * MIB + 32 * KIB, 70 * KIB), (4 * MIB - 1, 1)]
    fill(data, changed)
    write(data, 2 * MIB, bytes(64 * KIB))  # a block zeroed is a change too
    changed.append((2 * MIB, 64 * KIB))
    [ready2] = await rig.snapshot(vm, 2, plan)
    assert ready2.change_id != ready1.change_id
    caplog.clear()
    second = await rig.run(handler, ready2)

    expected = blocks_of(changed, rig.lab.vcsim.block_size)
    assert second.volume_id == first.volume_id
    assert second.bytes_total == sum(length for _, length in expected), "only the changed blocks"
    assert second.verified
    assert second.change_id == ready2.change_id
    assert "cbt copy" in caplog.text and f"changes since {ready1.change_id}" in caplog.text
    assert_same_bytes(rig, second.volume_id, data)
    volume = await rig.volume(second.volume_id)
    assert (volume.metadata[CHANGE_ID_KEY], volume.metadata[PASS_KEY]) == (ready2.change_id, "2")
    await rig.release(vm, 2)


async def test_an_interrupted_copy_resumes_from_the_kv_checkpoint_and_records_nothing_before(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    size = 16 * MIB
    vm = await rig.make_vm([size])
    [key] = vm.disk_keys
    fill(vm.flat_files[key], [(0, size)])
    plan = rig.plan()
    [ready] = await rig.snapshot(vm, 1, plan)
    # One request of 256 KiB at a time from a source slowed to 40 ms a read: ~2.6 s for the disk.
    slow = rig.handler(
        engine=EngineConfig(
            connections=1,
            requests=1,
            request_size=256 * KIB,
            checkpoint_interval=0.05,
            progress_interval=0.2,
            retries=0,
        ),
        transports={SOURCE: TransportSettings(filters=(NbdkitFilter("delay", (("rdelay", "40ms"),)),))},
    )
    checkpoint = checkpoint_key(vm.vm_key, REQUEST_ID, key, 1)

    cookie = SimpleCookie(rig.vsphere.sync.session_cookie())["vmware_soap_session"].value
    assert cookie in rig.lab.session_keys(), "the https source logs in with the client's live session"

    copying = asyncio.ensure_future(rig.run(slow, ready))
    deadline = time.monotonic() + 60
    while (done := await stored_checkpoint(rig, checkpoint)) is None or done < 2 * MIB:
        assert not copying.done(), "the copy ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint was stored"
        await asyncio.sleep(0.05)
    while (progress := await rig.progress(vm, key)) is None:
        assert time.monotonic() < deadline, "no progress was recorded during the copy"
        await asyncio.sleep(0.05)
    assert 0 < progress.bytes_done < progress.bytes_total == size
    assert progress.rate_bps > 0 and progress.eta_s is not None and progress.change_id is None
    assert processes_showing(cookie) == [], "the session cookie is in no process's argv or environment"
    copying.cancel()  # what a SIGTERM of the worker does to the handler
    with pytest.raises(asyncio.CancelledError):
        await copying

    interrupted_at = await stored_checkpoint(rig, checkpoint)
    assert interrupted_at is not None and 2 * MIB <= interrupted_at < size
    [volume] = await rig.vm_volumes(vm)
    assert PASS_KEY not in volume.metadata and CHANGE_ID_KEY not in volume.metadata, "nothing recorded"

    caplog.clear()
    resumed = await rig.run(rig.handler(), ready)
    assert resumed.volume_id == volume.id
    assert resumed.bytes_copied <= size - interrupted_at, "the resumed copy skips what was checkpointed"
    assert "resuming" in caplog.text
    assert_same_bytes(rig, resumed.volume_id, vm.flat_files[key])
    assert await stored_checkpoint(rig, checkpoint) is None
    assert cookie not in caplog.text
    await rig.release(vm, 1)


async def test_a_pass_that_fails_verification_records_nothing_and_its_retry_copies_it_again(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmferry.functions.transfer")
    vm = await rig.make_vm([4 * MIB])
    [key] = vm.disk_keys
    data = vm.flat_files[key]
    fill(data, [(0, 4 * MIB)])
    plan = rig.plan()
    [ready1] = await rig.snapshot(vm, 1, plan)
    first = await rig.run(rig.handler(), ready1)
    await rig.release(vm, 1)
    changed = [(i * 256 * KIB, 64 * KIB) for i in range(16)]  # 16 blocks, one every 256 KiB
    fill(data, changed)
    [ready2] = await rig.snapshot(vm, 2, plan)
    slow = rig.handler(
        engine=EngineConfig(connections=1, requests=1, request_size=64 * KIB, checkpoint_interval=0.02),
        transports={SOURCE: TransportSettings(filters=(NbdkitFilter("delay", (("rdelay", "100ms"),)),))},
    )
    checkpoint = checkpoint_key(vm.vm_key, REQUEST_ID, key, 2)

    # vcsim-ferry's snapshots do not freeze bytes: a write to an area already copied stands for a
    # source that changed under the copy (or a destination that lost a write).
    copying = asyncio.ensure_future(rig.run(slow, ready2))
    deadline = time.monotonic() + 60
    while (done := await stored_checkpoint(rig, checkpoint)) is None or done < 64 * KIB:
        assert not copying.done() and time.monotonic() < deadline, "no checkpoint during the copy"
        await asyncio.sleep(0.02)
    fill(data, [(0, 4096)])
    with pytest.raises(RetryableError) as failed:
        await copying

    assert "differ" in failed.value.cause and f"copying disk {key}" in failed.value.cause
    volume = await rig.volume(first.volume_id)
    assert (volume.metadata[CHANGE_ID_KEY], volume.metadata[PASS_KEY]) == (ready1.change_id, "1")
    assert await stored_checkpoint(rig, checkpoint) is None, "a wrong copy leaves nothing to resume"

    retried = await rig.run(rig.handler(), ready2)  # the runner's redelivery
    assert retried.verified and retried.change_id == ready2.change_id
    assert_same_bytes(rig, retried.volume_id, data)
    volume = await rig.volume(first.volume_id)
    assert (volume.metadata[CHANGE_ID_KEY], volume.metadata[PASS_KEY]) == (ready2.change_id, "2")
    await rig.release(vm, 2)


async def test_a_cbt_reset_falls_back_to_a_full_copy(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmferry.functions.transfer")
    vm = await rig.make_vm([4 * MIB])
    [key] = vm.disk_keys
    fill(vm.flat_files[key], [(0, 1 * MIB)])
    plan = rig.plan()
    handler = rig.handler()
    [ready1] = await rig.snapshot(vm, 1, plan)
    await rig.run(handler, ready1)
    await rig.release(vm, 1)

    rig.set_cbt(vm, False)  # off and on again: tracking restarts in a new epoch
    rig.set_cbt(vm, True)
    fill(vm.flat_files[key], [(3 * MIB, 64 * KIB)])
    [ready2] = await rig.snapshot(vm, 2, plan)
    assert ready2.change_id is not None and ready1.change_id is not None
    assert change_id_epoch(ready2.change_id) != change_id_epoch(ready1.change_id)
    caplog.clear()
    second = await rig.run(handler, ready2)

    assert "full copy" in caplog.text and "CBT was reset" in caplog.text
    assert second.bytes_total == 4 * MIB, "the whole disk"
    assert second.change_id == ready2.change_id
    assert_same_bytes(rig, second.volume_id, vm.flat_files[key])
    await rig.release(vm, 2)


async def test_a_change_id_vsphere_no_longer_knows_means_a_full_copy(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmferry.functions.transfer")
    vm = await rig.make_vm([4 * MIB])
    [key] = vm.disk_keys
    fill(vm.flat_files[key], [(0, 512 * KIB)])
    plan = rig.plan()
    handler = rig.handler()
    [ready1] = await rig.snapshot(vm, 1, plan)
    first = await rig.run(handler, ready1)
    await rig.release(vm, 1)
    assert ready1.change_id is not None
    unknown = f"{change_id_epoch(ready1.change_id)}/77"  # the right epoch, a sequence never issued
    bs = rig.admin.conn.block_storage
    bs.set_volume_metadata(first.volume_id, **{CHANGE_ID_KEY: unknown})

    fill(vm.flat_files[key], [(2 * MIB, 64 * KIB)])
    [ready2] = await rig.snapshot(vm, 2, plan)
    caplog.clear()
    second = await rig.run(handler, ready2)

    assert "cannot give the changes since" in caplog.text and "full copy" in caplog.text
    assert second.bytes_total == 4 * MIB
    assert_same_bytes(rig, second.volume_id, vm.flat_files[key])
    assert (await rig.volume(second.volume_id)).metadata[CHANGE_ID_KEY] == ready2.change_id
    await rig.release(vm, 2)


async def test_an_unreachable_source_is_a_clear_error_and_records_nothing(rig: Rig) -> None:
    vm = await rig.make_vm([4 * MIB])
    [key] = vm.disk_keys
    plan = rig.plan(transport="ssh")
    [ready] = await rig.snapshot(vm, 1, plan)
    closed_port = _closed_port()
    handler = rig.handler(
        transports={
            SOURCE: TransportSettings(ssh=SshSettings(host="127.0.0.1", port=closed_port, verify_host=False))
        }
    )

    with pytest.raises(PermanentError) as failed:
        await rig.run(handler, ready)

    cause = failed.value.cause
    assert f"copying disk {key} of VM {vm.inventory.identity.name!r}" in cause
    assert "ssh" in cause and "127.0.0.1" in cause
    assert failed.value.fix
    [volume] = await rig.vm_volumes(vm)
    assert volume.status == "available", "a permanent failure frees the volume"
    assert PASS_KEY not in volume.metadata

    no_settings = rig.handler(transports={})
    with pytest.raises(PermanentError, match="the ssh transport is not configured for source 'lab'"):
        await rig.run(no_settings, ready)
    await rig.release(vm, 1)


def _closed_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_local_transport_reads_the_datastore_mounted_here(rig: Rig) -> None:
    vm = await rig.make_vm([4 * MIB], cbt=False)
    [key] = vm.disk_keys
    fill(vm.flat_files[key], [(1 * MIB, 256 * KIB)])
    datastores = rig.lab.vcsim.datastore_dir.parent
    plan = rig.plan(transport="local", enable_cbt=False, local_disk_path=f"{datastores}/{{datastore}}")
    assert rig.lab.vcsim.datastore == "ferry" and rig.lab.vcsim.datastore_dir.name == "datastore"
    (datastores / "ferry").symlink_to(rig.lab.vcsim.datastore_dir)  # mount points named by datastore
    [ready] = await rig.snapshot(vm, 1, plan)
    assert ready.change_id is None

    synced = await rig.run(rig.handler(), ready)

    assert synced.change_id is None and synced.verified
    assert_same_bytes(rig, synced.volume_id, vm.flat_files[key])
    assert (await rig.volume(synced.volume_id)).metadata[CHANGE_ID_KEY] == ""
    await rig.release(vm, 1)
