"""The function runner: pull, decode, call the handler, publish its events, then ack.

While a handler runs, ``in_progress`` heartbeats keep the message from being redelivered (steps may
take hours). Retryable failures are nak'ed with backoff; permanent ones and exhausted retries are
copied to the dead-letter stream, reported as ``migration.failed`` and terminated. Stopping (SIGTERM)
ends fetching, lets in-flight work finish, unsubscribes and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from vmferry.bus import tracing
from vmferry.bus.cloudevents import CloudEvent, decode
from vmferry.bus.deadletter import DeadLetters
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.bus.function import Emit, FunctionDef
from vmferry.bus.naming import Naming
from vmferry.bus.provision import require_consumer
from vmferry.bus.publisher import Publisher, follow_up
from vmferry.schemas.base import EventPayload

log = logging.getLogger(__name__)


@dataclass
class _Context:
    """The StepContext a handler receives."""

    msg: Msg
    delivery: int
    function: str

    async def heartbeat(self) -> None:
        await self.msg.in_progress()


class PullLoop:
    """Fetches from one durable consumer and runs ``process`` on each message, boundedly parallel."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        concurrency: int,
        process: Callable[[Msg], Awaitable[None]],
        fetch_timeout: float = 1.0,
    ) -> None:
        self._js = js
        self._stream = stream
        self._durable = durable
        self._concurrency = concurrency
        self._process = process
        self._fetch_timeout = fetch_timeout
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        """Stop fetching; in-flight messages still finish."""
        self._stopping.set()

    async def run(self) -> None:
        """Run until ``stop``; then wait for in-flight work and unsubscribe."""
        await require_consumer(self._js, self._stream, self._durable)
        sub = await self._js.pull_subscribe_bind(durable=self._durable, stream=self._stream)
        try:
            while not self._stopping.is_set():
                free = self._concurrency - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    messages = await sub.fetch(free, timeout=self._fetch_timeout)
                except TimeoutError:  # also nats.errors.TimeoutError (pitfall: both are raised)
                    continue
                for msg in messages:
                    task = asyncio.create_task(self._guarded(msg))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
        finally:
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            # unsubscribe before the connection closes: drain() would hang on a late 408 status
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self._process(msg)
        except Exception:
            # Nothing is acked here, so the server redelivers after ack_wait: nothing is lost.
            log.exception("unexpected error while processing %s on %s", msg.subject, self._durable)


class FunctionWorker:
    """Runs one registered function against its durable consumer."""

    def __init__(
        self,
        js: JetStreamContext,
        naming: Naming,
        function: FunctionDef[Any],
        dead_letters: DeadLetters,
        fetch_timeout: float = 1.0,
    ) -> None:
        self._naming = naming
        self._function = function
        self._publisher = Publisher(js, naming)
        self._dead_letters = dead_letters
        self.loop = PullLoop(
            js,
            naming.stream,
            naming.durable(function.name),
            function.concurrency,
            self.process,
            fetch_timeout,
        )

    async def process(self, msg: Msg) -> None:
        """Handle one message end to end; every outcome acks, naks or terminates it."""
        function = self._function
        delivery = msg.metadata.num_delivered or 1
        # Most handlers finish before the first heartbeat is due: start the heartbeat task only then.
        heartbeats: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            function.heartbeat_interval,
            lambda: heartbeats.append(asyncio.ensure_future(self._heartbeat(msg))),
        )
        event: CloudEvent[EventPayload] | None = None
        try:
            event = decode(msg.headers, msg.data, expect=function.consumes)
            with tracing.consumer_span(
                f"{msg.subject} process",
                msg.headers,
                {"messaging.consumer.group.name": function.name, "cloudevents.id": event.id},
            ):
                emits = await function.handler(event, _Context(msg, delivery, function.name))
                await self._publish(event, emits, tracing.carried(msg.headers))
        except PermanentError as error:
            await self._give_up(msg, event, error, delivery)
            return
        except Exception as error:
            if delivery >= function.max_deliver:
                await self._give_up(msg, event, error, delivery)
                return
            delay = error.delay if isinstance(error, RetryableError) else None
            delay = delay if delay is not None else function.retry.delay_for(delivery)
            log.warning(
                "%s: delivery %d of %s failed, retrying in %.1fs: %s",
                function.name, delivery, msg.subject, delay, error,
            )  # fmt: skip
            await msg.nak(delay=delay)
            return
        finally:
            timer.cancel()
            for heartbeat in heartbeats:
                heartbeat.cancel()
        # The follow-up events are durably stored before the input is acknowledged; a lost ack
        # only causes a redelivery whose outputs the stream drops as duplicates (same ids).
        await msg.ack()

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            with contextlib.suppress(Exception):
                await msg.in_progress()
            await asyncio.sleep(self._function.heartbeat_interval)

    async def _publish(
        self, event: CloudEvent[EventPayload], emits: Sequence[Emit], trace_headers: dict[str, str]
    ) -> None:
        self._function.check_emits(emits)  # all or nothing: no half-published batch
        for emit in emits:
            await self._publisher.publish(follow_up(self._function.name, event, emit), trace_headers)

    async def _give_up(
        self, msg: Msg, event: CloudEvent[EventPayload] | None, error: Exception, delivery: int
    ) -> None:
        cause, fix = _describe(error, delivery, self._function.max_deliver)
        log.error("%s gave up on %s: %s", self._function.name, msg.subject, cause)
        await self._dead_letters.bury(
            function=self._function.name,
            subject=msg.subject,
            headers=dict(msg.headers or {}),
            body=msg.data,
            stream_seq=msg.metadata.sequence.stream,
            event=event,
            cause=cause,
            fix=fix,
            retryable=not isinstance(error, PermanentError),
            deliveries=delivery,
        )
        await msg.term()


def _describe(error: Exception, delivery: int, max_deliver: int) -> tuple[str, str]:
    if isinstance(error, FerryError):
        cause, fix = error.cause, error.fix
    else:
        cause, fix = f"{type(error).__name__}: {error}", "see the function's log for the traceback"
    if not isinstance(error, PermanentError) and delivery >= max_deliver:
        cause = f"gave up after {delivery} deliveries; last error: {cause}"
        fix = fix or "fix the cause, then `vmferry replay` the VM"
    return cause, fix
