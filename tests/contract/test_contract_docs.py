"""The generated contract docs: fresh in docs/, and true to the code (real payloads, real headers)."""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tests.conftest import missing_component
from tests.contract.samples import EVENTS, REQUEST, STATE, VM_KEY
from vmferry.bus.cloudevents import CloudEvent, encode
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import source_of
from vmferry.cli import contract_docs
from vmferry.schemas.base import EventPayload
from vmferry.schemas.events import EVENT_TYPES, MigrationRequested
from vmferry.schemas.request import MigrationRequest
from vmferry.schemas.state import VmState

try:
    from jsonschema import Draft7Validator, Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7
except ImportError:  # the `validators` fixture reports it
    HAVE_JSONSCHEMA = False
else:
    HAVE_JSONSCHEMA = True

DOCS = Path(__file__).resolve().parents[2] / "docs"
REGENERATE = "run python -m vmferry.cli.contract_docs"
ASYNCAPI_URI = "urn:vmferry:test:asyncapi"
Validate = Callable[[dict[str, Any], Any], bool]

EVENT_CASES = [pytest.param(t, id=t.spec.subject_event) for t in EVENT_TYPES]
STRICT_DOCS = [
    *(
        pytest.param(contract_docs.event_schema_path(t), t, EVENTS[t], id=t.spec.subject_event)
        for t in EVENT_TYPES
    ),
    pytest.param(contract_docs.REQUEST_FILE, MigrationRequest, REQUEST, id="migration-request"),
]


@pytest.fixture(scope="module")
def validators() -> None:
    if not HAVE_JSONSCHEMA:
        missing_component("jsonschema", "pip install 'jsonschema>=4.18' (a test dependency of vmferry)")


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return contract_docs.render()


@pytest.fixture(scope="module")
def asyncapi(rendered: dict[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(rendered[contract_docs.ASYNCAPI_FILE])
    return document


def _schema(rendered: dict[str, str], relative: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(rendered[relative])
    return schema


def _valid(schema: dict[str, Any], instance: Any) -> bool:
    Draft202012Validator.check_schema(schema)
    return bool(Draft202012Validator(schema).is_valid(instance))


def _as_json(value: Any) -> Any:
    """What travels on the wire, read back as plain JSON data."""
    return json.loads(msgspec.json.encode(value))


def _decodes(cls: type, instance: Any) -> bool:
    try:
        msgspec.json.decode(json.dumps(instance).encode(), type=cls)
    except msgspec.ValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Freshness and determinism


def test_docs_folder_matches_render(rendered: dict[str, str]) -> None:
    differing = sorted(
        relative
        for relative, content in rendered.items()
        if not (DOCS / relative).is_file() or (DOCS / relative).read_text(encoding="utf-8") != content
    )
    on_disk = {
        f"{contract_docs.SCHEMAS_DIR}/{p.name}" for p in (DOCS / contract_docs.SCHEMAS_DIR).glob("*.json")
    }
    stale = sorted(on_disk - set(rendered))
    if differing or stale:
        pytest.fail(f"docs/ is out of date (differs: {differing}, stale: {stale}): {REGENERATE}")


def test_render_is_deterministic_and_sorted(rendered: dict[str, str]) -> None:
    assert contract_docs.render() == rendered
    assert list(rendered) == sorted(rendered)
    for relative, content in rendered.items():
        if relative.endswith(".json"):
            assert (
                content
                == json.dumps(json.loads(content), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            )
    text = rendered[contract_docs.ASYNCAPI_FILE]
    assert text == yaml.safe_dump(yaml.safe_load(text), sort_keys=True, allow_unicode=True, width=100)


def test_write_replaces_stale_schemas_and_main_uses_the_given_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rendered: dict[str, str]
) -> None:
    stale = tmp_path / "schemas" / "vm.vanished.json"
    stale.parent.mkdir()
    stale.write_text("{}", encoding="utf-8")
    contract_docs.main([str(tmp_path)])
    assert not stale.exists()
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == set(rendered)
    assert all((tmp_path / r).read_text(encoding="utf-8") == c for r, c in rendered.items())
    assert f"wrote {len(rendered)} files under {tmp_path}" in capsys.readouterr().out


def test_default_output_is_the_repository_docs_folder() -> None:
    assert contract_docs.default_out_dir() == DOCS


# ---------------------------------------------------------------------------------------------
# JSON Schemas


@pytest.mark.parametrize("payload_type", EVENT_CASES)
def test_event_schema_names_its_cloudevents_type(
    rendered: dict[str, str], payload_type: type[EventPayload]
) -> None:
    schema = _schema(rendered, contract_docs.event_schema_path(payload_type))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(payload_type.spec.ce_type)
    assert schema["title"] == payload_type.spec.ce_type
    assert schema["description"] == inspect.cleandoc(payload_type.__doc__ or "")
    assert schema["description"]


def test_schema_ids_are_unique(rendered: dict[str, str]) -> None:
    ids = [json.loads(c)["$id"] for r, c in rendered.items() if r.endswith(".json")]
    assert len(ids) == len(set(ids)) == len(EVENT_TYPES) + 2


@pytest.mark.usefixtures("validators")
@pytest.mark.parametrize(("relative", "cls", "sample"), STRICT_DOCS)
def test_schema_accepts_a_real_payload_and_rejects_an_unknown_field(
    rendered: dict[str, str], relative: str, cls: type, sample: Any
) -> None:
    schema = _schema(rendered, relative)
    payload = _as_json(sample)
    assert _decodes(cls, payload), "the sample itself must be valid"
    assert _valid(schema, payload)
    surprise = {**payload, "surprise": 1}
    assert not _decodes(cls, surprise)
    assert not _valid(schema, surprise)


@pytest.mark.usefixtures("validators")
def test_nested_unknown_fields_are_rejected_too(rendered: dict[str, str]) -> None:
    schema = _schema(rendered, contract_docs.event_schema_path(MigrationRequested))
    payload = _as_json(EVENTS[MigrationRequested])
    payload["request"]["options"]["colour"] = "blue"
    assert not _decodes(MigrationRequested, payload)
    assert not _valid(schema, payload)


@pytest.mark.usefixtures("validators")
def test_state_schema_accepts_a_real_document_and_agrees_with_the_decoder(rendered: dict[str, str]) -> None:
    schema = _schema(rendered, contract_docs.STATE_FILE)
    document = _as_json(STATE)
    assert _valid(schema, document)
    assert _valid(schema, _as_json(VmState(key=VM_KEY)))
    assert not _valid(schema, {**document, "phase": "teleported"})
    # VmState does not forbid unknown fields (unlike payloads); the schema must say the same.
    extended = {**document, "added_by_a_newer_version": 1}
    assert _valid(schema, extended) == _decodes(VmState, extended)


# Cross-field rules live in __post_init__; the schemas restate them. Each case: a change to a valid
# request, and whether the result is valid. Code and schema must both give that answer.
def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(request: dict[str, Any]) -> None:
        target = request
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value

    return change


def _all(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(request: dict[str, Any]) -> None:
        for one in changes:
            one(request)

    return change


RULE_CASES = [
    pytest.param(_set("vms", [{"name": "a", "folder": "f"}]), False, id="selector-two-keys"),
    pytest.param(_set("vms", [{}]), False, id="selector-no-key"),
    pytest.param(_set("vms", [{"name": "a", "folder": None}]), True, id="selector-one-key-and-a-null"),
    pytest.param(_set("vms", [{"moref": "vm-42"}]), True, id="selector-moref"),
    pytest.param(_set("cutover", {"when": "scheduled"}), False, id="scheduled-without-at"),
    pytest.param(_set("cutover", {"when": "scheduled", "at": None}), False, id="scheduled-null-at"),
    pytest.param(_set("cutover", {"when": "scheduled", "at": "2026-12-01T22:00:00"}), False, id="naive-at"),
    pytest.param(
        _set("cutover", {"when": "manual", "at": "2026-12-01T22:00:00"}), False, id="naive-at-manual"
    ),
    pytest.param(_set("cutover", {"when": "scheduled", "at": "2026-12-01T22:00:00Z"}), True, id="utc-at"),
    pytest.param(
        _set("cutover", {"when": "scheduled", "at": "2026-12-01T22:00:00+02:00"}), True, id="offset-at"
    ),
    pytest.param(_set("cutover", {"when": "manual"}), True, id="manual-without-at"),
    pytest.param(
        _all(_set("mode", "warm"), _set("options", {"transport": "local", "local_disk_path": "/mnt/ds"})),
        False,
        id="local-warm",
    ),
    pytest.param(
        _all(_set("mode", "cold"), _set("options", {"transport": "local"})), False, id="local-no-path"
    ),
    pytest.param(
        _all(_set("mode", "cold"), _set("options", {"transport": "local", "local_disk_path": "/mnt/ds"})),
        True,
        id="local-cold-with-path",
    ),
    pytest.param(
        _all(_set("options", {"flavor_policy": "explicit"}), _set("vms", [{"folder": "/dc/vm"}])),
        False,
        id="explicit-flavor-by-folder",
    ),
    pytest.param(
        _all(
            _set("options", {"flavor_policy": "explicit"}),
            _set("vms", [{"name": "web 01"}]),
            _set("mappings", {"flavors": {"web 01": "m1.small"}}),
        ),
        True,
        id="explicit-flavor-mapped",
    ),
]


def _changed_request(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    request: dict[str, Any] = copy.deepcopy(_as_json(REQUEST))
    change(request)
    return request


@pytest.mark.usefixtures("validators")
@pytest.mark.parametrize(("change", "valid"), RULE_CASES)
def test_request_schema_and_code_agree_on_cross_field_rules(
    rendered: dict[str, str], change: Callable[[dict[str, Any]], None], valid: bool
) -> None:
    request = _changed_request(change)
    assert _decodes(MigrationRequest, request) is valid
    assert _valid(_schema(rendered, contract_docs.REQUEST_FILE), request) is valid
    event_schema = _schema(rendered, contract_docs.event_schema_path(MigrationRequested))
    assert _valid(event_schema, {"request": request}) is valid


@pytest.mark.usefixtures("validators")
def test_explicit_flavor_mapping_gap_is_documented(rendered: dict[str, str]) -> None:
    # JSON Schema cannot relate vms[].name to mappings.flavors keys: the schema says so in words.
    request = _changed_request(
        _all(_set("options", {"flavor_policy": "explicit"}), _set("vms", [{"name": "a"}]))
    )
    schema = _schema(rendered, contract_docs.REQUEST_FILE)
    assert not _decodes(MigrationRequest, request)
    assert _valid(schema, request)
    rules = schema["$defs"]["MigrationRequest"]["allOf"]
    assert any("mappings.flavors" in rule["description"] for rule in rules)


# ---------------------------------------------------------------------------------------------
# AsyncAPI


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _pointer(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _channel_for(asyncapi: dict[str, Any], payload_type: type[EventPayload]) -> tuple[str, dict[str, Any]]:
    address = Naming().subject("{vmKey}", payload_type)
    found = [(cid, ch) for cid, ch in asyncapi["channels"].items() if ch["address"] == address]
    assert len(found) == 1, f"no single channel with address {address}"
    return found[0]


def test_asyncapi_is_version_3_with_resolvable_references(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    refs = [value for key, value in _walk(asyncapi) if key == "$ref"]
    assert refs
    for ref in refs:
        _pointer(asyncapi, ref)
    # AsyncAPI 3.0 schemas are a superset of JSON Schema draft 7: no 2019-09/2020-12-only keywords.
    newer = {"$defs", "prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentRequired"}
    assert not newer & {key for key, _ in _walk(asyncapi["components"]["schemas"])}


@pytest.mark.parametrize("payload_type", EVENT_CASES)
def test_asyncapi_has_channel_message_and_operation_per_event(
    asyncapi: dict[str, Any], payload_type: type[EventPayload]
) -> None:
    channel_id, channel = _channel_for(asyncapi, payload_type)
    assert set(channel["parameters"]) == {"vmKey"}
    (channel_message,) = channel["messages"].values()
    message = _pointer(asyncapi, channel_message["$ref"])
    assert message["name"] == payload_type.spec.ce_type
    assert message["contentType"] == "application/json"
    assert _pointer(asyncapi, message["payload"]["$ref"])["title"] == payload_type.__name__
    operations = [
        op for op in asyncapi["operations"].values() if op["channel"]["$ref"] == f"#/channels/{channel_id}"
    ]
    assert len(operations) == 1
    (operation,) = operations
    assert operation["action"] == ("receive" if payload_type is MigrationRequested else "send")
    assert [_pointer(asyncapi, m["$ref"]) for m in operation["messages"]] == [channel_message]


def test_asyncapi_has_nothing_but_the_event_types(asyncapi: dict[str, Any]) -> None:
    assert len(asyncapi["channels"]) == len(asyncapi["operations"]) == len(EVENT_TYPES)
    names = {m["name"] for m in asyncapi["components"]["messages"].values()}
    assert names == {t.spec.ce_type for t in EVENT_TYPES}
    assert "receive" in asyncapi["info"]["description"]


def _traced_headers() -> dict[str, str]:
    """Headers of a real encoded event, with the trace context the publisher injects."""
    span = NonRecordingSpan(
        SpanContext(
            trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
            span_id=0x00F067AA0BA902B7,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(span))
    assert "traceparent" in headers
    return headers


@pytest.mark.usefixtures("validators")
@pytest.mark.parametrize("payload_type", EVENT_CASES)
def test_asyncapi_message_matches_a_real_encoded_event(
    asyncapi: dict[str, Any], payload_type: type[EventPayload]
) -> None:
    headers, body = encode(
        CloudEvent(
            id="3f1d2c4b-0000-5000-8000-000000000001",
            type=payload_type.spec.ce_type,
            source=source_of("test"),
            subject=VM_KEY,
            data=EVENTS[payload_type],
        )
    )
    headers.update(_traced_headers())
    _, channel = _channel_for(asyncapi, payload_type)
    (channel_message,) = channel["messages"].values()
    message_ref = channel_message["$ref"]
    registry: Registry[Any] = Registry().with_resource(
        ASYNCAPI_URI, Resource.from_contents(asyncapi, default_specification=DRAFT7)
    )

    def check(part: str, instance: Any) -> bool:
        validator = Draft7Validator({"$ref": f"{ASYNCAPI_URI}{message_ref}/{part}"}, registry=registry)
        return bool(validator.is_valid(instance))

    assert check("headers", headers)
    assert check("payload", json.loads(body))
    assert not check("headers", {**headers, "ce-type": "io.vmferry.something.else.v1"})
    assert not check("headers", {k: v for k, v in headers.items() if k != "ce-subject"})
    assert not check("headers", {**headers, "ce-subject": "web 01"})
    assert not check("payload", {**json.loads(body), "surprise": 1})
