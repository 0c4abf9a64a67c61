"""launch: boots the converted VM on OpenStack and reports it ACTIVE.

It consumes ``conversion.done`` and emits ``instance.created`` and ``migration.completed``: a
boot-from-volume server with the root disk first and data volumes in source order, one port per NIC
in NIC order (source MACs and, when asked, fixed IPs), the source identity in server metadata, and
the flavor the plan's policy picks. The VM's inventory (cpus, memory, firmware, disks, NICs) travels
with the event. Everything is found by identity before it is created, so a redelivery creates
nothing twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.instances import launch
from vmferry.adapters.openstack.model import VmSpec
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.bus.handles import BusHandle
from vmferry.functions.guards import is_cancelled
from vmferry.schemas.events import ConversionDone, InstanceCreated, MigrationCompleted
from vmferry.schemas.request import DestinationRef

#: an adapter for a configured destination (clouds.yaml entry, project, region)
AdapterFactory = Callable[[DestinationRef], Awaitable[OpenStackAdapter]]


@dataclass(frozen=True)
class Launch:
    """The handler; dependencies are injected by whoever builds the registry."""

    adapters: AdapterFactory
    bus: BusHandle | None = None
    #: extra specs every picked flavor must carry (e.g. an AZ's or host aggregate's)
    required_extra_specs: Mapping[str, str] = field(default_factory=dict)
    active_timeout: float = 900.0

    async def __call__(self, event: CloudEvent[ConversionDone], context: StepContext) -> Sequence[Emit]:
        """Create or find the instance, wait for ACTIVE, emit instance.created."""
        done = event.data
        if await is_cancelled(self.bus, done.vm_key, done.request_id, "launch"):
            return []
        if not done.volume_ids:
            raise PermanentError(f"conversion.done for {done.vm_key} lists no volumes", "re-run the copy")
        spec = VmSpec.of_inventory(done.vm_key, done.vm)
        if done.inspection.os_type and not spec.os_type:
            spec = dataclasses.replace(spec, os_type=done.inspection.os_type)
        adapter = await self.adapters(done.plan.destination)
        await context.heartbeat()
        made = await launch(
            adapter, spec, done.plan, done.volume_ids, self.required_extra_specs, self.active_timeout
        )
        created = InstanceCreated(
            request_id=done.request_id,
            vm_key=done.vm_key,
            server_id=made.server_id,
            flavor_id=made.flavor.flavor_id,
            port_ids=list(made.port_ids),
            volume_ids=list(made.volume_ids),
        )
        completed = MigrationCompleted(
            request_id=done.request_id, vm_key=done.vm_key, server_id=made.server_id, passes=done.pass_no
        )
        return [Emit(done.vm_key, created), Emit(done.vm_key, completed)]


def definition(handler: Launch, concurrency: int | None = None) -> FunctionDef[ConversionDone]:
    """How the runner hosts launch; the handler heartbeats while it waits for ACTIVE."""
    return FunctionDef(
        name="launch",
        consumes=ConversionDone,
        emits=(InstanceCreated, MigrationCompleted),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=120.0,
        max_deliver=5,
        description="boots the converted VM from its volumes on OpenStack and waits for ACTIVE",
    )
