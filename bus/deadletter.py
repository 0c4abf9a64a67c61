"""Dead-lettering: a copy of the unprocessable message, plus a migration.failed event for humans.

Handlers that fail permanently are buried by the runner directly. Messages whose deliveries ran
out while no handler could answer (crashes, hangs) are found through the server's max-deliveries
advisories, which a stream keeps until this module's worker has handled them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from vmferry.bus.cloudevents import MSG_ID, CloudEvent, decode, derived_id
from vmferry.bus.errors import FerryError
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import Publisher, source_of
from vmferry.schemas.base import EventPayload
from vmferry.schemas.events import MigrationFailed, MigrationRequested

log = logging.getLogger(__name__)

_VM_KEY = re.compile(r"^(vm|req)-[A-Za-z0-9_-]{1,64}$")
_HEADER_UNSAFE = re.compile(r"[\r\n\x00-\x1f\x7f]")
UNROUTABLE_KEY = "vm-unroutable"


#: MigrationFailed.cause and .fix hold at most 4096 characters (the contract's NonEmpty)
_TEXT_LIMIT = 4000


def clip(text: str) -> str:
    """Keep a cause or fix within the contract's limit, saying that it was cut."""
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 15] + " [... clipped]"


def _header_value(text: str) -> str:
    return _HEADER_UNSAFE.sub(" ", text)[:1024]


def _request_id(event: CloudEvent[EventPayload] | None) -> str:
    if event is None:
        return ""
    if isinstance(event.data, MigrationRequested):
        return event.data.request.request_id
    return str(getattr(event.data, "request_id", ""))


class DeadLetters:
    """Files dead letters and the matching failure events."""

    def __init__(self, js: JetStreamContext, naming: Naming) -> None:
        self._js = js
        self._naming = naming
        self._publisher = Publisher(js, naming)

    async def bury(
        self,
        *,
        function: str,
        subject: str,
        headers: dict[str, str],
        body: bytes,
        stream_seq: int,
        event: CloudEvent[EventPayload] | None,
        cause: str,
        fix: str,
        retryable: bool,
        deliveries: int,
    ) -> None:
        """Copy the message to the dead-letter stream and publish migration.failed for its VM."""
        copy_headers = {k: v for k, v in headers.items() if k != MSG_ID}
        copy_headers.update(
            {
                MSG_ID: f"dlq-{self._naming.stream}-{stream_seq}-{function}",
                "Vmferry-Function": function,
                "Vmferry-Cause": _header_value(cause),
                "Vmferry-Stream-Seq": str(stream_seq),
                "Vmferry-Original-Subject": subject,
                "Vmferry-Deliveries": str(deliveries),
            }
        )
        ack = await self._publisher.publish_raw(
            self._naming.dlq_subject(function, subject), body, copy_headers
        )
        vm_key = self._naming.vm_key_of(subject) or ""
        if not _VM_KEY.match(vm_key):
            vm_key = UNROUTABLE_KEY
        original_id = event.id if event else headers.get(MSG_ID, f"seq-{stream_seq}")
        failed = MigrationFailed(
            request_id=_request_id(event),
            vm_key=vm_key,
            step=function,
            cause=clip(cause),
            fix=clip(fix),
            retryable=retryable,
            failed_event_id=event.id if event else None,
            failed_event_type=event.type if event else None,
            failed_subject=subject,
            failed_stream_seq=stream_seq,
            deliveries=deliveries,
            dead_letter_seq=ack.seq,
        )
        await self._publisher.publish(
            CloudEvent(
                id=derived_id(original_id, "failed", function, str(stream_seq)),
                type=MigrationFailed.spec.ce_type,
                source=source_of(function),
                subject=vm_key,
                data=failed,
                extensions={"causationid": original_id},
            )
        )


class _Advisory(msgspec.Struct):
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0


_ADVISORY = msgspec.json.Decoder(_Advisory)


class AdvisoryProcessor:
    """Turns max-deliveries advisories into dead letters and failure events."""

    def __init__(self, js: JetStreamContext, naming: Naming, dead_letters: DeadLetters) -> None:
        self._js = js
        self._naming = naming
        self._dead_letters = dead_letters

    def _function_of(self, consumer: str) -> str:
        return consumer.removeprefix(f"{self._naming.durable('')}")

    async def process(self, msg: Msg) -> None:
        """Handle one advisory; a malformed one is terminated (it cannot get better)."""
        try:
            advisory = _ADVISORY.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            log.exception("unreadable advisory on %s: %r", msg.subject, msg.data[:200])
            await msg.term()
            return
        try:
            original = await self._js.get_msg(advisory.stream, advisory.stream_seq)
        except NotFoundError:
            log.warning(
                "message %d of %s expired before dead-lettering",
                advisory.stream_seq,
                advisory.stream,
            )
            await msg.ack()
            return
        headers: dict[str, Any] = dict(original.headers or {})
        body = original.data or b""
        event: CloudEvent[EventPayload] | None
        try:
            event = decode(headers, body)
        except FerryError:
            event = None
        function = self._function_of(advisory.consumer)
        await self._dead_letters.bury(
            function=function,
            subject=original.subject or "",
            headers=headers,
            body=body,
            stream_seq=advisory.stream_seq,
            event=event,
            cause=(
                f"{function} gave up after {advisory.deliveries} deliveries with no answer:"
                " the handler crashed, was killed or hung past its ack wait each time"
            ),
            fix="check the function's log and host resources, then `vmferry replay` the VM",
            retryable=True,
            deliveries=advisory.deliveries,
        )
        await msg.ack()
