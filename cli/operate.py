"""Operator actions on a running migration: another precopy pass, cutover, or cancel.

They read the VM's plan from its own event history (the request is not needed again) and its
progress from the state bucket, refuse what cannot work now with the reason, and publish one event
whose id is derived from the VM and its pass count, so a repeated command is dropped as a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import FerryError
from vmferry.bus.history import history
from vmferry.bus.publisher import Publisher
from vmferry.cli.config import Settings
from vmferry.cli.wiring import Session
from vmferry.schemas.base import instance_uuid_of
from vmferry.schemas.events import CbtDeltaRequested, CutoverRequested, MigrationFailed
from vmferry.schemas.request import MigrationPlan
from vmferry.schemas.state import Cancellation, VmState

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


@dataclass(frozen=True)
class Cancelled:
    """What cancelling did."""

    key: str
    request_id: str
    snapshots_removed: list[str]
    destination_removed: list[str]


def _cancellation(request_id: str, by: str | None) -> Callable[[VmState | None], VmState | None]:
    def mutate(state: VmState | None) -> VmState | None:
        if state is None or (state.cancelled is not None and state.cancelled.request_id == request_id):
            return state
        return msgspec.structs.replace(
            state, cancelled=Cancellation(request_id=request_id, by=by, at=datetime.now(UTC))
        )

    return mutate


async def _remove_snapshots(settings: Settings, plan: MigrationPlan, request_id: str, key: str) -> list[str]:
    """Remove this VM's vmferry snapshots of the request (a pass in flight loses its snapshot)."""
    from vmferry.adapters.vsphere.aio import VsphereClients  # noqa: PLC0415 - heavy, only here
    from vmferry.adapters.vsphere.snapshots import remove_snapshot  # noqa: PLC0415

    clients = VsphereClients.from_sources(settings.sources)
    try:
        client = await clients(plan.source.name)
        moref = await client.find_vm(instance_uuid_of(key))
        removed = []
        for snap in await client.list_vmferry_snapshots(request_id):
            if snap.vm_moref == moref:
                await client.run(remove_snapshot, snap.snapshot_moref)
                removed.append(snap.name)
        return removed
    finally:
        await clients.close()


async def _remove_destination(settings: Settings, plan: MigrationPlan, key: str, name: str) -> list[str]:
    """Remove what vmferry made for the VM on the destination (replicas, clones, ports, server)."""
    from vmferry.adapters.openstack.client import OpenStackClients  # noqa: PLC0415
    from vmferry.adapters.openstack.model import VmSpec  # noqa: PLC0415
    from vmferry.adapters.openstack.teardown import teardown  # noqa: PLC0415

    clients = OpenStackClients.from_destinations(settings.destinations)
    try:
        adapter = await clients(plan.destination)
        removed = await teardown(adapter, VmSpec(vm_key=key, name=name, cpus=1, memory_mib=1))
        return [f"{r.kind} {r.id}" for r in removed]
    finally:
        clients.close()


async def cancel(s: Session, settings: Settings, key: str, by: str | None, destination: bool) -> Cancelled:
    """Stop a VM's migration: no step does more work for this request, its snapshots are removed,
    restore powers the source back on if vmferry stopped it, and (if asked) the destination's
    replicas and instance are removed."""
    state = await _state_of(s, key)
    request_id, plan = await _plan_of(s, key)
    await (await s.store()).update(key, _cancellation(request_id, by))
    snapshots = await _remove_snapshots(settings, plan, request_id, key)
    failed = MigrationFailed(
        request_id=request_id,
        vm_key=key,
        step="cancel",
        cause=f"the migration was cancelled by {by or 'an operator'}",
        fix="submit a new migration request to migrate the VM again",
    )
    event = CloudEvent(
        id=_event_id(key, f"cancel/{request_id}", 0), type=failed.spec.ce_type, source=SOURCE, subject=key,
        data=failed,
    )  # fmt: skip
    await Publisher(s.js, s.naming).publish(event)
    removed = await _remove_destination(settings, plan, key, state.name) if destination else []
    return Cancelled(key, request_id, snapshots, removed)
