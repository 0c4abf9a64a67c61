"""One VM's instance: volumes ordered root first, ports in NIC order, flavor, server, ACTIVE."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmferry.adapters.openstack import compute, flavors, network, volumes
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.model import DISK_KEY, VM_KEY, VmSpec
from vmferry.bus.errors import PermanentError
from vmferry.schemas.request import MigrationPlan


@dataclass(frozen=True)
class Launched:
    """What launch made or found."""

    server_id: str
    flavor: flavors.FlavorChoice
    port_ids: tuple[str, ...]
    volume_ids: tuple[str, ...]
    created: bool


async def ordered_volumes(adapter: OpenStackAdapter, spec: VmSpec, volume_ids: Sequence[str]) -> list[str]:
    """The VM's volumes in source disk order (the first is the root), checked against their identity."""
    bs = adapter.conn.block_storage
    by_disk: dict[str, str] = {}
    for volume_id in volume_ids:
        volume = await adapter.call("reading a volume", bs.get_volume, volume_id)
        meta = volume.metadata or {}
        if meta.get(VM_KEY) != spec.vm_key:
            raise PermanentError(
                f"volume {volume_id} does not belong to {spec.vm_key} (its {VM_KEY} is {meta.get(VM_KEY)!r})",
                "fix the volume list of the conversion.done event",
            )
        by_disk[meta.get(DISK_KEY, "")] = volume_id
    if not spec.disks:
        return list(volume_ids)
    missing = [d.key for d in spec.disks if str(d.key) not in by_disk]
    if missing:
        raise PermanentError(
            f"no volume for disk(s) {missing} of {spec.vm_key}", "re-run the copy of those disks"
        )
    return [by_disk[str(d.key)] for d in spec.disks]


async def launch(
    adapter: OpenStackAdapter,
    spec: VmSpec,
    plan: MigrationPlan,
    volume_ids: Sequence[str],
    required_extra_specs: Mapping[str, str] | None = None,
    timeout: float = compute.SERVER_TIMEOUT,
) -> Launched:
    """Create (or find) the instance and wait for ACTIVE; a rerun creates nothing twice."""
    ordered = await ordered_volumes(adapter, spec, volume_ids)
    existing = await compute.find_server(adapter, spec.vm_key, spec.name)
    if existing is None and plan.options.key_name:
        await compute.check_keypair(adapter, plan.options.key_name)
    choice = await flavors.choose_flavor(adapter, spec, plan, required_extra_specs)
    ports = await ensure_ports(adapter, spec, plan)
    if existing is None:
        await volumes.prepare_boot(adapter, ordered[0], spec, plan)
        server = await compute.create_server(
            adapter,
            vm_key=spec.vm_key,
            name=spec.name,
            flavor_id=choice.flavor_id,
            volume_ids=ordered,
            port_ids=ports,
            key_name=plan.options.key_name,
            availability_zone=plan.mappings.availability_zone,
        )
        server_id = server.id
    else:
        server_id = existing.id
    await compute.wait_active(adapter, server_id, timeout)
    return Launched(server_id, choice, tuple(ports), tuple(ordered), existing is None)


async def ensure_ports(adapter: OpenStackAdapter, spec: VmSpec, plan: MigrationPlan) -> list[str]:
    """One port per NIC, in NIC order."""
    groups = await network.security_group_ids(adapter, plan)
    ids = []
    for index, nic in enumerate(spec.nics):
        target = await network.resolve_target(adapter, plan, nic)
        port = await network.ensure_port(
            adapter, spec.vm_key, target, f"{spec.name}-nic{index}"[:255], groups
        )
        ids.append(port.id)
    return ids
