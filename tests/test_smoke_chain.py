"""A first end-to-end check: a request goes through intake and the tracker records it."""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.functions import Dependencies, build_registry
from vmferry.schemas.events import MigrationRequested
from vmferry.schemas.request import DestinationRef, MigrationRequest, SourceRef, VmSelector


async def test_request_is_accepted_and_tracked(js: JetStreamContext, naming: Naming) -> None:
    registry = build_registry(Dependencies(frozenset({"vc"}), frozenset({"lab"})))
    await provision(js, naming, registry)
    store = await StateStore.open(js, naming.state_bucket)
    runtime = Runtime(js, naming, registry.select(["intake"]), store, fetch_timeout=0.2)
    task = asyncio.create_task(runtime.run())
    request = MigrationRequest(
        request_id="r1",
        source=SourceRef(name="vc"),
        destination=DestinationRef(cloud="lab"),
        vms=[VmSelector(name="web 01")],
    )
    await Publisher(js, naming).publish(
        CloudEvent(
            id="request-r1",
            type=MigrationRequested.spec.ce_type,
            source="/tests",
            subject="req-r1",
            data=MigrationRequested(request=request),
        )
    )
    for _ in range(100):
        state, _ = await store.get("req-r1")
        if state and state.phase == "accepted":
            break
        await asyncio.sleep(0.05)
    runtime.stop()
    await task
    assert state is not None
    assert state.phase == "accepted"
    assert state.steps["intake"].status == "done"
