"""Bad input never stops a consumer and is never lost: each case yields a failure event with the
reason and a dead-letter copy, and good messages after it are still processed."""

from __future__ import annotations

import msgspec
import pytest
from nats.js import JetStreamContext

from tests import toychain
from tests.helpers import consumer_state, dead_letters, events_of, eventually, running
from vmferry.bus.cloudevents import STRUCTURED, CloudEvent, encode, structured
from vmferry.bus.errors import PermanentError
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import Publisher
from vmferry.cli.requests import build_request, submit
from vmferry.functions import Dependencies, build_registry
from vmferry.schemas import events as ev

FAILED = ev.MigrationFailed.spec.ce_type
SNAP = ev.DiskSnapshotReady.spec.ce_type
GOOD = toychain.discovered()


def _headers(ce_type: str = ev.VmDiscovered.spec.ce_type, event_id: str = "bad-1") -> dict[str, str]:
    headers, _ = encode(toychain.event_of(GOOD, event_id))
    headers["ce-type"] = ce_type
    return headers


def _without(field: str) -> bytes:
    raw = msgspec.to_builtins(GOOD)
    del raw[field]
    return msgspec.json.encode(raw)


def _with_extra() -> bytes:
    return msgspec.json.encode({**msgspec.to_builtins(GOOD), "password": "hunter2"})


CASES = {
    "malformed json": (_headers(), b'{"request_id": "r1", '),
    "not a cloudevent": ({}, msgspec.json.encode(GOOD)),
    "unknown type": (_headers("io.example.thing.v1"), msgspec.json.encode(GOOD)),
    "future version": (_headers("io.vmferry.vm.discovered.v7"), msgspec.json.encode(GOOD)),
    "missing field": (_headers(), _without("cpus")),
    "extra field": (_headers(), _with_extra()),
    "wrong type for subject": (_headers(ev.MigrationFailed.spec.ce_type), msgspec.json.encode(GOOD)),
    "bad percent-encoding": ({**_headers(), "ce-source": "%FF%FE"}, msgspec.json.encode(GOOD)),
}
EXPECTED = {
    "malformed json": "payload is invalid",
    "not a cloudevent": "not a CloudEvent",
    "unknown type": "unknown event type",
    "future version": "schema version this vmferry does not know",
    "missing field": "`cpus`",
    "extra field": "secrets never travel",
    "wrong type for subject": "expected io.vmferry.vm.discovered.v1 on this subject",
    "bad percent-encoding": "percent-encoded UTF-8",
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_event_becomes_failure_and_consumer_keeps_going(
    js: JetStreamContext, naming: Naming, case: str
) -> None:
    toys = toychain.Toys()
    headers, body = CASES[case]
    headers = {**headers, "Nats-Msg-Id": f"bad-{case}"}
    subject = naming.subject(toychain.VM_KEY, ev.VmDiscovered)
    async with running(js, naming, toys.functions()):
        await js.publish(subject, body, headers=headers)
        await Publisher(js, naming).publish(toychain.event_of(GOOD, "good-after-bad"))
        failed = await eventually(lambda: events_of(js, naming, toychain.VM_KEY, FAILED))
        await eventually(lambda: events_of(js, naming, toychain.VM_KEY, SNAP))
    data = failed[0].event.data  # type: ignore[union-attr]
    assert isinstance(data, ev.MigrationFailed)
    assert EXPECTED[case] in data.cause, data.cause
    assert data.fix and not data.retryable and data.failed_subject == subject
    assert "hunter2" not in data.cause
    assert len(await dead_letters(js, naming)) == 1
    info = await consumer_state(js, naming, "snapshot")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_structured_mode_is_accepted(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys()
    body = structured(toychain.event_of(GOOD, "structured-1"))
    async with running(js, naming, toys.functions()):
        await js.publish(
            naming.subject(toychain.VM_KEY, ev.VmDiscovered),
            body,
            headers={"content-type": f"{STRUCTURED}+json", "Nats-Msg-Id": "structured-1"},
        )
        await eventually(lambda: events_of(js, naming, toychain.VM_KEY, SNAP))
    assert toys.calls["snapshot"] == 1


async def test_unroutable_subject_key_is_reported(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys()
    async with running(js, naming, toys.functions()):
        await js.publish(f"{naming.prefix}.not_a_vm.vm.discovered", b"{}", headers={"Nats-Msg-Id": "u-1"})
        failed = await eventually(lambda: events_of(js, naming, "vm-unroutable", FAILED))
    assert "not a CloudEvent" in failed[0].event.data.cause  # type: ignore[union-attr]


async def test_handler_output_over_max_payload_fails_clearly(js: JetStreamContext, naming: Naming) -> None:
    toys = toychain.Toys(oversize=True)
    async with running(js, naming, toys.functions()):
        await Publisher(js, naming).publish(toychain.event_of(GOOD, "big-1"))
        failed = await eventually(lambda: events_of(js, naming, toychain.VM_KEY, FAILED))
    data = failed[0].event.data  # type: ignore[union-attr]
    assert "over the server's max_payload" in data.cause and data.step == "snapshot"


async def test_oversize_request_is_refused_before_sending(js: JetStreamContext, naming: Naming) -> None:
    names = tuple(f"vm-{i:05d}-" + "n" * 200 for i in range(6000))
    request = build_request({}, request_id="huge", source="vc", destination="lab", vm_names=names)
    registry = build_registry(Dependencies(frozenset({"vc"}), frozenset({"lab"})))
    async with running(js, naming, registry.select(["intake"])):
        with pytest.raises(PermanentError, match="max_payload"):
            await submit(Publisher(js, naming), naming, request)


HOSTILE = [
    "web.01",
    "web 01",
    "a*b",
    "a>b",
    'quote"d',
    "it's",
    "slash/name",
    "back\\slash",
    "Ωmega-ünï",
    "名前",
]


async def test_hostile_names_and_unknown_credentials(js: JetStreamContext, naming: Naming) -> None:
    registry = build_registry(Dependencies(frozenset({"vc"}), frozenset({"lab"})))
    async with running(js, naming, registry.select(["intake"])) as (_, store):
        publisher = Publisher(js, naming)
        good = build_request(
            {}, request_id="hostile", source="vc", destination="lab", vm_names=tuple(HOSTILE)
        )
        bad = build_request({}, request_id="nocreds", source="vc-typo", destination="lab", vm_names=("x",))
        await submit(publisher, naming, good)
        await submit(publisher, naming, bad)
        accepted = await eventually(lambda: _phase(store, "req-hostile", "accepted"))
        rejected = await eventually(lambda: _phase(store, "req-nocreds", "failed"))
    assert accepted.request_id == "hostile"
    assert rejected.failure is not None and "'vc-typo'" in rejected.failure.cause
    assert "configured: vc" in rejected.failure.cause and "sources" in rejected.failure.fix
    accepted_events = await events_of(js, naming, "req-hostile", ev.MigrationAccepted.spec.ce_type)
    names = [s.name for s in accepted_events[0].event.data.request.vms]  # type: ignore[union-attr]
    assert names == HOSTILE
    assert all(r.subject.count(".") == 3 for r in await events_of(js, naming, "req-hostile"))


async def _phase(store, key: str, phase: str):  # type: ignore[no-untyped-def]
    state, _ = await store.get(key)
    return state if state is not None and state.phase == phase else None


def test_event_payload_is_typed_on_decode() -> None:
    event = CloudEvent(id="1", type=SNAP, source="/t", subject=toychain.VM_KEY, data=GOOD)
    assert event.data.identity.name == "web 01"
