"""Generates the contract documentation: one JSON Schema per payload type and an AsyncAPI 3.0 document.

``render()`` is pure and deterministic, so a test can hold docs/ to it; run
``python -m vmferry.cli.contract_docs [OUT_DIR]`` to (re)write the files (default: the repository's docs/).
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgspec
import yaml

from vmferry.bus.cloudevents import JSON, MSG_ID, SPEC_VERSION
from vmferry.bus.naming import Naming
from vmferry.schemas.base import EventPayload
from vmferry.schemas.events import EVENT_TYPES, MigrationRequested
from vmferry.schemas.request import MigrationRequest
from vmferry.schemas.state import VmState

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: ``$id``s are names, not addresses: nothing is served there.
SCHEMA_ID_BASE = "urn:vmferry:schema:"
SCHEMAS_DIR = "schemas"
ASYNCAPI_FILE = "asyncapi.yaml"
REQUEST_FILE = f"{SCHEMAS_DIR}/migration-request.json"
STATE_FILE = f"{SCHEMAS_DIR}/vm-state.json"
#: What vmferry, seen from outside, takes in; every other event is something it publishes.
RECEIVED: tuple[type[EventPayload], ...] = (MigrationRequested,)

_VM_KEY_PATTERN = r"^(vm|req)-[A-Za-z0-9_-]{1,64}$"
_TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
# Ends in a zone designator: what CutoverPolicy.__post_init__ demands of ``at``.
_ZONED_TIME_PATTERN = r"([Zz]|[+-][0-9]{2}:?[0-9]{2})$"
_SELECTOR_FIELDS = ("name", "folder", "moref", "instance_uuid")


# ---------------------------------------------------------------------------------------------
# Rules the structs enforce in __post_init__, which msgspec cannot see. They are added to the
# generated definitions as ``allOf`` so producers that only read the schema are held to them too;
# tests/contract checks that code and schema agree on each.


def _is(field: str, value: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"const": value}}}


def _present(field: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"type": "string"}}}


_CROSS_FIELD_RULES: Mapping[str, Sequence[dict[str, Any]]] = {
    "VmSelector": (
        {
            "description": "Exactly one of name, folder, moref or instance_uuid is set (not null).",
            "oneOf": [_present(field) for field in _SELECTOR_FIELDS],
        },
    ),
    "CutoverPolicy": (
        {
            "description": "when = scheduled needs at.",
            "if": _is("when", "scheduled"),
            "then": _present("at"),
        },
        {
            "description": "at is an RFC 3339 time with a zone, e.g. 2026-12-01T22:00:00Z.",
            "properties": {
                "at": {
                    "anyOf": [
                        {"type": "string", "format": "date-time", "pattern": _ZONED_TIME_PATTERN},
                        {"type": "null"},
                    ]
                }
            },
        },
    ),
    "MigrationRequest": (
        {
            "description": (
                "options.transport = local needs options.local_disk_path and is cold only"
                " (a warm migration needs changed block tracking)."
            ),
            "if": {"required": ["options"], "properties": {"options": _is("transport", "local")}},
            "then": {"properties": {"mode": {"const": "cold"}, "options": _present("local_disk_path")}},
        },
        {
            "description": (
                "options.flavor_policy = explicit selects every VM by name; mappings.flavors must also"
                " name each of them (checked by vmferry, not expressible here)."
            ),
            "if": {"required": ["options"], "properties": {"options": _is("flavor_policy", "explicit")}},
            "then": {"properties": {"vms": {"items": _present("name")}}},
        },
    ),
}


def _with_cross_field_rules(definitions: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    result = dict(definitions)
    for name, rules in _CROSS_FIELD_RULES.items():
        if name in result:
            result[name] = {**result[name], "allOf": [dict(rule) for rule in rules]}
    return result


# ---------------------------------------------------------------------------------------------
# JSON Schema files


def _docstring(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def _json_schema(cls: type, schema_id: str, title: str) -> dict[str, Any]:
    generated = msgspec.json.schema(cls)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": schema_id,
        "title": title,
        "description": _docstring(cls),
        "$ref": generated["$ref"],
        "$defs": _with_cross_field_rules(generated["$defs"]),
    }


def event_schema_path(payload_type: type[EventPayload]) -> str:
    """Where the JSON Schema of one event's payload lives, relative to docs/."""
    return f"{SCHEMAS_DIR}/{payload_type.spec.subject_event}.json"


def event_schema(payload_type: type[EventPayload]) -> dict[str, Any]:
    """The JSON Schema of one event payload; its title is the CloudEvents type."""
    ce_type = payload_type.spec.ce_type
    return _json_schema(payload_type, f"{SCHEMA_ID_BASE}{ce_type}", ce_type)


def request_schema() -> dict[str, Any]:
    """The JSON Schema of the public input, the MigrationRequest."""
    return _json_schema(MigrationRequest, f"{SCHEMA_ID_BASE}migration-request", "MigrationRequest")


def state_schema() -> dict[str, Any]:
    """The JSON Schema of the per-VM state document kept in the KV bucket."""
    return _json_schema(VmState, f"{SCHEMA_ID_BASE}vm-state", "VmState")


# ---------------------------------------------------------------------------------------------
# AsyncAPI document

_COMPONENTS = "#/components/schemas/{name}"
_HEADERS_SCHEMA = "CloudEventsHeaders"


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _channel_id(payload_type: type[EventPayload]) -> str:
    # AsyncAPI ids allow letters, digits, '-' and '_' only.
    return payload_type.spec.subject_event.replace(".", "-")


def _operation_id(payload_type: type[EventPayload]) -> str:
    return f"{_action(payload_type)}-{_channel_id(payload_type)}"


def _action(payload_type: type[EventPayload]) -> str:
    return "receive" if payload_type in RECEIVED else "send"


def _summary(cls: type) -> str:
    return _docstring(cls).split("\n\n", 1)[0].replace("\n", " ")


def _headers_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": (
            "CloudEvents binary mode over NATS headers. Values are percent-encoded (UTF-8, upper-case hex)"
            " for space, '\"', '%' and anything outside printable ASCII; vmferry matches header names"
            " without regard to case when it reads them."
        ),
        "properties": {
            "ce-specversion": {"const": SPEC_VERSION},
            "ce-id": {
                "type": "string",
                "minLength": 1,
                "description": "Event id; vmferry derives it from its input, so reprocessing repeats it.",
            },
            "ce-source": {
                "type": "string",
                "minLength": 1,
                "description": (
                    "URI-reference of the producer; vmferry's functions use /vmferry/functions/<name>."
                ),
            },
            "ce-type": {"type": "string", "description": "The versioned type, io.vmferry.<event>.vN."},
            "ce-subject": {
                "type": "string",
                "pattern": _VM_KEY_PATTERN,
                "description": "The vm-key: the same token as the second part of the NATS subject.",
            },
            "ce-time": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC."},
            "ce-datacontenttype": {"const": JSON},
            MSG_ID: {
                "type": "string",
                "description": "Equals ce-id: JetStream drops a repeat within the stream's duplicate window.",
            },
            "traceparent": {
                "type": "string",
                "pattern": _TRACEPARENT_PATTERN,
                "description": "W3C trace context of the producer's span, when tracing is active.",
            },
            "tracestate": {"type": "string", "description": "W3C trace state, passed along unchanged."},
        },
        "required": ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-subject"],
    }


def _message_headers(payload_type: type[EventPayload]) -> dict[str, Any]:
    own: dict[str, Any] = {"properties": {"ce-type": {"const": payload_type.spec.ce_type}}}
    if _action(payload_type) == "send":
        # What vmferry publishes always carries these; producers of input may leave them out.
        own["required"] = ["ce-time", "ce-datacontenttype", MSG_ID]
    return {"allOf": [_ref(_COMPONENTS.format(name=_HEADERS_SCHEMA)), own]}


def _message(payload_type: type[EventPayload]) -> dict[str, Any]:
    spec = payload_type.spec
    return {
        "name": spec.ce_type,
        "title": spec.subject_event,
        "summary": _summary(payload_type),
        "contentType": JSON,
        "headers": _message_headers(payload_type),
        "payload": _ref(_COMPONENTS.format(name=payload_type.__name__)),
    }


def _channel(payload_type: type[EventPayload], naming: Naming) -> dict[str, Any]:
    message_id = payload_type.__name__
    return {
        "address": naming.subject("{vmKey}", payload_type),
        "title": payload_type.spec.subject_event,
        "description": (
            f"{_summary(payload_type)} A consumer of this event for all VMs filters on"
            f" {naming.consumer_filter(payload_type)}."
        ),
        "parameters": {"vmKey": _ref("#/components/parameters/vmKey")},
        "messages": {message_id: _ref(f"#/components/messages/{message_id}")},
    }


def _operation(payload_type: type[EventPayload]) -> dict[str, Any]:
    channel = _channel_id(payload_type)
    verb = "Other systems publish" if _action(payload_type) == "receive" else "vmferry publishes"
    return {
        "action": _action(payload_type),
        "channel": _ref(f"#/channels/{channel}"),
        "summary": f"{verb} {payload_type.spec.subject_event}.",
        "messages": [_ref(f"#/channels/{channel}/messages/{payload_type.__name__}")],
    }


def _description(naming: Naming) -> str:
    received = ", ".join(t.spec.subject_event for t in RECEIVED)
    return "\n".join(
        [
            "Events of the vmferry migration flow (VMware vSphere to OpenStack) on NATS JetStream.",
            "",
            f"Subjects are `<prefix>.<vm-key>.<event>`; the prefix defaults to `{naming.prefix}` and is"
            " configurable per installation, so the addresses below show the default. The vm-key is"
            " `vm-<32 hex>` derived from the vCenter instanceUuid (never from the VM name), or"
            " `req-<request id>` for request-level events. One VM's history is `<prefix>.<vm-key>.>`.",
            "",
            f"All events are stored in the JetStream stream `{naming.stream}` (subjects"
            f" `{naming.events_wildcard}`). Each function reads one event type through a durable pull"
            " consumer filtered on `<prefix>.*.<event>`. The per-VM state lives in the KV bucket"
            f" `{naming.state_bucket}` under the vm-key; its document is described by"
            f" `{STATE_FILE}`.",
            "",
            "Events travel as CloudEvents 1.0 in binary mode: the payload is the JSON body, the"
            " attributes are `ce-*` headers, `Nats-Msg-Id` equals `ce-id` (so a republished event is"
            " dropped as a duplicate) and W3C `traceparent` carries the trace. On input vmferry also"
            " accepts structured mode (`content-type: application/cloudevents+json`). Payloads reject"
            " unknown fields; secrets never travel in events: they name configured references.",
            "",
            f"Operations describe vmferry as one application seen from outside: it receives {received}"
            " (from the CLI, another system or the HTTP receiver) and sends every other event, which"
            " other systems may subscribe to. Internally, vmferry's own functions also consume"
            " several of the events it sends.",
        ]
    )


def asyncapi_document(naming: Naming | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document: one channel, message and operation per event type."""
    naming = naming or Naming()
    schemas, components = msgspec.json.schema_components(EVENT_TYPES, ref_template=_COMPONENTS)
    for payload_type, schema in zip(EVENT_TYPES, schemas, strict=True):
        # Messages refer to payloads by class name; msgspec must have filed them under it.
        if schema != _ref(_COMPONENTS.format(name=payload_type.__name__)):
            raise ValueError(f"msgspec filed {payload_type.__name__} as {schema}")
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "vmferry events",
            "version": version("vmferry"),
            "description": _description(naming),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": JSON,
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "Any JetStream-enabled NATS server provisioned by `vmferry provision`.",
            }
        },
        "channels": {_channel_id(t): _channel(t, naming) for t in EVENT_TYPES},
        "operations": {_operation_id(t): _operation(t) for t in EVENT_TYPES},
        "components": {
            "parameters": {
                "vmKey": {
                    "description": (
                        "vm-<32 hex> from the vCenter instanceUuid for VM events, req-<request id> for"
                        f" request-level events; always matches {_VM_KEY_PATTERN}."
                    ),
                    "examples": ["vm-4207aa1c2b3d4e5f60718293a4b5c6d7", "req-nightly-42"],
                }
            },
            "messages": {t.__name__: _message(t) for t in EVENT_TYPES},
            "schemas": {**_with_cross_field_rules(components), _HEADERS_SCHEMA: _headers_schema()},
        },
    }


# ---------------------------------------------------------------------------------------------
# Rendering and writing


def _json_text(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _yaml_text(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=True, allow_unicode=True, default_flow_style=False, width=100)


def render() -> dict[str, str]:
    """Every generated file, by its path relative to docs/, with its exact content."""
    files = {event_schema_path(t): _json_text(event_schema(t)) for t in EVENT_TYPES}
    if len(files) != len(EVENT_TYPES):
        raise ValueError("two event types share a subject event, so their schema files would collide")
    files[REQUEST_FILE] = _json_text(request_schema())
    files[STATE_FILE] = _json_text(state_schema())
    files[ASYNCAPI_FILE] = _yaml_text(asyncapi_document())
    return dict(sorted(files.items()))


def stale_files(out_dir: Path, rendered: Mapping[str, str]) -> list[Path]:
    """Schema files in ``out_dir`` that ``render()`` no longer produces (e.g. of a removed event)."""
    folder = out_dir / SCHEMAS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if f"{SCHEMAS_DIR}/{p.name}" not in rendered)


def write(out_dir: Path) -> list[Path]:
    """Write every rendered file under ``out_dir`` and delete stale schema files; return the written paths."""
    rendered = render()
    for stale in stale_files(out_dir, rendered):
        stale.unlink()
    written = []
    for relative, content in rendered.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def default_out_dir() -> Path:
    """The docs/ folder of the repository this module lives in (found through its real path)."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file():
            return folder / "docs"
    raise FileNotFoundError(f"{here} is not inside a vmferry checkout; pass the output folder")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry: ``python -m vmferry.cli.contract_docs [OUT_DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m vmferry.cli.contract_docs",
        description="Write vmferry's contract docs: JSON Schemas and the AsyncAPI document.",
    )
    parser.add_argument(
        "out_dir", nargs="?", type=Path, help="output folder (default: the repository's docs/)"
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir or default_out_dir()
    written = write(out_dir)
    print(f"wrote {len(written)} files under {out_dir}")


if __name__ == "__main__":
    main()
