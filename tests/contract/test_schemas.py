"""The contract itself: request errors name the field, VM keys are safe subject tokens, names stay out."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import msgspec
import pytest

from tests.contract.samples import EVENTS, INSTANCE_UUID, REQUEST, VM_KEY
from vmferry.bus.cloudevents import CloudEvent, encode
from vmferry.bus.naming import Naming
from vmferry.schemas.base import (
    ContractError,
    explain,
    is_subject_token,
    request_key_for,
    to_builtins,
    vm_key_for,
)
from vmferry.schemas.events import (
    EVENT_TYPES,
    MigrationAccepted,
    MigrationRequested,
    VmDiscovered,
    VmIdentity,
)
from vmferry.schemas.request import DestinationRef, MigrationRequest, SourceRef, VmSelector

SECRETS_HINT = "secrets never travel"


def _request(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = copy.deepcopy(to_builtins(REQUEST))
    request.update(changes)
    return request


def _rejection(document: Any) -> ContractError:
    """Decode a request as the intake does, returning the explained error (it must fail)."""
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(json.dumps(document).encode(), type=MigrationRequest)
    return explain(caught.value)


# ---------------------------------------------------------------------------------------------
# MigrationRequest errors name the field


def test_sample_request_is_valid_and_round_trips() -> None:
    encoded = msgspec.json.encode(REQUEST)
    assert msgspec.json.decode(encoded, type=MigrationRequest) == REQUEST


@pytest.mark.parametrize("field", ["request_id", "source", "destination", "vms"])
def test_missing_required_field_is_named(field: str) -> None:
    document = _request()
    del document[field]
    error = _rejection(document)
    assert f"missing required field `{field}`" in str(error)
    assert SECRETS_HINT not in str(error)


def test_missing_nested_field_names_field_and_path() -> None:
    error = _rejection(_request(source={"datacenter": "DC0"}))
    assert "`name`" in str(error)
    assert error.path == "$.source"


@pytest.mark.parametrize(
    ("where", "path"), [((), "$"), (("options",), "$.options"), (("mappings",), "$.mappings")]
)
def test_extra_field_is_named_with_its_path(where: tuple[str, ...], path: str) -> None:
    document = _request()
    target = document
    for part in where:
        target = target[part]
    target["colour"] = "blue"
    error = _rejection(document)
    assert "unknown field `colour`" in str(error)
    assert error.path == path
    assert SECRETS_HINT not in str(error)


@pytest.mark.parametrize(
    "field", ["password", "Password", "passwd", "secret", "api_key", "apiKey", "token", "private_key"]
)
def test_secret_field_is_refused_with_the_fix_and_without_its_value(field: str) -> None:
    document = _request(source={"name": "vc-lab", field: "hunter2-do-not-echo"})
    error = _rejection(document)
    assert f"unknown field `{field}`" in str(error)
    assert SECRETS_HINT in str(error)
    assert "refer to it by name" in str(error)
    assert error.path == "$.source"
    assert "hunter2" not in str(error)


@pytest.mark.parametrize("field", ["passes", "bypass_checks", "compass"])
def test_unknown_field_that_merely_contains_pass_gets_no_secrets_hint(field: str) -> None:
    error = _rejection(_request(options={field: 1}))
    assert SECRETS_HINT not in str(error)


@pytest.mark.parametrize(
    ("vms", "got"),
    [
        ([{"name": "web 01", "folder": "/dc/vm"}], "got name, folder"),
        ([{"moref": "vm-42", "instance_uuid": INSTANCE_UUID}], "got moref, instance_uuid"),
        ([{}], "got none"),
        ([{"name": "ok"}, {"name": None, "folder": None}], "got none"),
    ],
)
def test_selector_needs_exactly_one_key(vms: list[dict[str, Any]], got: str) -> None:
    error = _rejection(_request(vms=vms))
    assert "exactly one of name, folder, moref or instance_uuid" in str(error)
    assert got in str(error)
    assert error.path == f"$.vms[{len(vms) - 1}]"


def test_selector_rejects_two_keys_in_python_too() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        VmSelector(name="web 01", moref="vm-42")


def test_scheduled_cutover_needs_at() -> None:
    error = _rejection(_request(cutover={"when": "scheduled"}))
    assert "cutover.at" in str(error)
    assert error.path == "$.cutover"


@pytest.mark.parametrize("when", ["scheduled", "manual"])
def test_naive_cutover_time_is_refused(when: str) -> None:
    error = _rejection(_request(cutover={"when": when, "at": "2026-12-01T22:00:00"}))
    assert "time zone" in str(error)
    assert error.path == "$.cutover"


@pytest.mark.parametrize(
    "at", ["2026-12-01T22:00:00Z", "2026-12-01T22:00:00+02:00", "2026-12-01T22:00:00.5-05:30"]
)
def test_zoned_cutover_time_is_accepted(at: str) -> None:
    request = msgspec.json.decode(
        json.dumps(_request(cutover={"when": "scheduled", "at": at})).encode(), type=MigrationRequest
    )
    assert request.cutover.at is not None
    assert request.cutover.at.utcoffset() is not None


def test_local_transport_is_cold_only() -> None:
    error = _rejection(_request(mode="warm", options={"transport": "local", "local_disk_path": "/mnt/ds1"}))
    assert "transport 'local' is cold only" in str(error)


def test_local_transport_needs_a_path() -> None:
    error = _rejection(_request(mode="cold", options={"transport": "local"}))
    assert "options.local_disk_path" in str(error)


def test_explicit_flavors_need_a_mapping_per_named_vm() -> None:
    error = _rejection(_request(vms=[{"name": "web 01"}], options={"flavor_policy": "explicit"}))
    assert "mappings.flavors" in str(error)
    assert "web 01" in str(error)


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_id", "has.dot"), ("request_id", ""), ("mode", "lukewarm"), ("vms", [])],
)
def test_bad_values_name_the_field(field: str, value: Any) -> None:
    error = _rejection(_request(**{field: value}))
    assert error.path == f"$.{field}"


# ---------------------------------------------------------------------------------------------
# VM keys


@pytest.mark.parametrize(
    "spelling",
    [
        INSTANCE_UUID,
        INSTANCE_UUID.upper(),
        INSTANCE_UUID.replace("-", ""),
        "{" + INSTANCE_UUID + "}",
        "urn:uuid:" + INSTANCE_UUID,
    ],
)
def test_vm_key_is_stable_across_uuid_spellings(spelling: str) -> None:
    assert vm_key_for(spelling) == VM_KEY == "vm-" + uuid.UUID(INSTANCE_UUID).hex


@pytest.mark.parametrize("instance_uuid", [str(uuid.uuid4()) for _ in range(5)] + [str(uuid.UUID(int=0))])
def test_vm_key_is_one_safe_subject_token(instance_uuid: str) -> None:
    key = vm_key_for(instance_uuid)
    assert is_subject_token(key)
    assert len(key) == 3 + 32
    assert all(c in "0123456789abcdef" for c in key[3:])
    subject = Naming().subject(key, VmDiscovered)
    assert subject.split(".") == ["ferry", key, "vm", "discovered"]
    assert Naming().vm_key_of(subject) == key


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-a-uuid",
        "4207aa1c-2b3d-4e5f-6071-8293a4b5c6dz",
        "4207aa1c",
        "vm.4207",
        "*",
        ">",
        "../etc/passwd",
    ],
)
def test_vm_key_refuses_what_is_not_a_uuid(bad: str) -> None:
    with pytest.raises(ContractError, match="is not a UUID") as caught:
        vm_key_for(bad)
    assert caught.value.path == "$.instance_uuid"


def test_request_key_is_a_safe_token_and_accepted_as_a_vm_key() -> None:
    longest = "r" * 64
    key = request_key_for(longest)
    assert is_subject_token(key.removeprefix("req-"))
    accepted = msgspec.json.decode(
        json.dumps({**to_builtins(EVENTS[VmDiscovered]), "vm_key": key}).encode(), type=VmDiscovered
    )
    assert accepted.vm_key == key


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "a/b", "é", "r" * 65, ""])
def test_request_key_refuses_unsafe_request_ids(bad: str) -> None:
    with pytest.raises(ContractError) as caught:
        request_key_for(bad)
    assert caught.value.path == "$.request_id"


# ---------------------------------------------------------------------------------------------
# Hostile VM names are data, never part of a subject

HOSTILE_NAMES = [
    "web.01",
    "web 01",
    "db*",
    "a>b",
    "ferry.vm-1.>",
    'say "hi"',
    "it's",
    "path/to\\vm",
    "ünïcødé-虚拟机",
    "tab\tand\nnewline",
    "%20encoded%",
    "   ",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_is_a_valid_selector_and_round_trips(name: str) -> None:
    request = MigrationRequest(
        request_id="r1",
        source=SourceRef(name="vc"),
        destination=DestinationRef(cloud="lab"),
        vms=[VmSelector(name=name)],
    )
    decoded = msgspec.json.decode(msgspec.json.encode(request), type=MigrationRequest)
    assert decoded.vms[0].name == name
    assert decoded.vms[0].describe() == f"name={name!r}"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_never_reaches_a_subject_or_header(name: str) -> None:
    naming = Naming()
    request = MigrationRequest(
        request_id="r1",
        source=SourceRef(name="vc"),
        destination=DestinationRef(cloud="lab"),
        vms=[VmSelector(name=name)],
    )
    discovered = msgspec.structs.replace(
        EVENTS[VmDiscovered],
        identity=VmIdentity(instance_uuid=INSTANCE_UUID, name=name),
    )
    routed = [
        (request_key_for(request.request_id), MigrationRequested(request=request)),
        (request_key_for(request.request_id), MigrationAccepted(request=request)),
        (vm_key_for(INSTANCE_UUID), discovered),
    ]
    for key, payload in routed:
        subject = naming.subject(key, type(payload))
        assert all(is_subject_token(token) for token in subject.split("."))
        headers, body = encode(
            CloudEvent(id="e-1", type=payload.spec.ce_type, source="/t", subject=key, data=payload)
        )
        assert headers["ce-subject"] == key
        assert name not in subject
        assert all(name not in value for value in headers.values())
        assert msgspec.json.decode(body, type=type(payload)) == payload


def test_every_event_type_has_a_distinct_safe_subject_event() -> None:
    events = [t.spec.subject_event for t in EVENT_TYPES]
    assert len(set(events)) == len(events)
    for event in events:
        assert all(is_subject_token(token) for token in event.split("."))
    for payload_type in EVENT_TYPES:
        assert payload_type.spec.ce_type == f"io.vmferry.{payload_type.spec.subject_event}.v1"
