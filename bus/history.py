"""Reading one VM's event history from the stream, in order, without disturbing any consumer."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext, api

from vmferry.bus.cloudevents import CloudEvent, decode
from vmferry.bus.errors import FerryError
from vmferry.bus.naming import Naming
from vmferry.schemas.base import EventPayload


@dataclass(frozen=True)
class Recorded:
    """An event as stored: its stream sequence, subject and decoded form (or why it is unreadable)."""

    seq: int
    subject: str
    event: CloudEvent[EventPayload] | None
    problem: str = ""


async def history(js: JetStreamContext, naming: Naming, key: str, batch: int = 256) -> list[Recorded]:
    """Every event of ``key`` (a vm- or req- key) in stream order."""
    # The filter goes in the subject argument: nats-py replaces config.filter_subject with it.
    sub = await js.pull_subscribe(
        naming.vm_history(key),
        stream=naming.stream,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=5.0,
        ),
    )
    found: list[Recorded] = []
    try:
        info = await sub.consumer_info()
        remaining = info.num_pending or 0
        while remaining > 0:
            try:
                messages = await sub.fetch(min(batch, remaining), timeout=2.0)
            except TimeoutError:
                break
            for msg in messages:
                remaining = msg.metadata.num_pending or 0
                found.append(_recorded(msg.metadata.sequence.stream, msg.subject, msg.headers, msg.data))
    finally:
        await sub.unsubscribe()
    return found


def _recorded(seq: int, subject: str, headers: dict[str, str] | None, body: bytes) -> Recorded:
    try:
        return Recorded(seq, subject, decode(headers, body))
    except FerryError as error:
        return Recorded(seq, subject, None, str(error))
