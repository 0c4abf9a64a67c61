"""Small async helpers shared by the bus tests: polling, a running runtime, stream reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from nats.js import JetStreamContext, api

from vmferry.bus.function import FunctionDef
from vmferry.bus.history import Recorded, history
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 20.0, every: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value: T | None = None
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


@asynccontextmanager
async def running(
    js: JetStreamContext,
    naming: Naming,
    functions: Sequence[FunctionDef[Any]],
    *,
    provisioned: bool = False,
) -> AsyncIterator[tuple[Runtime, StateStore]]:
    """Provision (unless done), run the runtime in the background, stop it gracefully afterwards."""
    if not provisioned:
        await provision(js, naming, functions)
    store = await StateStore.open(js, naming.state_bucket)
    runtime = Runtime(js, naming, functions, store, fetch_timeout=0.2)
    task = asyncio.create_task(runtime.run())
    try:
        yield runtime, store
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)


async def events_of(
    js: JetStreamContext, naming: Naming, key: str, ce_type: str | None = None
) -> list[Recorded]:
    """The stored events of a key, optionally of one type."""
    found = await history(js, naming, key)
    return [r for r in found if ce_type is None or (r.event is not None and r.event.type == ce_type)]


async def dead_letters(js: JetStreamContext, naming: Naming) -> list[Any]:
    """Every message in the dead-letter stream."""
    info = await js.stream_info(naming.dlq_stream)
    if not info.state.messages:
        return []
    seqs = range(info.state.first_seq, info.state.last_seq + 1)
    return [await js.get_msg(naming.dlq_stream, seq) for seq in seqs]


async def consumer_state(js: JetStreamContext, naming: Naming, function: str) -> api.ConsumerInfo:
    """The server's view of a function's consumer."""
    return await js.consumer_info(naming.stream, naming.durable(function))
