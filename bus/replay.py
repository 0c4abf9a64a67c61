"""Replay: re-drive a VM's migration from its last successful step.

The input of the failed step (or, with ``force``, the VM's latest event) is published again
under a new id derived from the original id and the replay generation. Running replay twice
therefore publishes the same id (JetStream drops the duplicate), and the state document's
compare-and-set lets only one replay of a generation through.
"""

from __future__ import annotations

from dataclasses import dataclass

from msgspec import structs
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from vmferry.bus.cloudevents import MSG_ID, derived_id
from vmferry.bus.errors import FerryError
from vmferry.bus.naming import Naming
from vmferry.bus.publisher import Publisher
from vmferry.bus.state import StateStore
from vmferry.schemas.state import VmState


class ReplayRefusedError(FerryError):
    """Replay would not help or would duplicate work; the cause says why."""


@dataclass(frozen=True)
class ReplayResult:
    """What replay re-published."""

    key: str
    generation: int
    subject: str
    event_id: str
    duplicate: bool


def _choose_seq(state: VmState, force: bool) -> int:
    if state.phase == "replaying" and not force:
        raise ReplayRefusedError(
            f"{state.key} is already being replayed (generation {state.replays})",
            "watch `vmferry status`; use --force only if that replay is known to be lost",
        )
    if state.phase == "completed" and not force:
        raise ReplayRefusedError(f"{state.key} completed; there is nothing to re-drive")
    if state.failure is not None and state.failure.failed_stream_seq:
        return state.failure.failed_stream_seq
    if not force:
        raise ReplayRefusedError(
            f"{state.key} has not failed (phase {state.phase}); its steps may still be running",
            "if it is stuck (e.g. a consumer was missing), replay with --force to re-drive its last event",
        )
    if state.last_event_seq:
        return state.last_event_seq
    raise ReplayRefusedError(f"{state.key} has no recorded event to re-drive")


async def replay(
    js: JetStreamContext, naming: Naming, store: StateStore, key: str, *, force: bool = False
) -> ReplayResult:
    """Re-publish the input that re-drives ``key``; see the module docstring for the guarantees."""
    state, _ = await store.get(key)
    if state is None:
        raise ReplayRefusedError(f"no state for {key}", "check the key with `vmferry status`")
    seq = _choose_seq(state, force)
    try:
        original = await js.get_msg(naming.stream, seq)
    except NotFoundError:
        raise ReplayRefusedError(
            f"event {seq} of {key} is no longer in stream {naming.stream} (expired or purged)",
            "start a new migration request for this VM",
        ) from None
    generation = state.replays + 1
    headers = dict(original.headers or {})
    original_id = headers.get(MSG_ID) or headers.get("ce-id") or f"seq-{seq}"
    new_id = derived_id(original_id, "replay", str(generation))
    headers[MSG_ID] = new_id
    headers.pop("Ce-Id", None)
    headers["ce-id"] = new_id
    headers["ce-replayof"] = original_id
    ack = await Publisher(js, naming).publish_raw(original.subject or "", original.data or b"", headers)

    def mark(current: VmState | None) -> VmState | None:
        if current is None or current.replays >= generation:
            return None
        if current.last_event_seq > state.last_event_seq:
            # The tracker already saw the re-driven event (or later ones): its phase is truer.
            return structs.replace(current, replays=generation)
        return structs.replace(current, replays=generation, phase="replaying", failure=None)

    await store.update(key, mark)
    return ReplayResult(key, generation, original.subject or "", new_id, bool(ack.duplicate))
