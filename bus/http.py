"""CloudEvents over HTTP: an ingress for migration requests and a receiver for short functions.

Other systems (or a Knative broker) POST CloudEvents in binary (``ce-*`` headers) or structured
(``application/cloudevents+json``) mode. A migration request is published into JetStream as it is
(its id becomes ``Nats-Msg-Id``, so a resent request is dropped as a duplicate) unless a hosted
function consumes it; an event a hosted function consumes is handled by the very same handler the
JetStream runner calls, and what it emits is published to JetStream.

Status codes follow what Knative's delivery retries expect: 2xx done, 503 (with Retry-After)
retry later, 4xx never retry (the body says why; a failure event is published for the VM).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from nats.aio.client import Client

from vmferry.bus.cloudevents import CloudEvent, MalformedEventError, decode, derived_id
from vmferry.bus.deadletter import clip
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.bus.function import Emit, FunctionDef
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import Publisher, follow_up, source_of
from vmferry.schemas.base import EventPayload
from vmferry.schemas.events import MigrationFailed, MigrationRequested

log = logging.getLogger(__name__)

#: Requests are small; anything bigger is refused before it is read.
MAX_BODY = 1024 * 1024


def _as_nats_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """HTTP binary mode carries datacontenttype in Content-Type; the NATS binding in ce-."""
    converted = {k: v for k, v in headers.items() if k.lower().startswith("ce-")}
    content_type = headers.get("Content-Type", "")
    if content_type.lower().startswith("application/cloudevents"):
        converted["content-type"] = content_type
    elif content_type:
        converted["ce-datacontenttype"] = content_type
    return converted


@dataclass(frozen=True)
class _HttpContext:
    """StepContext for a handler called over HTTP (Knative retries are not counted here)."""

    function: str
    delivery: int = 1

    async def heartbeat(self) -> None:
        """Nothing to extend: the HTTP request is the lease."""


class HttpReceiver:
    """The aiohttp application: POST / takes one CloudEvent; GET /healthz tells NATS is connected."""

    def __init__(self, nc: Client, naming: Naming, functions: Iterable[FunctionDef[Any]] = ()) -> None:
        self._nc = nc
        self._naming = naming
        self._publisher = Publisher(nc.jetstream(), naming)
        self._hosted = {f.consumes.spec.ce_type: f for f in functions}

    def app(self) -> web.Application:
        """The web application to serve."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/", self.receive)
        app.router.add_get("/healthz", self.health)
        return app

    async def health(self, _: web.Request) -> web.Response:
        """200 while connected to NATS, 503 otherwise."""
        return web.json_response(
            {"nats": self._nc.is_connected}, status=200 if self._nc.is_connected else 503
        )

    async def receive(self, request: web.Request) -> web.Response:
        """Decode, then ingest or handle; every outcome is an explicit status with a reason."""
        body = await request.read()
        headers = _as_nats_headers(request.headers)
        ce_type = next((v for k, v in headers.items() if k.lower() == "ce-type"), "")
        function = self._hosted.get(ce_type)
        try:
            event = decode(headers, body, expect=function.consumes if function else None)
        except MalformedEventError as error:
            return _error(400, error)
        if function is not None:
            return await self._handle(function, event)
        if not isinstance(event.data, MigrationRequested):
            hosted = ", ".join(sorted(self._hosted)) or "none"
            return _error(
                400,
                PermanentError(
                    f"this endpoint takes migration requests and the hosted functions' events,"
                    f" not {event.type} (hosted: {hosted})",
                    "publish other events to NATS, or host their function here with --function",
                ),
            )
        try:
            ack = await self._publisher.publish(event)
        except RetryableError as error:
            return _error(503, error)
        except FerryError as error:
            return _error(400, error)
        return web.json_response(
            {"id": event.id, "key": event.subject, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate)},
            status=202,
        )

    async def _handle(self, function: FunctionDef[Any], event: CloudEvent[EventPayload]) -> web.Response:
        try:
            emits = await function.handler(event, _HttpContext(function.name))
            function.check_emits(emits)
            published = [await self._emit(function, event, e) for e in emits]
        except RetryableError as error:
            return _error(503, error)
        except FerryError as error:
            await self._report(function, event, error)
            return _error(422, error)
        except Exception as error:  # unexpected: let the sender retry, like the runner does
            log.exception("%s failed on %s", function.name, event.id)
            return _error(503, RetryableError(f"{type(error).__name__}: {error}", "see the log"))
        return web.json_response({"handled_by": function.name, "published": published}, status=200)

    async def _emit(self, function: FunctionDef[Any], event: CloudEvent[EventPayload], emit: Emit) -> str:
        out = follow_up(function.name, event, emit)
        await self._publisher.publish(out)
        return out.id

    async def _report(
        self, function: FunctionDef[Any], event: CloudEvent[EventPayload], error: FerryError
    ) -> None:
        """Publish migration.failed for the VM, as the JetStream runner does for permanent errors."""
        request_id = getattr(event.data, "request_id", "")
        if isinstance(event.data, MigrationRequested):
            request_id = event.data.request.request_id
        failed = MigrationFailed(
            request_id=str(request_id),
            vm_key=event.subject,
            step=function.name,
            cause=clip(error.cause),
            fix=clip(error.fix),
            retryable=False,
            failed_event_id=event.id,
            failed_event_type=event.type,
        )
        await self._publisher.publish(
            CloudEvent(
                id=derived_id(event.id, "failed", function.name, "http"),
                type=MigrationFailed.spec.ce_type,
                source=source_of(function.name),
                subject=event.subject,
                data=failed,
                extensions={"causationid": event.id},
            )
        )


def _error(status: int, error: FerryError) -> web.Response:
    headers = {"Retry-After": str(int(error.delay or 5))} if isinstance(error, RetryableError) else None
    return web.json_response({"error": error.cause, "fix": error.fix}, status=status, headers=headers)
