"""Copy checkpoints in the JetStream KV bucket, so a redelivered or restarted transfer resumes where
the last one stopped, on any worker.

``KvCheckpointSink`` is the data plane's ``CheckpointSink`` for one disk pass (one key). The copy
engine calls it from its copy thread: each call hands the KV operation to the event loop that opened
the sink and waits for the server's acknowledgement (a stored entry is durable once acknowledged).
The ``*_async`` twins serve code running on the loop itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import zlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from vmferry.adapters.dataplane.checkpoints import Checkpoint
from vmferry.bus.errors import RetryableError
from vmferry.bus.handles import BusHandle

log = logging.getLogger(__name__)
T = TypeVar("T")

#: values larger than this are stored zlib-compressed (many small CBT extents make long range lists)
_COMPRESS_ABOVE = 16 * 1024
_ZLIB_MARK = b"z"
_DECODER = msgspec.json.Decoder(Checkpoint)


def checkpoint_key(vm_key: str, request_id: str, disk_key: int, pass_no: int) -> str:
    """The KV key of one disk's copy in one pass of one request (all parts are subject-safe)."""
    return f"{vm_key}.{request_id}.disk{disk_key}.pass{pass_no}"


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """JSON, compressed when large (readable with `nats kv get` in the common case)."""
    data = msgspec.json.encode(checkpoint)
    return _ZLIB_MARK + zlib.compress(data) if len(data) > _COMPRESS_ABOVE else data


def decode_checkpoint(data: bytes) -> Checkpoint:
    """The inverse of ``encode_checkpoint``."""
    if data.startswith(_ZLIB_MARK):
        data = zlib.decompress(data[len(_ZLIB_MARK) :])
    return _DECODER.decode(data)


class KvCheckpointSink:
    """The checkpoint of one disk pass, kept under ``key`` in the checkpoint bucket."""

    def __init__(
        self, kv: KeyValue, key: str, loop: asyncio.AbstractEventLoop, timeout: float = 30.0
    ) -> None:
        self._kv = kv
        self.key = key
        self._loop = loop
        self._timeout = timeout

    @classmethod
    async def open(cls, bus: BusHandle, key: str, timeout: float = 30.0) -> KvCheckpointSink:
        """A sink bound to the running loop and the provisioned checkpoint bucket."""
        return cls(await bus.checkpoints(), key, asyncio.get_running_loop(), timeout)

    # ---- on the event loop ------------------------------------------------------------------------------

    async def load_async(self) -> Checkpoint | None:
        """The stored checkpoint; None when there is none, or it cannot be read (then logged)."""
        try:
            entry = await self._kv.get(self.key)
        except KeyNotFoundError:  # also KeyDeletedError: the key was cleared
            return None
        except NatsError as error:
            raise _unavailable("reading", self.key, error) from error
        if not entry.value:
            return None
        try:
            return decode_checkpoint(entry.value)
        except (msgspec.DecodeError, zlib.error) as error:
            # Starting over is always safe: the checkpoint only ever saves work.
            log.warning("checkpoint %s is unreadable (%s): starting the copy over", self.key, error)
            return None

    async def save_async(self, checkpoint: Checkpoint) -> None:
        """Store the checkpoint; returns once the server has it."""
        data = encode_checkpoint(checkpoint)
        try:
            await self._kv.put(self.key, data)
        except MaxPayloadError:
            # The previous (smaller) checkpoint stays: it claims less done, which is always safe.
            log.warning(
                "checkpoint %s (%d bytes) exceeds the NATS payload limit: keeping the previous one",
                self.key,
                len(data),
            )
        except NatsError as error:
            raise _unavailable("saving", self.key, error) from error

    async def clear_async(self) -> None:
        """Forget the checkpoint (the pass is recorded on the volume)."""
        try:
            await self._kv.purge(self.key)
        except NatsError as error:
            raise _unavailable("clearing", self.key, error) from error

    # ---- from the copy thread (the CheckpointSink protocol) ----------------------------------------------

    def load(self) -> Checkpoint | None:
        """``load_async`` on the sink's loop, waited for."""
        return self._wait(self.load_async())

    def save(self, checkpoint: Checkpoint) -> None:
        """``save_async`` on the sink's loop, waited for (durable when it returns)."""
        self._wait(self.save_async(checkpoint))

    def clear(self) -> None:
        """``clear_async`` on the sink's loop, waited for."""
        self._wait(self.clear_async())

    def _wait(self, operation: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            operation.close()
            raise RuntimeError("KvCheckpointSink: use the *_async methods on the event loop")
        future = asyncio.run_coroutine_threadsafe(operation, self._loop)
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RetryableError(
                f"the copy checkpoint {self.key} was not stored within {self._timeout:.0f} s",
                "check the NATS server (and that the process's event loop is not blocked); the copy resumes"
                " from the last stored checkpoint",
            ) from None


def _unavailable(doing: str, key: str, error: Exception) -> RetryableError:
    return RetryableError(
        f"{doing} the copy checkpoint {key} failed: {type(error).__name__}: {error}",
        "check the NATS server and that `vmferry provision` created the checkpoint bucket; retried later",
    )
