"""Building a MigrationRequest from a YAML/JSON file and command-line flags, and publishing it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import msgspec
import yaml

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import Publisher
from vmferry.cli.config import ConfigError
from vmferry.schemas.base import explain, request_key_for
from vmferry.schemas.events import MigrationRequested
from vmferry.schemas.request import MigrationRequest

CLI_SOURCE = "/vmferry/cli"


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left or not right:
            raise ConfigError(f"{flag} {value!r} must look like SOURCE=TARGET")
        pairs[left] = right
    return pairs


def load_request_file(path: Path) -> dict[str, Any]:
    """Read a request document (YAML or JSON)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read request file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"request file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"request file {path} must hold a mapping (see docs/schemas/migration-request.json)"
        )
    return data


def build_request(
    document: dict[str, Any],
    *,
    request_id: str | None = None,
    source: str | None = None,
    destination: str | None = None,
    vm_names: tuple[str, ...] = (),
    vm_uuids: tuple[str, ...] = (),
    vm_morefs: tuple[str, ...] = (),
    folders: tuple[str, ...] = (),
    mode: str | None = None,
    cutover: str | None = None,
    networks: tuple[str, ...] = (),
    flavors: tuple[str, ...] = (),
    volume_types: tuple[str, ...] = (),
) -> MigrationRequest:
    """Merge flags over a request document and validate it; errors name the field."""
    doc = dict(document)
    doc["request_id"] = request_id or doc.get("request_id") or uuid.uuid4().hex[:12]
    if source:
        doc["source"] = {**doc.get("source", {}), "name": source}
    if destination:
        doc["destination"] = {**doc.get("destination", {}), "cloud": destination}
    selectors = [{"name": n} for n in vm_names] + [{"instance_uuid": u} for u in vm_uuids]
    selectors += [{"moref": m} for m in vm_morefs] + [{"folder": f} for f in folders]
    if selectors:
        doc["vms"] = [*doc.get("vms", []), *selectors]
    if mode:
        doc["mode"] = mode
    if cutover:
        doc["cutover"] = {**doc.get("cutover", {}), "when": cutover}
    mappings = dict(doc.get("mappings", {}))
    for target, flag, values in (
        ("networks", "--network", networks),
        ("flavors", "--flavor", flavors),
        ("volume_types", "--volume-type", volume_types),
    ):
        pairs = _pairs(values, flag)
        if target == "networks":
            mappings[target] = {**mappings.get(target, {}), **{k: {"network": v} for k, v in pairs.items()}}
        elif pairs:
            mappings[target] = {**mappings.get(target, {}), **pairs}
    if mappings:
        doc["mappings"] = mappings
    try:
        return msgspec.convert(doc, MigrationRequest)
    except msgspec.ValidationError as exc:
        error = explain(exc)
        raise ConfigError(
            f"invalid migration request: {error}", "see docs/schemas/migration-request.json"
        ) from exc


def request_event(request: MigrationRequest, source: str = CLI_SOURCE) -> CloudEvent[MigrationRequested]:
    """The migration.requested event; its id is fixed per request id, so resubmitting dedupes."""
    return CloudEvent(
        id=f"request-{request.request_id}",
        type=MigrationRequested.spec.ce_type,
        source=source,
        subject=request_key_for(request.request_id),
        data=MigrationRequested(request=request),
    )


async def submit(publisher: Publisher, naming: Naming, request: MigrationRequest) -> bool:
    """Publish the request; returns True when the server had it already (a duplicate)."""
    ack = await publisher.publish(request_event(request))
    return bool(ack.duplicate)
