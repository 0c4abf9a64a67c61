"""Publishing typed events: deterministic ids, binary CloudEvents headers and trace context."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nats.errors import MaxPayloadError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import NoStreamResponseError

from vmferry.bus import tracing
from vmferry.bus.cloudevents import CloudEvent, derived_id, encode
from vmferry.bus.errors import PermanentError, RetryableError
from vmferry.bus.function import Emit
from vmferry.bus.naming import Naming

_VM_KEY = re.compile(r"^(vm|req)-[A-Za-z0-9_-]{1,64}$")


def source_of(function: str) -> str:
    """The CloudEvents ``source`` of events a function emits."""
    return f"/vmferry/functions/{function}"


def follow_up(function: str, cause: CloudEvent[Any], emit: Emit) -> CloudEvent[Any]:
    """The event a function publishes for ``emit``; its id is derived from the input's id, so a
    redelivered input yields the same ids and the stream drops the repeats."""
    out_type = emit.data.spec.ce_type
    return CloudEvent(
        id=derived_id(cause.id, out_type, emit.vm_key, emit.key),
        type=out_type,
        source=source_of(function),
        subject=emit.vm_key,
        data=emit.data,
        extensions={"causationid": cause.id},
    )


def function_of(source: str) -> str:
    """The function name inside a ``source`` written by ``source_of`` (else the source itself)."""
    return source.rsplit("/", 1)[-1] if source.startswith("/vmferry/functions/") else source


class Publisher:
    """Publishes events to the event stream and waits for the server's acknowledgement."""

    def __init__(self, js: JetStreamContext, naming: Naming, timeout: float = 10.0) -> None:
        self._js = js
        self._naming = naming
        self._timeout = timeout

    async def publish(
        self,
        event: CloudEvent[Any],
        extra_headers: Mapping[str, str] | None = None,
    ) -> api.PubAck:
        """Publish one event; the id doubles as Nats-Msg-Id so a repeat is dropped as a duplicate."""
        if not _VM_KEY.match(event.subject):
            raise PermanentError(
                f"event subject key {event.subject!r} is not a VM key",
                "VM keys are derived from instanceUuids (vm-<hex>) or request ids (req-<id>)",
            )
        subject = self._naming.subject(event.subject, type(event.data))
        headers, body = encode(event)
        headers.update(extra_headers or {})
        with tracing.producer_span(
            f"{subject} publish",
            {"messaging.destination.name": subject, "cloudevents.id": event.id},
        ):
            tracing.inject(headers)
            return await self.publish_raw(subject, body, headers)

    async def publish_raw(self, subject: str, body: bytes, headers: dict[str, str]) -> api.PubAck:
        """Publish bytes as they are, mapping failures to retryable or permanent errors."""
        try:
            return await self._js.publish(subject, body, timeout=self._timeout, headers=headers)
        except MaxPayloadError as exc:
            raise PermanentError(
                f"event of {len(body)} bytes on {subject} is over the server's max_payload",
                "keep events small: put large data in the object store and refer to it",
            ) from exc
        except NoStreamResponseError as exc:
            raise RetryableError(
                f"no stream accepted {subject}", "run `vmferry provision` for this prefix"
            ) from exc
        except (NatsTimeoutError, TimeoutError) as exc:
            raise RetryableError(f"publishing {subject} timed out", "check the NATS server") from exc
