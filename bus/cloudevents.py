"""CloudEvents over NATS: binary mode (``ce-*`` headers) on output, binary and structured on input.

Implements the CloudEvents NATS protocol binding: header values are percent-encoded (UTF-8,
upper-case hex) for space, ``"``, ``%`` and anything outside printable ASCII; header names are
matched case-insensitively; ``Nats-Msg-Id`` carries the event id so JetStream deduplicates.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

import msgspec

from vmferry.bus.errors import PermanentError
from vmferry.schemas.base import EventPayload, explain
from vmferry.schemas.events import BY_CE_TYPE, TYPE_PREFIX

P = TypeVar("P", bound=EventPayload)

SPEC_VERSION = "1.0"
JSON = "application/json"
STRUCTURED = "application/cloudevents"
MSG_ID = "Nats-Msg-Id"

# Printable ASCII other than space, '"' and '%' travels as-is (the binding's rule).
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_ID_KEY = b"vmferry-event-id-v1"
_NEEDS_ENCODING = re.compile(r'[^\x21-\x7e]|["%]')
_VERSIONED = re.compile(r"^(?P<base>.+)\.v(?P<version>[0-9]+)$")
_REQUIRED = ("id", "source", "type", "specversion")


class MalformedEventError(PermanentError):
    """A message is not a CloudEvent vmferry understands; the cause says what is wrong."""

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(
            cause, fix or "fix the producer: events must follow docs/asyncapi.yaml and docs/schemas/"
        )


@dataclass(frozen=True)
class CloudEvent(Generic[P]):
    """A decoded event: CloudEvents attributes plus the typed payload."""

    id: str
    type: str
    source: str
    subject: str
    data: P
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    extensions: Mapping[str, str] = field(default_factory=dict)


def derived_id(*parts: str) -> str:
    """A deterministic event id: the same inputs always give the same id (so replays dedupe).

    128 bits of BLAKE2b over the parts, as 32 hex characters (header- and subject-safe).
    """
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16, key=_ID_KEY).hexdigest()


def _encode_value(value: str) -> str:
    # Most attribute values are plain ASCII: skip the encoder for them (a hot path).
    return quote(value, safe=_SAFE) if _NEEDS_ENCODING.search(value) else value


def encode(event: CloudEvent[Any]) -> tuple[dict[str, str], bytes]:
    """Encode an event in binary mode: headers (incl. Nats-Msg-Id) and the JSON data bytes."""
    attrs = {
        "specversion": SPEC_VERSION,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "time": event.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": JSON,
        **event.extensions,
    }
    headers = {f"ce-{name}": _encode_value(value) for name, value in attrs.items()}
    headers[MSG_ID] = event.id
    return headers, msgspec.json.encode(event.data)


class _Structured(msgspec.Struct, kw_only=True):
    specversion: str | None = None
    id: str | None = None
    source: str | None = None
    type: str | None = None
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    data_base64: str | None = None


_STRUCTURED_DECODER = msgspec.json.Decoder(_Structured)
_DATA_DECODERS: dict[type[EventPayload], msgspec.json.Decoder[Any]] = {}


def _decoder(payload_type: type[P]) -> msgspec.json.Decoder[P]:
    decoder = _DATA_DECODERS.get(payload_type)
    if decoder is None:
        decoder = msgspec.json.Decoder(payload_type)
        _DATA_DECODERS[payload_type] = decoder
    return decoder


def resolve_type(ce_type: str) -> type[EventPayload]:
    """Map a CloudEvents type to its payload class, explaining unknown and future versions."""
    payload_type = BY_CE_TYPE.get(ce_type)
    if payload_type is not None:
        return payload_type
    match = _VERSIONED.match(ce_type)
    if match:
        known = [t for t in BY_CE_TYPE if t.startswith(match.group("base") + ".v")]
        if known:
            raise MalformedEventError(
                f"event type {ce_type!r} has a schema version this vmferry does not know"
                f" (it knows {', '.join(sorted(known))})",
                "upgrade the vmferry functions, or have the producer publish a supported version",
            )
    raise MalformedEventError(
        f"unknown event type {ce_type!r}",
        f"publish one of the documented types ({TYPE_PREFIX}*.vN, see docs/asyncapi.yaml)",
    )


def _parse_time(raw: str | None) -> datetime:
    if not raw:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedEventError(f"ce-time {raw!r} is not an RFC 3339 time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _attrs_from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("ce-"):
            text = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
            attrs[lower[3:]] = unquote(text, errors="strict") if "%" in text else text
    return attrs


def decode(
    headers: Mapping[str, str] | None, body: bytes, expect: type[EventPayload] | None = None
) -> CloudEvent[EventPayload]:
    """Decode a message in binary or structured mode into a typed CloudEvent.

    ``expect`` is the type a consumer's subject carries; another type is refused before its
    payload is parsed. Raises MalformedEventError (permanent) with a cause that names the problem.
    """
    headers = headers or {}
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    try:
        if content_type.lower().startswith(STRUCTURED):
            attrs, data = _structured_parts(body)
        else:
            attrs, data = _attrs_from_headers(headers), body
    except UnicodeDecodeError as exc:
        raise MalformedEventError("a ce-* header is not valid percent-encoded UTF-8") from exc
    missing = [name for name in _REQUIRED if not attrs.get(name)]
    if missing:
        raise MalformedEventError(
            f"not a CloudEvent: missing {', '.join(missing)}",
            "publish with ce-* headers (binary mode) or a structured application/cloudevents+json body",
        )
    if attrs["specversion"] != SPEC_VERSION:
        raise MalformedEventError(f"CloudEvents specversion {attrs['specversion']!r} is not 1.0")
    payload_type = resolve_type(attrs["type"])
    if expect is not None and payload_type is not expect:
        raise MalformedEventError(
            f"expected {expect.spec.ce_type} on this subject, got {attrs['type']}",
            "publish each event type on its own subject: <prefix>.<vm-key>.<event>",
        )
    content = attrs.get("datacontenttype", JSON)
    if content.split(";")[0].strip().lower() not in (JSON, "text/json"):
        raise MalformedEventError(f"datacontenttype {content!r} is not JSON")
    try:
        payload = _decoder(payload_type).decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        error = explain(exc)
        raise MalformedEventError(
            f"{attrs['type']} payload is invalid: {error}",
            "fix the producer so the payload matches the JSON Schema in docs/schemas/",
        ) from exc
    known = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype"}
    return CloudEvent(
        id=attrs["id"],
        type=attrs["type"],
        source=attrs["source"],
        subject=attrs.get("subject", ""),
        time=_parse_time(attrs.get("time")),
        data=payload,
        extensions={k: v for k, v in attrs.items() if k not in known},
    )


def _structured_parts(body: bytes) -> tuple[dict[str, str], bytes]:
    try:
        envelope = _STRUCTURED_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MalformedEventError(f"structured CloudEvent body is not valid JSON: {exc}") from exc
    if envelope.data_base64 is not None:
        raise MalformedEventError("data_base64 is not accepted: vmferry payloads are JSON")
    attrs = {
        name: value
        for name in ("specversion", "id", "source", "type", "subject", "time", "datacontenttype")
        if isinstance(value := getattr(envelope, name), str)
    }
    return attrs, bytes(envelope.data)


def structured(event: CloudEvent[Any]) -> bytes:
    """Encode an event in structured mode (used by the HTTP receiver's replies and by tests)."""
    document = {
        "specversion": SPEC_VERSION,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "time": event.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": JSON,
        "data": msgspec.to_builtins(event.data),
    }
    return msgspec.json.encode(document)
