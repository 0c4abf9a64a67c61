"""cutover: stops the source VM and asks for the final pass; restore powers it back on after a failure.

``Cutover`` consumes ``cutover.requested``. It waits while a precopy pass is still in flight (its
snapshot was taken while the VM ran), records in the VM's state that vmferry is powering the source
off (before doing it, so a crash in between still leaves the record), shuts the guest down
gracefully with the plan's timeout, then powers it off, and emits ``cbt.delta.requested`` with
reason ``cutover`` for the next pass number: that pass is the final one.

``Restore`` consumes ``migration.failed``: if vmferry powered the source off and the plan allows
it, the source is powered on again so the workload runs while an operator looks at the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import RetryableError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.functions.guards import is_cancelled
from vmferry.schemas.base import instance_uuid_of
from vmferry.schemas.events import CbtDeltaRequested, CutoverRequested, MigrationFailed
from vmferry.schemas.state import SourcePower, VmState

ClientFactory = Callable[[str], Awaitable[AsyncVsphere]]
log = logging.getLogger(__name__)
#: how long a cutover waits before looking again at a precopy pass in flight
PASS_IN_FLIGHT_DELAY = 20.0


def _in_flight(state: VmState | None) -> bool:
    """A pass was snapshotted but not all its disks are synced yet."""
    return state is not None and state.pass_no > state.passes_synced


def _remember_power(vm_key: str, record: SourcePower) -> Callable[[VmState | None], VmState | None]:
    """Record the power-off intent, unless an earlier delivery already did (keep its record)."""

    def mutate(state: VmState | None) -> VmState | None:
        state = state or VmState(key=vm_key)
        if state.source_power is not None and state.source_power.restored_at is None:
            return state
        return msgspec.structs.replace(state, source_power=record)

    return mutate


def _forget_power(state: VmState | None) -> VmState | None:
    if state is None or state.source_power is None:
        return state
    return msgspec.structs.replace(state, source_power=None)


@dataclass(frozen=True)
class Cutover:
    """The handler; vSphere through ``clients``, the VM's state through ``bus``."""

    clients: ClientFactory
    bus: BusHandle

    async def __call__(self, event: CloudEvent[CutoverRequested], context: StepContext) -> Sequence[Emit]:
        """Stop the source (graceful, then hard) and ask for the final pass."""
        asked = event.data
        if await is_cancelled(self.bus, asked.vm_key, asked.request_id, "cutover"):
            return []
        state, _ = await self.bus.state.get(asked.vm_key)
        power = state.source_power if state is not None else None
        if power is not None and power.restored_at is None and power.cutover_event not in ("", event.id):
            log.info("%s is already being cut over (%s); %s changes nothing", asked.vm_key,
                     power.cutover_event, event.id)  # fmt: skip
            return []
        if _in_flight(state):
            raise RetryableError(
                f"precopy pass {state.pass_no if state else 0} of {asked.vm_key} is still copying",
                "cutover waits for it and continues by itself",
                delay=PASS_IN_FLIGHT_DELAY,
            )
        uuid = instance_uuid_of(asked.vm_key)
        client = await self.clients(asked.plan.source.name)
        moref = await client.find_vm(uuid)
        record = SourcePower(
            source=asked.plan.source.name,
            instance_uuid=uuid,
            powered_off_at=datetime.now(UTC),
            power_on_on_failure=asked.plan.cutover.power_on_source_on_failure,
            cutover_event=event.id,
        )
        remembered, _ = await self.bus.state.update(asked.vm_key, _remember_power(asked.vm_key, record))
        await context.heartbeat()
        stopped = await client.stop_vm(moref, float(asked.plan.cutover.shutdown_timeout_s))
        if stopped.method == "already-off" and context.delivery == 1:
            # The VM was off before vmferry came: never power it on after a failure.
            await self.bus.state.update(asked.vm_key, _forget_power)
        passes = remembered.passes_synced if remembered is not None else 0
        taken = remembered.pass_no if remembered is not None else 0
        final = CbtDeltaRequested(
            request_id=asked.request_id,
            vm_key=asked.vm_key,
            plan=asked.plan,
            pass_no=max(passes, taken) + 1,
            reason="cutover",
        )
        return [Emit(asked.vm_key, final)]


def _restored(at: datetime) -> Callable[[VmState | None], VmState | None]:
    def mutate(state: VmState | None) -> VmState | None:
        if state is None or state.source_power is None:
            return state
        power = msgspec.structs.replace(state.source_power, restored_at=at)
        return msgspec.structs.replace(state, source_power=power)

    return mutate


@dataclass(frozen=True)
class Restore:
    """Powers a source back on after a failure that followed vmferry's power-off."""

    clients: ClientFactory
    bus: BusHandle

    async def __call__(self, event: CloudEvent[MigrationFailed], context: StepContext) -> Sequence[Emit]:
        """Power on the source if vmferry stopped it and the plan allows it; emits nothing."""
        failed = event.data
        if failed.step == "restore" or not failed.vm_key.startswith("vm-"):
            return []
        state, _ = await self.bus.state.get(failed.vm_key)
        power = state.source_power if state is not None else None
        if power is None or not power.power_on_on_failure or power.restored_at is not None:
            return []
        client = await self.clients(power.source)
        moref = await client.find_vm(power.instance_uuid)
        await client.start_vm(moref)
        await self.bus.state.update(failed.vm_key, _restored(datetime.now(UTC)))
        return []


def definition(handler: Cutover, concurrency: int | None = None) -> FunctionDef[CutoverRequested]:
    """How the runner hosts cutover; a guest shutdown may take minutes (heartbeats keep it alive)."""
    return FunctionDef(
        name="cutover",
        consumes=CutoverRequested,
        emits=(CbtDeltaRequested,),
        handler=handler,
        concurrency=concurrency or 8,
        ack_wait=60.0,
        max_deliver=100,
        description="stops the source (graceful, then hard) and asks for the final pass",
    )


def restore_definition(handler: Restore, concurrency: int | None = None) -> FunctionDef[MigrationFailed]:
    """How the runner hosts restore."""
    return FunctionDef(
        name="restore",
        consumes=MigrationFailed,
        emits=(),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=120.0,
        max_deliver=5,
        description="powers the source back on after a failure that followed vmferry's power-off",
    )
