"""W3C trace context across NATS hops: inject ``traceparent`` on publish, extract it on consume.

Uses the OpenTelemetry API only. Without an SDK configured, no spans are made (they would be
no-ops at a real per-event cost) and incoming trace headers are passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind

_TRACER = trace.get_tracer("vmferry.bus")
_CONTEXT_HEADERS = ("traceparent", "tracestate")


def active() -> bool:
    """Whether an OpenTelemetry SDK is installed (the default provider is only a proxy)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def inject(headers: dict[str, str]) -> None:
    """Add the current trace context (``traceparent``, ``tracestate``) to outgoing headers."""
    if active():
        propagate.inject(headers)


def carried(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The incoming trace headers, to pass through when no SDK makes spans of its own."""
    if not headers or active():
        return {}
    return {k.lower(): v for k, v in headers.items() if k.lower() in _CONTEXT_HEADERS}


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """Read the trace context of an incoming message (header names matched case-insensitively)."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    return propagate.extract(lowered)


@contextmanager
def consumer_span(
    name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, str | int]
) -> Iterator[Span]:
    """A CONSUMER span, child of the producer's span carried in the message headers."""
    if not active():
        yield trace.INVALID_SPAN
        return
    with _TRACER.start_as_current_span(
        name,
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "nats", **attributes},
    ) as span:
        yield span


@contextmanager
def producer_span(name: str, attributes: Mapping[str, str | int]) -> Iterator[Span]:
    """A PRODUCER span around a publish; ``inject`` inside it links the consumer to it."""
    if not active():
        yield trace.INVALID_SPAN
        return
    with _TRACER.start_as_current_span(
        name, kind=SpanKind.PRODUCER, attributes={"messaging.system": "nats", **attributes}
    ) as span:
        yield span
