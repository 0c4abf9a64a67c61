"""Runner semantics against a real nats-server: ack after publish, retries with backoff, heartbeats,
poison messages, dead letters, deduplication, redelivery after a crash, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from tests import toychain
from tests.helpers import consumer_state, dead_letters, events_of, eventually, running
from vmferry.bus.cloudevents import encode
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.publisher import Publisher
from vmferry.schemas import events as ev

SNAP = ev.DiskSnapshotReady.spec.ce_type
SYNCED = ev.VolumeSynced.spec.ce_type
FAILED = ev.MigrationFailed.spec.ce_type
REPO = Path(__file__).resolve().parent.parent


async def _publish_discovered(js: JetStreamContext, naming: Naming, event_id: str = "d-1") -> None:
    await Publisher(js, naming).publish(toychain.event_of(toychain.discovered(), event_id))


async def test_chain_publishes_then_acks(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys()
    async with running(js, naming, toys.functions()) as (_, store):
        await _publish_discovered(js, naming)
        synced = await eventually(lambda: _at_least(js, naming, SYNCED, 2))
        state = await eventually(lambda: _phase(store, "synced"))
    assert len(synced) == 2
    assert state.disks.keys() == {"2000", "2001"}
    assert toys.calls == {"snapshot": 1, "transfer": 2}
    for function in ("snapshot", "transfer"):
        info = await consumer_state(js, naming, function)
        assert info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0


async def _at_least(js: JetStreamContext, naming: Naming, ce_type: str, n: int) -> list[object] | None:
    found = await events_of(js, naming, toychain.VM_KEY, ce_type)
    return list(found) if len(found) >= n else None


async def _phase(store: object, phase: str) -> object:
    state, _ = await store.get(toychain.VM_KEY)  # type: ignore[attr-defined]
    return state if state is not None and state.phase == phase else None


async def test_retryable_errors_back_off_then_succeed(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys(fail_snapshot_times=2)
    seen: list[float] = []
    original = toys.snapshot

    async def timed(event, ctx):  # type: ignore[no-untyped-def]
        seen.append(time.monotonic())
        return await original(event, ctx)

    toys.snapshot = timed  # type: ignore[method-assign]
    async with running(js, naming, toys.functions(delays=(0.5, 1.0))):
        await _publish_discovered(js, naming)
        await eventually(lambda: events_of(js, naming, toychain.VM_KEY, SNAP))
    assert toys.calls["snapshot"] == 3
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95, gaps  # the nak delays of the retry policy
    assert not await events_of(js, naming, toychain.VM_KEY, FAILED)


async def test_permanent_error_terminates_with_failure_event_and_dead_letter(
    js: JetStreamContext, naming: Naming
) -> None:
    toys = toychain.Toys(fail_snapshot_permanently=True)
    async with running(js, naming, toys.functions()) as (_, store):
        await _publish_discovered(js, naming)
        failed = await eventually(lambda: events_of(js, naming, toychain.VM_KEY, FAILED))
        state = await eventually(lambda: _phase(store, "failed"))
    data = failed[0].event.data  # type: ignore[union-attr]
    assert isinstance(data, ev.MigrationFailed)
    assert (data.step, data.retryable, data.deliveries) == ("snapshot", False, 1)
    assert "independent disk" in data.cause and data.fix == "make the disk persistent"
    assert data.failed_event_id == "d-1" and data.dead_letter_seq is not None
    letters = await dead_letters(js, naming)
    assert len(letters) == 1 and letters[0].headers["Vmferry-Function"] == "snapshot"
    assert state.failure.step == "snapshot"  # type: ignore[attr-defined]
    assert toys.calls["snapshot"] == 1  # terminated: never redelivered
    info = await consumer_state(js, naming, "snapshot")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_retries_exhausted_become_failure(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys(retryable_forever=True)
    async with running(js, naming, toys.functions(max_deliver=3, delays=(0.1,))):
        await _publish_discovered(js, naming)
        failed = await eventually(lambda: events_of(js, naming, toychain.VM_KEY, FAILED))
    data = failed[0].event.data  # type: ignore[union-attr]
    assert isinstance(data, ev.MigrationFailed)
    assert data.retryable and data.deliveries == 3 and "gave up after 3 deliveries" in data.cause
    assert toys.calls["snapshot"] == 3
    assert len(await dead_letters(js, naming)) == 1


async def test_heartbeats_keep_a_30s_handler_alive_with_short_ack_wait(
    js: JetStreamContext, naming: Naming
) -> None:
    toys = toychain.Toys(sleep_s=30.0)
    async with running(js, naming, toys.functions(ack_wait=2.0)):
        await _publish_discovered(js, naming)
        await eventually(lambda: events_of(js, naming, toychain.VM_KEY, SNAP), timeout=60)
        info = await consumer_state(js, naming, "snapshot")
    assert toys.calls["snapshot"] == 1
    assert info.num_redelivered == 0


async def test_lost_ack_redelivers_and_outputs_are_deduplicated(
    js: JetStreamContext, naming: Naming, monkeypatch: pytest.MonkeyPatch
) -> None:
    toys = toychain.Toys()
    real_ack = Msg.ack
    dropped: list[str] = []

    async def lossy_ack(self: Msg) -> None:
        if self.subject.endswith("vm.discovered") and not dropped:
            dropped.append(self.subject)  # the ack is lost on the way: the server redelivers
            return
        await real_ack(self)

    monkeypatch.setattr(Msg, "ack", lossy_ack)
    async with running(js, naming, toys.functions(ack_wait=1.0, delays=(0.1,))):
        await _publish_discovered(js, naming)
        await eventually(lambda: _calls(toys, "snapshot", 2), timeout=15)
        await asyncio.sleep(0.5)
        snaps = await events_of(js, naming, toychain.VM_KEY, SNAP)
    assert len(snaps) == 2  # one per disk, not two per disk: the redelivery's publishes were duplicates


async def _calls(toys: toychain.Toys, name: str, n: int) -> bool:
    return toys.calls[name] >= n


async def test_duplicate_publish_is_dropped(js: JetStreamContext, naming: Naming) -> None:
    await provision(js, naming, [])
    publisher = Publisher(js, naming)
    event = toychain.event_of(toychain.discovered(), "same-id")
    first = await publisher.publish(event)
    second = await publisher.publish(event)
    assert not first.duplicate and second.duplicate and first.seq == second.seq


async def test_unanswered_deliveries_are_dead_lettered_from_the_advisory(
    js: JetStreamContext, naming: Naming
) -> None:
    """A worker that takes the message and dies every time: the server's advisory is handled."""
    toys = toychain.Toys()
    functions = toys.functions(ack_wait=0.5, max_deliver=2)
    await provision(js, naming, functions)
    await _publish_discovered(js, naming)
    sub = await js.pull_subscribe_bind(durable=naming.durable("snapshot"), stream=naming.stream)
    for _ in range(2):  # take it twice and never answer, like a crashed process
        (await sub.fetch(1, timeout=5))[0]
        await asyncio.sleep(0.7)
    with pytest.raises(TimeoutError):  # the next pull finds the deliveries exhausted
        await sub.fetch(1, timeout=1)
    await sub.unsubscribe()
    async with running(js, naming, [], provisioned=True):
        failed = await eventually(lambda: events_of(js, naming, toychain.VM_KEY, FAILED))
    data = failed[0].event.data  # type: ignore[union-attr]
    assert isinstance(data, ev.MigrationFailed)
    assert data.step == "snapshot" and data.deliveries == 2 and "no answer" in data.cause
    letters = await dead_letters(js, naming)
    assert letters and letters[0].headers["Vmferry-Original-Subject"].endswith("vm.discovered")
    assert toys.calls["snapshot"] == 0


def _child(url: str, naming: Naming, mode: str, marker: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.toychain", url, naming.prefix, mode, str(marker)], env=env, cwd=REPO
    )


async def test_crash_mid_handler_is_redelivered(js: JetStreamContext, naming: Naming, nats_url: str,
                                                tmp_path: Path) -> None:  # fmt: skip
    toys = toychain.Toys()
    await provision(js, naming, toys.functions(ack_wait=1.0))
    marker = tmp_path / "started"
    child = _child(nats_url, naming, "slow", marker)
    try:
        await _publish_discovered(js, naming)
        await eventually(lambda: _exists(marker), timeout=20)
        child.send_signal(signal.SIGKILL)  # dies with the message in flight, unacked
        child.wait(10)
        async with running(js, naming, toys.functions(ack_wait=1.0), provisioned=True):
            await eventually(lambda: events_of(js, naming, toychain.VM_KEY, SNAP), timeout=20)
    finally:
        child.kill()
        child.wait()
    assert toys.deliveries == [2]  # the crashed delivery was #1; the survivor got the redelivery
    assert (await consumer_state(js, naming, "snapshot")).num_ack_pending == 0


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def test_sigterm_finishes_the_message_in_flight(js: JetStreamContext, naming: Naming, nats_url: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    toys = toychain.Toys()
    await provision(js, naming, toys.functions(ack_wait=1.0))
    marker = tmp_path / "started"
    child = _child(nats_url, naming, "slow", marker)
    try:
        await _publish_discovered(js, naming)
        await eventually(lambda: _exists(marker), timeout=20)
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        child.kill()
    snaps = await events_of(js, naming, toychain.VM_KEY, SNAP)
    assert len(snaps) == 2  # the in-flight handler finished and its events were published
    info = await consumer_state(js, naming, "snapshot")
    assert info.num_ack_pending == 0 and info.num_pending == 0 and info.delivered.consumer_seq == 1


async def test_wrong_stream_config_is_rejected_by_provisioning(js: JetStreamContext, naming: Naming) -> None:
    await js.add_stream(api.StreamConfig(name=naming.stream, subjects=[naming.events_wildcard], max_age=60))
    changes = await provision(js, naming, [])
    assert ("stream", naming.stream, "updated") in [(c.kind, c.name, c.action) for c in changes]
    info = await js.stream_info(naming.stream)
    assert info.config.duplicate_window == 3600 and info.config.storage == api.StorageType.FILE


async def test_binary_headers_roundtrip(js: JetStreamContext, naming: Naming) -> None:
    headers, _body = encode(toychain.event_of(toychain.discovered(name='ünï code "q"'), "x y%"))
    assert headers["ce-id"] == "x%20y%25" and headers["Nats-Msg-Id"] == "x y%"
