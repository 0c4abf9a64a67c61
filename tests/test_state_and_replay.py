"""The per-VM state store (compare-and-set under contention) and replay of a failed chain."""

from __future__ import annotations

import asyncio

import pytest
from msgspec import structs
from nats.js import JetStreamContext

from tests import toychain
from tests.helpers import events_of, eventually, running
from vmferry.bus.naming import Naming
from vmferry.bus.provision import Limits, provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.replay import ReplayRefusedError, replay
from vmferry.bus.state import StateStore
from vmferry.schemas import events as ev
from vmferry.schemas.state import VmState

SNAP = ev.DiskSnapshotReady.spec.ce_type
SYNCED = ev.VolumeSynced.spec.ce_type


async def test_concurrent_updates_are_resolved_by_compare_and_set(
    js: JetStreamContext, naming: Naming
) -> None:
    await provision(js, naming, [])
    stores = [await StateStore.open(js, naming.state_bucket) for _ in range(4)]

    def bump(current: VmState | None) -> VmState:
        state = current or VmState(key="vm-cas")
        return structs.replace(state, replays=state.replays + 1)

    await asyncio.gather(*(stores[i % 4].update("vm-cas", bump) for i in range(40)))
    final, revision = await stores[0].get("vm-cas")
    assert final is not None and final.replays == 40  # no lost update
    assert revision >= 40
    history = await stores[0].history("vm-cas")
    assert [s.replays for s in history] == list(range(41 - len(history), 41))


async def test_state_bucket_keeps_history(js: JetStreamContext, naming: Naming) -> None:
    await provision(js, naming, [], Limits(state_history=12))
    info = await js.stream_info(f"KV_{naming.state_bucket}")
    assert info.config.max_msgs_per_subject == 12
    changes = await provision(js, naming, [], Limits(state_history=20))
    assert ("bucket", "updated") in [(c.kind, c.action) for c in changes]
    assert (await js.stream_info(f"KV_{naming.state_bucket}")).config.max_msgs_per_subject == 20


async def _phase(store: StateStore, key: str, *phases: str) -> VmState | None:
    state, _ = await store.get(key)
    return state if state is not None and state.phase in phases else None


async def test_replay_redrives_a_failed_chain_once(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys(fail_snapshot_permanently=True)
    async with running(js, naming, toys.functions()) as (_, store):
        await Publisher(js, naming).publish(toychain.event_of(toychain.discovered(), "d-1"))
        failed = await eventually(lambda: _phase(store, toychain.VM_KEY, "failed"))
        assert failed.failure is not None and failed.failure.step == "snapshot"

        toys.fail_snapshot_permanently = False  # the operator fixed the cause
        first = await replay(js, naming, store, toychain.VM_KEY)
        with pytest.raises(ReplayRefusedError, match=r"already being replayed|has not failed"):
            await replay(js, naming, store, toychain.VM_KEY)
        done = await eventually(lambda: _phase(store, toychain.VM_KEY, "synced"), timeout=30)
        with pytest.raises(ReplayRefusedError):
            await replay(js, naming, store, toychain.VM_KEY)  # nothing failed: re-driving would duplicate
        forced = await replay(js, naming, store, toychain.VM_KEY, force=True)
        again = await replay(js, naming, store, toychain.VM_KEY, force=True)
        await asyncio.sleep(1.0)
    assert first.generation == 1 and not first.duplicate
    assert done.failure is None and set(done.disks) == {"2000", "2001"}
    assert toys.calls["snapshot"] == 2  # the failed delivery, then exactly one replayed delivery
    assert len(await events_of(js, naming, toychain.VM_KEY, SNAP)) == 2
    # Forced replays of a finished VM re-drive its last event (a volume.synced, which no toy consumes).
    assert forced.generation == 2 and again.generation == 3


async def test_replay_twice_with_same_generation_publishes_once(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys(fail_snapshot_permanently=True)
    await provision(js, naming, toys.functions())
    store = await StateStore.open(js, naming.state_bucket)
    async with running(js, naming, toys.functions(), provisioned=True):
        await Publisher(js, naming).publish(toychain.event_of(toychain.discovered(), "d-1"))
        await eventually(lambda: _phase(store, toychain.VM_KEY, "failed"))
    # No runtime now: two operators replay "at once" from the same failed state.
    results = await asyncio.gather(
        replay(js, naming, store, toychain.VM_KEY), replay(js, naming, store, toychain.VM_KEY),
        return_exceptions=True,
    )  # fmt: skip
    published = [r for r in results if not isinstance(r, BaseException)]
    assert {r.event_id for r in published} and len({r.event_id for r in published}) == 1
    assert sum(1 for r in published if not r.duplicate) <= 1
    discovered = await events_of(js, naming, toychain.VM_KEY, ev.VmDiscovered.spec.ce_type)
    assert len(discovered) == 2  # the original and ONE replayed copy


async def test_replay_of_unknown_vm_is_refused(js: JetStreamContext, naming: Naming) -> None:
    await provision(js, naming, [])
    store = await StateStore.open(js, naming.state_bucket)
    with pytest.raises(ReplayRefusedError, match="no state"):
        await replay(js, naming, store, "vm-doesnotexist")
