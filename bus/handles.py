"""What handlers may use of the bus besides their input event: the per-VM state, the copy-checkpoint
bucket and the log store.

The registry is built before the process connects, so handlers hold a ``BusHandle`` that the runtime
binds once connected; a handler never sees a NATS client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from vmferry.bus.errors import NotProvisionedError, PermanentError
from vmferry.bus.naming import Naming
from vmferry.bus.state import StateStore

LOG_SCHEME = "nats-object://"


class NotBoundError(RuntimeError):
    """A handler used the bus before the runtime connected it (a wiring mistake)."""


@dataclass
class _Bound:
    js: JetStreamContext
    naming: Naming
    state: StateStore
    checkpoints: KeyValue | None = None
    logs: ObjectStore | None = None


class BusHandle:
    """A late-bound view of the bus for handlers."""

    def __init__(self) -> None:
        self._bound: _Bound | None = None

    def bind(self, js: JetStreamContext, naming: Naming, state: StateStore) -> None:
        """Connect the handle (done by the runtime or a test fixture)."""
        self._bound = _Bound(js, naming, state)

    @property
    def bound(self) -> bool:
        """Whether ``bind`` was called."""
        return self._bound is not None

    def _get(self) -> _Bound:
        if self._bound is None:
            raise NotBoundError("the bus handle is used before the process connected to NATS")
        return self._bound

    @property
    def state(self) -> StateStore:
        """The per-VM state store."""
        return self._get().state

    async def checkpoints(self) -> KeyValue:
        """The checkpoint bucket (provisioned by ``vmferry provision``)."""
        bound = self._get()
        if bound.checkpoints is None:
            try:
                bound.checkpoints = await bound.js.key_value(bound.naming.checkpoint_bucket)
            except NotFoundError:
                raise NotProvisionedError(
                    f"checkpoint bucket {bound.naming.checkpoint_bucket} does not exist",
                    "run `vmferry provision`",
                ) from None
        return bound.checkpoints

    async def _logs(self) -> ObjectStore:
        bound = self._get()
        if bound.logs is None:
            try:
                bound.logs = await bound.js.object_store(bound.naming.log_bucket)
            except NotFoundError:
                raise NotProvisionedError(
                    f"log store {bound.naming.log_bucket} does not exist", "run `vmferry provision`"
                ) from None
        return bound.logs

    async def store_log(self, name: str, path: Path) -> str:
        """Keep a log file in the object store; returns the reference events carry."""
        store = await self._logs()
        with path.open("rb") as stream:
            await store.put(name, stream)
        return f"{LOG_SCHEME}{self._get().naming.log_bucket}/{name}"

    async def read_log(self, reference: str) -> bytes:
        """The content of a stored log, by the reference an event carries."""
        bucket, _, name = reference.removeprefix(LOG_SCHEME).partition("/")
        if not reference.startswith(LOG_SCHEME) or bucket != self._get().naming.log_bucket:
            raise PermanentError(f"{reference!r} is not a log of this installation", "check the prefix")
        try:
            result = await (await self._logs()).get(name)
        except ObjectNotFoundError:
            raise PermanentError(f"log {name!r} is gone", "logs expire with the event stream") from None
        return result.data or b""
