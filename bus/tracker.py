"""The tracker: folds every event into the per-VM state documents that `vmferry status` shows.

It is a built-in consumer of the whole event stream. A fetched batch is grouped by key so each
document gets one compare-and-set per batch; events at or below a document's last sequence are
skipped, so redeliveries never move a VM backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from functools import partial

from msgspec import structs
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from vmferry.bus.cloudevents import CloudEvent, decode
from vmferry.bus.errors import FerryError
from vmferry.bus.naming import Naming
from vmferry.bus.provision import TRACKER, require_consumer
from vmferry.bus.publisher import function_of
from vmferry.bus.state import StateStore
from vmferry.schemas import events as ev
from vmferry.schemas.base import EventPayload, request_key_for
from vmferry.schemas.state import DiskProgress, FailureRecord, Phase, StepRecord, VmState

log = logging.getLogger(__name__)

Fold = Callable[[VmState], VmState]

#: How many documents the tracker remembers (with their revision) to skip a read per batch.
_KNOWN_KEYS = 20_000

_PHASE_OF: dict[type[EventPayload], Phase] = {
    ev.MigrationRequested: "requested",
    ev.MigrationAccepted: "accepted",
    ev.VmDiscovered: "discovered",
    ev.DiskSnapshotReady: "snapshotting",
    ev.VolumeSynced: "syncing",
    ev.VmSynced: "synced",
    ev.CbtDeltaRequested: "snapshotting",
    ev.CutoverRequested: "cutover",
    ev.ConversionDone: "converted",
    ev.InstanceCreated: "launched",
    ev.MigrationCompleted: "completed",
    ev.MigrationFailed: "failed",
}


def _fold_payload(state: VmState, data: EventPayload, at: datetime) -> VmState:
    """Apply the payload-specific part of an event."""
    match data:
        case ev.MigrationRequested(request=request) | ev.MigrationAccepted(request=request):
            return structs.replace(state, request_id=request.request_id)
        case ev.VmDiscovered():
            return structs.replace(state, request_id=data.request_id, name=data.identity.name)
        case ev.DiskSnapshotReady():
            return structs.replace(state, pass_no=max(state.pass_no, data.pass_no))
        case ev.VolumeSynced():
            disks = dict(state.disks)
            previous = disks.get(str(data.disk_key), DiskProgress())
            disks[str(data.disk_key)] = structs.replace(
                previous,
                change_id=data.change_id,
                pass_no=data.pass_no,
                bytes_done=data.bytes_total,
                bytes_total=data.bytes_total,
                volume_id=data.volume_id,
                eta_s=0.0,
            )
            synced = sum(1 for d in disks.values() if d.pass_no == data.pass_no)
            phase: Phase = "synced" if synced >= data.disk_count else "syncing"
            return structs.replace(state, disks=disks, phase=phase)
        case ev.MigrationFailed():
            return structs.replace(state, failure=_failure_record(data, at))
        case _:
            return state


def _failure_record(data: ev.MigrationFailed, at: datetime) -> FailureRecord:
    return FailureRecord(
        step=data.step,
        cause=data.cause,
        fix=data.fix,
        retryable=data.retryable,
        failed_event_id=data.failed_event_id,
        failed_subject=data.failed_subject,
        failed_stream_seq=data.failed_stream_seq,
        at=at,
    )


def fold(state: VmState, event: CloudEvent[EventPayload], seq: int) -> VmState:
    """The state after ``event`` (stream sequence ``seq``); pure, so CAS retries can re-apply it."""
    if seq <= state.last_event_seq:
        return state
    data = event.data
    step = data.step if isinstance(data, ev.MigrationFailed) else function_of(event.source)
    steps = dict(state.steps)
    steps[step] = StepRecord(
        status="failed" if isinstance(data, ev.MigrationFailed) else "done",
        event_id=event.id,
        event_type=event.type,
        stream_seq=seq,
        at=event.time,
    )
    state = structs.replace(
        state,
        phase=_PHASE_OF.get(type(data), state.phase),
        steps=steps,
        last_event_type=event.type,
        last_event_seq=seq,
        failure=None if not isinstance(data, ev.MigrationFailed) else state.failure,
    )
    return _fold_payload(state, data, event.time)


def _fold_at(event: CloudEvent[EventPayload], seq: int, state: VmState) -> VmState:
    return fold(state, event, seq)


def _link_vm(vm_key: str) -> Fold:
    """The request document learns which VMs it produced."""

    def apply(state: VmState) -> VmState:
        if vm_key in state.vm_keys:
            return state
        return structs.replace(state, vm_keys=[*state.vm_keys, vm_key])

    return apply


class Tracker:
    """Consumes all events and keeps the state documents current."""

    def __init__(
        self,
        js: JetStreamContext,
        naming: Naming,
        store: StateStore,
        batch: int = 256,
        fetch_timeout: float = 1.0,
    ) -> None:
        self._js = js
        self._naming = naming
        self._store = store
        self._batch = batch
        self._fetch_timeout = fetch_timeout
        self._stopping = asyncio.Event()
        self._known: dict[str, tuple[VmState | None, int]] = {}

    def stop(self) -> None:
        """Stop after the current batch."""
        self._stopping.set()

    async def run(self) -> None:
        """Fetch, fold and ack until stopped."""
        durable = self._naming.durable(TRACKER)
        await require_consumer(self._js, self._naming.stream, durable)
        sub = await self._js.pull_subscribe_bind(durable=durable, stream=self._naming.stream)
        try:
            while not self._stopping.is_set():
                try:
                    messages = await sub.fetch(self._batch, timeout=self._fetch_timeout)
                except TimeoutError:
                    continue
                try:
                    await self.apply(messages)
                except Exception:
                    log.exception("tracker batch failed; it will be redelivered")
                    continue
                for msg in messages:
                    await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def apply(self, messages: list[Msg]) -> None:
        """Fold a batch into the documents it touches, one CAS per document."""
        folds: dict[str, list[Fold]] = defaultdict(list)
        for msg in messages:
            seq = msg.metadata.sequence.stream
            try:
                event = decode(msg.headers, msg.data)
            except FerryError as error:
                log.warning("tracker skips undecodable %s: %s", msg.subject, error)
                continue
            key = self._naming.vm_key_of(msg.subject)
            if key is None:
                continue
            folds[key].append(partial(_fold_at, event, seq))
            if isinstance(event.data, ev.VmDiscovered):
                folds[request_key_for(event.data.request_id)].append(_link_vm(key))
        await asyncio.gather(*(self._update(key, fs) for key, fs in folds.items()))

    async def _update(self, key: str, fs: list[Fold]) -> None:
        def mutate(current: VmState | None) -> VmState:
            state = current or VmState(key=key)
            for f in fs:
                state = f(state)
            return state

        # The tracker writes most revisions itself, so its last write is usually still current.
        self._known[key] = await self._store.update(key, mutate, self._known.pop(key, None))
        while len(self._known) > _KNOWN_KEYS:
            self._known.pop(next(iter(self._known)))
