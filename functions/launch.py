"""launch: boots the converted VM on OpenStack and reports it ACTIVE.

It consumes ``conversion.done`` and emits ``instance.created``: a boot-from-volume server with the
root disk first and data volumes in source order, one port per NIC in NIC order (source MACs and,
when asked, fixed IPs), the source identity in server metadata, and the flavor the plan's policy
picks. Everything is found by identity before it is created, so a redelivery creates nothing twice.

``conversion.done`` does not carry the VM's inventory (cpus, memory, firmware, disks, NICs), so the
handler gets it from an injected ``inventory`` lookup (e.g. the VM's ``vm.discovered`` from the
state store) until the event carries it.
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
from vmferry.schemas.events import ConversionDone, InstanceCreated
from vmferry.schemas.request import DestinationRef

#: an adapter for a configured destination (clouds.yaml entry, project, region)
AdapterFactory = Callable[[DestinationRef], Awaitable[OpenStackAdapter]]
#: the VM's inventory for a conversion.done event
Inventory = Callable[[ConversionDone], Awaitable[VmSpec]]


@dataclass(frozen=True)
class Launch:
    """The handler; dependencies are injected by whoever builds the registry."""

    adapters: AdapterFactory
    inventory: Inventory
    #: extra specs every picked flavor must carry (e.g. an AZ's or host aggregate's)
    required_extra_specs: Mapping[str, str] = field(default_factory=dict)
    active_timeout: float = 900.0

    async def __call__(self, event: CloudEvent[ConversionDone], context: StepContext) -> Sequence[Emit]:
        """Create or find the instance, wait for ACTIVE, emit instance.created."""
        done = event.data
        if not done.volume_ids:
            raise PermanentError(f"conversion.done for {done.vm_key} lists no volumes", "re-run the copy")
        spec = await self.inventory(done)
        if spec.vm_key != done.vm_key:
            raise PermanentError(
                f"inventory returned {spec.vm_key} for {done.vm_key}", "fix the inventory lookup"
            )
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
        return [Emit(done.vm_key, created)]


def definition(handler: Launch, concurrency: int | None = None) -> FunctionDef[ConversionDone]:
    """How the runner hosts launch; the handler heartbeats while it waits for ACTIVE."""
    return FunctionDef(
        name="launch",
        consumes=ConversionDone,
        emits=(InstanceCreated,),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=120.0,
        max_deliver=5,
        description="boots the converted VM from its volumes on OpenStack and waits for ACTIVE",
    )
