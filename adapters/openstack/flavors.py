"""The flavor policy: smallest fit, an explicit per-VM map, or a created per-VM flavor; never undersized.

Units: the source's memory is MiB and Nova's flavor ``ram`` is MiB; flavor ``disk`` is GiB, as are
Cinder sizes (the seed kit compared flavor GB with disk MB and could pick a smaller flavor).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec
from vmferry.bus.errors import PermanentError
from vmferry.schemas.request import MigrationPlan


@dataclass(frozen=True)
class FlavorChoice:
    """The flavor picked for a VM and why."""

    flavor_id: str
    name: str
    reason: str
    created: bool = False


def shortfall(flavor: Any, spec: VmSpec, boot_from_volume: bool) -> list[str]:
    """What a flavor lacks for the VM (empty when it fits)."""
    short = []
    if flavor.vcpus < spec.cpus:
        short.append(f"{flavor.vcpus} vCPUs < {spec.cpus}")
    if flavor.ram < spec.memory_mib:
        short.append(f"{flavor.ram} MiB RAM < {spec.memory_mib} MiB")
    if not boot_from_volume and flavor.disk < spec.total_disk_gib:
        short.append(f"{flavor.disk} GiB disk < {spec.total_disk_gib} GiB")
    return short


def has_specs(flavor: Any, required: Mapping[str, str]) -> bool:
    """Whether the flavor carries every required extra spec with the required value."""
    specs = flavor.extra_specs or {}
    return all(specs.get(k) == v for k, v in required.items())


def closest(
    flavors: Iterable[Any], spec: VmSpec, boot_from_volume: bool, required: Mapping[str, str]
) -> FlavorChoice:
    """The smallest flavor (vCPUs, then RAM, then disk) that fits and has the required extra specs."""
    fitting = [
        f
        for f in flavors
        if not shortfall(f, spec, boot_from_volume) and has_specs(f, required) and not f.is_disabled
    ]
    if not fitting:
        raise PermanentError(
            f"no flavor has >= {spec.cpus} vCPUs and >= {spec.memory_mib} MiB RAM"
            + ("" if boot_from_volume else f" and >= {spec.total_disk_gib} GiB disk")
            + (f" with extra specs {dict(required)}" if required else ""),
            "add such a flavor, map the VM in mappings.flavors, or use options.flavor_policy: create",
        )
    best = min(fitting, key=lambda f: (f.vcpus, f.ram, f.disk, f.name))
    reason = (
        f"smallest flavor with >= {spec.cpus} vCPUs and >= {spec.memory_mib} MiB RAM"
        + ("" if boot_from_volume else f" and >= {spec.total_disk_gib} GiB disk")
        + f": {best.name} ({best.vcpus} vCPUs, {best.ram} MiB, {best.disk} GiB)"
    )
    return FlavorChoice(best.id, best.name, reason)


async def _all_flavors(adapter: OpenStackAdapter) -> list[Any]:
    compute = adapter.conn.compute
    return await adapter.call("listing flavors", lambda: list(compute.flavors(details=True)))


async def choose_flavor(
    adapter: OpenStackAdapter,
    spec: VmSpec,
    plan: MigrationPlan,
    required: Mapping[str, str] | None = None,
) -> FlavorChoice:
    """Apply the plan's flavor policy; an explicit flavor that is too small is refused."""
    required = required or {}
    bfv = plan.options.boot_from_volume
    explicit = plan.mappings.flavors.get(spec.name)
    if explicit is not None:
        compute = adapter.conn.compute
        flavor = await adapter.call(
            f"finding flavor {explicit!r}", compute.find_flavor, explicit, ignore_missing=False
        )
        if short := shortfall(flavor, spec, bfv):
            raise PermanentError(
                f"flavor {flavor.name} mapped for {spec.name} is too small: {'; '.join(short)}",
                "map a larger flavor in mappings.flavors",
            )
        return FlavorChoice(flavor.id, flavor.name, f"mapped explicitly in mappings.flavors: {flavor.name}")
    if plan.options.flavor_policy == "create":
        return await ensure_vm_flavor(adapter, spec, bfv, required)
    return closest(await _all_flavors(adapter), spec, bfv, required)


def vm_flavor_name(spec: VmSpec) -> str:
    """The name of the flavor made for one VM (the key, since VM names are not unique)."""
    return f"vmferry-{spec.vm_key}"


async def ensure_vm_flavor(
    adapter: OpenStackAdapter, spec: VmSpec, boot_from_volume: bool, required: Mapping[str, str]
) -> FlavorChoice:
    """Find or create ``vmferry-<vm key>`` sized exactly like the source (needs admin)."""
    compute = adapter.conn.compute
    name = vm_flavor_name(spec)
    existing: Any = await adapter.call("finding the VM's flavor", compute.find_flavor, name)
    if existing is not None and not shortfall(existing, spec, boot_from_volume):
        return FlavorChoice(existing.id, name, f"reused {name}, made for this VM", created=True)
    if existing is not None:
        raise PermanentError(
            f"flavor {name} exists but is too small:"
            f" {'; '.join(shortfall(existing, spec, boot_from_volume))}",
            f"delete flavor {name} (vmferry teardown) and retry",
        )
    disk = 0 if boot_from_volume else spec.total_disk_gib
    flavor = await adapter.call(
        "creating the VM's flavor",
        compute.create_flavor,
        name=name,
        vcpus=spec.cpus,
        ram=spec.memory_mib,
        disk=disk,
        is_public=False,
        needs="the admin role (Nova's os_compute_api:os-flavor-manage:create policy)",
    )
    if required:
        await adapter.call(
            "setting the flavor's extra specs", compute.create_flavor_extra_specs, flavor, dict(required)
        )
    if adapter.conn.current_project_id:
        await adapter.call(
            "granting the project the VM's flavor",
            compute.flavor_add_tenant_access,
            flavor,
            adapter.conn.current_project_id,
        )
    return FlavorChoice(
        flavor.id, name, f"created {name}: {spec.cpus} vCPUs, {spec.memory_mib} MiB, {disk} GiB", created=True
    )
