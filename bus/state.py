"""The per-VM state store: typed documents in a JetStream KV bucket, updated by compare-and-set."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from vmferry.bus.errors import NotProvisionedError
from vmferry.schemas.state import VmState

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(VmState)

Mutation = Callable[[VmState | None], VmState | None]


class StateConflictError(RuntimeError):
    """Compare-and-set kept losing against other writers; the caller may retry later."""


class StateStore:
    """Reads and compare-and-set updates of VmState documents, one key per VM (or request)."""

    def __init__(self, kv: KeyValue, max_attempts: int = 50) -> None:
        self._kv = kv
        self._max_attempts = max_attempts

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str) -> StateStore:
        """Bind to the provisioned bucket (never creates it)."""
        try:
            return cls(await js.key_value(bucket))
        except BucketNotFoundError:
            raise NotProvisionedError(
                f"state bucket {bucket} does not exist", "run `vmferry provision`"
            ) from None

    async def get(self, key: str) -> tuple[VmState | None, int]:
        """The current document and its revision (0 when there is none)."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None, 0
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None, entry.revision or 0
        return _DECODER.decode(entry.value), entry.revision or 0

    async def update(
        self, key: str, mutate: Mutation, known: tuple[VmState | None, int] | None = None
    ) -> tuple[VmState | None, int]:
        """Apply ``mutate`` to the current document and write it back with compare-and-set.

        On a conflict the document is re-read and ``mutate`` applied again, so ``mutate`` must be
        a pure function of its input. Returning None (or the same document) writes nothing.
        ``known`` is a (document, revision) the caller believes current; it saves the first read
        and is simply corrected by the conflict when stale. Returns the document and revision.
        """
        for attempt in range(self._max_attempts):
            current, revision = known if known is not None else await self.get(key)
            known = None
            wanted = mutate(current)
            if wanted is None or wanted == current:
                return current, revision
            wanted = msgspec.structs.replace(wanted, updated_at=datetime.now(UTC))
            try:
                if revision == 0:
                    revision = await self._kv.create(key, _ENCODER.encode(wanted))
                else:
                    revision = await self._kv.update(key, _ENCODER.encode(wanted), last=revision)
            except KeyWrongLastSequenceError:
                if attempt:  # the first conflict may only mean a stale ``known``: retry at once
                    await asyncio.sleep(random.uniform(0, 0.005 * attempt))  # noqa: S311
                continue
            return wanted, revision
        raise StateConflictError(f"state of {key} changed under {self._max_attempts} attempts")

    async def history(self, key: str) -> list[VmState]:
        """Earlier revisions of a document, oldest first (as many as the bucket keeps)."""
        try:
            entries = await self._kv.history(key)
        except KeyNotFoundError:
            return []
        return [_DECODER.decode(e.value) for e in entries if e.value]

    async def keys(self) -> list[str]:
        """Every key in the bucket."""
        try:
            return sorted(await self._kv.keys())
        except Exception as exc:  # nats-py raises NoKeysError (a plain Error) on an empty bucket
            if type(exc).__name__ == "NoKeysError":
                return []
            raise

    async def watch(self, key: str = ">") -> AsyncIterator[VmState]:
        """Current documents, then every change as it happens."""
        watcher = await self._kv.watch(key)
        try:
            async for entry in watcher:
                if entry is not None and entry.value:
                    yield _DECODER.decode(entry.value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
