"""Shared building blocks of the contract: the frozen struct base, identifiers and validation errors."""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Annotated, Any, ClassVar

import msgspec

#: A NATS subject token that is safe everywhere: no dots, spaces, wildcards or control characters.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
VmKey = Annotated[str, msgspec.Meta(pattern=r"^(vm|req)-[A-Za-z0-9_-]{1,64}$")]
RefName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.@-]{1,128}$")]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class Contract(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every payload: immutable, keyword-only, and strict about unknown fields."""


class ContractError(ValueError):
    """A payload does not match the contract; ``path`` names the offending field."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


_SECRET_WORDS = frozenset(
    {"password", "passwd", "pass", "passphrase", "secret", "token", "apikey", "privatekey"}
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def _names_a_secret(field: str) -> bool:
    """Whole-word match, so ``api_key`` and ``apiKey`` count but ``passes`` or ``bypass`` do not."""
    words = [w.lower() for w in _WORD.findall(field)]
    joined_pairs = {a + b for a, b in itertools.pairwise(words)}
    return bool(_SECRET_WORDS & (set(words) | joined_pairs))


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_AT_PATH = re.compile(r" - at `([^`]*)`$")


def explain(error: msgspec.ValidationError | msgspec.DecodeError) -> ContractError:
    """Turn a msgspec error into a ContractError that names the field and, for secrets, the fix."""
    text = str(error)
    path_match = _AT_PATH.search(text)
    path = path_match.group(1) if path_match else "$"
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown and _names_a_secret(unknown.group(1)):
        text += (
            "; secrets never travel in requests or events: configure the credential on the"
            " functions' side (config file, environment or secret) and refer to it by name"
        )
    return ContractError(text, path)


def vm_key_for(instance_uuid: str) -> str:
    """Derive the VM key (a NATS-safe subject token) from a vCenter instanceUuid.

    The key never depends on the VM name: names are not unique and may hold any character.
    """
    try:
        parsed = uuid.UUID(instance_uuid)
    except ValueError as exc:
        raise ContractError(f"instanceUuid {instance_uuid!r} is not a UUID", "$.instance_uuid") from exc
    return f"vm-{parsed.hex}"


def instance_uuid_of(vm_key: str) -> str:
    """The instanceUuid a VM key was derived from (the inverse of ``vm_key_for``)."""
    try:
        return str(uuid.UUID(vm_key.removeprefix("vm-")))
    except ValueError as exc:
        raise ContractError(f"{vm_key!r} is not a VM key (vm-<32 hex digits>)", "$.vm_key") from exc


def request_key_for(request_id: str) -> str:
    """Return the subject key under which request-level events (before discovery) are filed."""
    if not _TOKEN.match(request_id):
        raise ContractError(
            f"request id {request_id!r} must be 1-64 characters of letters, digits, '-' or '_'",
            "$.request_id",
        )
    return f"req-{request_id}"


def is_subject_token(value: str) -> bool:
    """Tell whether ``value`` can be used as one NATS subject token as-is."""
    return bool(_TOKEN.match(value))


class EventSpec(msgspec.Struct, frozen=True):
    """How one payload type travels: its CloudEvents type and the event part of its subject."""

    ce_type: str
    subject_event: str


class EventPayload(Contract, frozen=True, kw_only=True):
    """Base of every event payload; subclasses set ``spec``."""

    spec: ClassVar[EventSpec]


def to_builtins(value: Any) -> Any:
    """Render a contract value as plain JSON-compatible Python data."""
    return msgspec.to_builtins(value)
