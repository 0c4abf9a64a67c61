"""Operator actions on a running warm migration: ask for another precopy pass, or for cutover.

Both read the VM's plan from its own event history (the request is not needed again) and its
progress from the state bucket, refuse what cannot work now with the reason, and publish one event
whose id is derived from the VM and its pass count, so a repeated command is dropped as a duplicate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import FerryError
from vmferry.bus.history import history
from vmferry.bus.publisher import Publisher
from vmferry.cli.wiring import Session
from vmferry.schemas.events import CbtDeltaRequested, CutoverRequested
from vmferry.schemas.request import MigrationPlan
from vmferry.schemas.state import VmState

SOURCE = "/vmferry/cli"


@dataclass(frozen=True)
class Asked:
    """What was published."""

    key: str
    event_type: str
    pass_no: int
    duplicate: bool


async def _plan_of(s: Session, key: str) -> tuple[str, MigrationPlan]:
    """The request id and plan the VM's latest planned event carries."""
    for recorded in reversed(await history(s.js, s.naming, key)):
        data = recorded.event.data if recorded.event else None
        plan = getattr(data, "plan", None)
        if isinstance(plan, MigrationPlan):
            return str(getattr(data, "request_id", "")), plan
    raise FerryError(f"{key} has not been discovered yet", "wait for `vmferry status` to show it discovered")


async def _state_of(s: Session, key: str) -> VmState:
    state, _ = await (await s.store()).get(key)
    if state is None:
        raise FerryError(f"no state is known for {key}", "check the key with `vmferry status`")
    if state.phase == "completed":
        raise FerryError(f"{key} is already migrated", "nothing to do")
    return state


def _event_id(key: str, action: str, pass_no: int) -> str:
    return hashlib.blake2b(f"{key}/{action}/{pass_no}".encode(), digest_size=16).hexdigest()


async def request_pass(s: Session, key: str) -> Asked:
    """Publish cbt.delta.requested (manual) for the next precopy pass of a warm migration."""
    state = await _state_of(s, key)
    request_id, plan = await _plan_of(s, key)
    if plan.mode != "warm":
        raise FerryError(f"{key} is a cold migration: it has a single pass", "nothing to sync")
    if state.source_power is not None and state.source_power.restored_at is None:
        raise FerryError(f"{key} is in cutover: the final pass is running", "wait for it to finish")
    if state.pass_no > state.passes_synced:
        raise FerryError(
            f"pass {state.pass_no} of {key} is still copying",
            "ask again once `vmferry status` shows it synced",
        )
    pass_no = max(state.pass_no, state.passes_synced) + 1
    data = CbtDeltaRequested(request_id=request_id, vm_key=key, plan=plan, pass_no=pass_no, reason="manual")
    return await _publish(s, key, data, _event_id(key, "sync", pass_no), pass_no)


async def request_cutover(s: Session, key: str, requested_by: str | None) -> Asked:
    """Publish cutover.requested: stop the source, final pass, conversion, launch."""
    state = await _state_of(s, key)
    request_id, plan = await _plan_of(s, key)
    data = CutoverRequested(request_id=request_id, vm_key=key, plan=plan, requested_by=requested_by)
    return await _publish(s, key, data, _event_id(key, "cutover", state.passes_synced), state.passes_synced)


async def _publish(
    s: Session, key: str, data: CbtDeltaRequested | CutoverRequested, event_id: str, pass_no: int
) -> Asked:
    event = CloudEvent(id=event_id, type=data.spec.ce_type, source=SOURCE, subject=key, data=data)
    ack = await Publisher(s.js, s.naming).publish(event)
    return Asked(key, data.spec.ce_type, pass_no, bool(ack.duplicate))
