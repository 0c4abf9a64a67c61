"""Provisioning is declarative and idempotent, drift is updated; trace context crosses every hop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests import toychain
from tests.helpers import events_of, eventually, running
from vmferry.bus.errors import NotProvisionedError
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.runner import PullLoop
from vmferry.bus.state import StateStore


async def test_provision_is_idempotent_and_updates_drift(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys()
    first = await provision(js, naming, toys.functions(ack_wait=2.0))
    assert {c.action for c in first} == {"created"}
    assert {(c.kind, c.name) for c in first} >= {
        ("stream", naming.stream), ("stream", naming.dlq_stream), ("stream", naming.advisory_stream),
        ("bucket", naming.state_bucket), ("consumer", naming.durable("snapshot")),
        ("consumer", naming.durable("transfer")), ("consumer", naming.durable("tracker")),
        ("consumer", naming.durable("deadletter")),
    }  # fmt: skip
    again = await provision(js, naming, toys.functions(ack_wait=2.0))
    assert {c.action for c in again} == {"unchanged"}
    drifted = await provision(js, naming, toys.functions(ack_wait=9.0, max_deliver=7))
    updated = {c.name for c in drifted if c.action == "updated"}
    assert updated == {naming.durable("snapshot"), naming.durable("transfer")}
    info = await js.consumer_info(naming.stream, naming.durable("snapshot"))
    assert info.config.ack_wait == 9.0 and info.config.max_deliver == 7
    assert info.config.filter_subject == f"{naming.prefix}.*.vm.discovered"


async def test_runner_refuses_unprovisioned_consumer(js: JetStreamContext, naming: Naming) -> None:
    async def nothing(_: object) -> None:
        return None

    loop = PullLoop(js, naming.stream, naming.durable("ghost"), 1, nothing)  # type: ignore[arg-type]
    with pytest.raises(NotProvisionedError, match="vmferry provision"):
        await loop.run()
    with pytest.raises(NotProvisionedError, match="vmferry provision"):
        await StateStore.open(js, naming.state_bucket)


@pytest.fixture(scope="session")
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider, installed once (OpenTelemetry allows one global provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


async def test_trace_context_propagates_across_the_chain(
    js: JetStreamContext, naming: Naming, spans: InMemorySpanExporter
) -> None:
    toys = toychain.Toys()
    tracer = trace.get_tracer("tests")
    async with running(js, naming, toys.functions()):
        with tracer.start_as_current_span("operator submits") as root:
            await Publisher(js, naming).publish(toychain.event_of(toychain.discovered(), "traced-1"))
        trace_id = root.get_span_context().trace_id
        await eventually(lambda: events_of(js, naming, toychain.VM_KEY, "io.vmferry.volume.synced.v1"))
        stored = await events_of(js, naming, toychain.VM_KEY)
    names = {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    assert any(n.endswith("vm.discovered process") for n in names), names
    assert any(n.endswith("disk.snapshot.ready process") for n in names), names
    assert all(r.event is not None for r in stored)
