"""The KV checkpoint sink against a real nats-server: saved from a copy thread, loaded after a
"restart" (a new sink), compressed when large, cleared, and refused from the loop's own thread."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import JetStreamContext

from vmferry.adapters.dataplane import Checkpoint
from vmferry.bus.checkpoints import KvCheckpointSink, checkpoint_key, decode_checkpoint, encode_checkpoint
from vmferry.bus.errors import NotProvisionedError
from vmferry.bus.handles import BusHandle
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.state import StateStore

KEY = checkpoint_key("vm-0123456789abcdef0123456789abcdef", "req-1", 2000, 3)


def checkpoint(done: list[tuple[int, int]], complete: bool = False) -> Checkpoint:
    return Checkpoint(
        job="j",
        kind="cbt",
        disk_size=1 << 30,
        plan="p",
        done=done,
        bytes_done=sum(end - start for start, end in done),
        complete=complete,
    )


@pytest.fixture
async def bus(js: JetStreamContext, naming: Naming) -> BusHandle:
    await provision(js, naming, [])
    handle = BusHandle()
    handle.bind(js, naming, await StateStore.open(js, naming.state_bucket))
    return handle


async def test_saved_from_a_thread_and_found_by_a_new_sink(bus: BusHandle) -> None:
    assert KEY == "vm-0123456789abcdef0123456789abcdef.req-1.disk2000.pass3"
    sink = await KvCheckpointSink.open(bus, KEY)
    assert await asyncio.to_thread(sink.load) is None
    saved = checkpoint([(0, 4096), (65536, 131072)], complete=True)

    await asyncio.to_thread(sink.save, saved)  # the engine saves from its copy thread

    restarted = await KvCheckpointSink.open(bus, KEY)
    assert await restarted.load_async() == saved
    assert await asyncio.to_thread(restarted.load) == saved
    await asyncio.to_thread(restarted.clear)
    assert await sink.load_async() is None
    await sink.save_async(saved)  # a key can be used again after a clear
    assert await sink.load_async() == saved


async def test_a_long_range_list_is_compressed_and_round_trips(bus: BusHandle) -> None:
    many = checkpoint([(i * 131072, i * 131072 + 4096) for i in range(20000)])
    encoded = encode_checkpoint(many)
    assert encoded.startswith(b"z") and len(encoded) < 200_000
    assert decode_checkpoint(encoded) == many
    small = encode_checkpoint(checkpoint([(0, 512)]))
    assert small.startswith(b"{")
    sink = await KvCheckpointSink.open(bus, KEY)
    await sink.save_async(many)
    assert await sink.load_async() == many


async def test_an_unreadable_checkpoint_means_starting_over(
    bus: BusHandle, caplog: pytest.LogCaptureFixture
) -> None:
    kv = await bus.checkpoints()
    await kv.put(KEY, b"{not json")
    assert await (await KvCheckpointSink.open(bus, KEY)).load_async() is None
    assert "unreadable" in caplog.text


async def test_the_blocking_calls_refuse_the_event_loops_own_thread(bus: BusHandle) -> None:
    sink = await KvCheckpointSink.open(bus, KEY)
    with pytest.raises(RuntimeError, match="use the \\*_async methods"):
        sink.load()
    assert await asyncio.to_thread(sink.load) is None  # from any other thread it works


async def test_an_unprovisioned_bucket_is_an_actionable_error(js: JetStreamContext, naming: Naming) -> None:
    await js.create_key_value(bucket=naming.state_bucket)
    handle = BusHandle()
    handle.bind(js, naming, await StateStore.open(js, naming.state_bucket))
    with pytest.raises(NotProvisionedError, match="checkpoint bucket"):
        await KvCheckpointSink.open(handle, KEY)
