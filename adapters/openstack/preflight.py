"""Pre-flight checks of one VM against the destination, as ``Finding``s (nothing is created).

Quotas (instances, cores, RAM, volumes, gigabytes, ports), volume types, networks and subnets,
MACs and fixed IPs free and in range, and the flavor fit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from vmferry.adapters.openstack import flavors, network
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec, gib_for, port_description
from vmferry.adapters.openstack.volumes import volume_type_for
from vmferry.bus.errors import FerryError
from vmferry.schemas.events import Finding
from vmferry.schemas.request import MigrationPlan


def blocker(code: str, error: FerryError | str, fix: str = "") -> Finding:
    """A blocking finding from an error (its cause and fix) or a message."""
    if isinstance(error, FerryError):
        return Finding(code=code, severity="blocker", message=error.cause, fix=error.fix or fix)
    return Finding(code=code, severity="blocker", message=error, fix=fix)


def quota_findings(
    needs: Mapping[str, int], limits: Mapping[str, int], used: Mapping[str, int], where: str
) -> list[Finding]:
    """Compare what the VM needs with what is left (-1 means unlimited)."""
    findings = []
    for name, need in needs.items():
        limit = limits.get(name, -1)
        if limit < 0:
            continue
        free = limit - used.get(name, 0)
        if need > free:
            findings.append(
                blocker(
                    f"quota.{where}.{name}",
                    f"{where} quota {name}: the VM needs {need}, {free} of {limit} left",
                    f"raise the project's {name} quota (openstack quota set --{name.replace('_', '-')})",
                )
            )
    return findings


async def _quotas(adapter: OpenStackAdapter, spec: VmSpec, ram_mib: int, cores: int) -> list[Finding]:
    conn = adapter.conn
    project = conn.current_project_id
    nova = await adapter.call("reading compute quotas", conn.compute.get_quota_set, project, usage=True)
    cinder = await adapter.call(
        "reading volume quotas", conn.block_storage.get_quota_set, project, usage=True
    )
    neutron = await adapter.call("reading network quotas", conn.network.get_quota, project, details=True)
    nova_used = {k: int(v) + int((nova.reservation or {}).get(k, 0)) for k, v in (nova.usage or {}).items()}
    findings = quota_findings(
        {"instances": 1, "cores": cores, "ram": ram_mib},
        {"instances": nova.instances, "cores": nova.cores, "ram": nova.ram},
        nova_used,
        "compute",
    )
    findings += quota_findings(
        {"volumes": len(spec.disks), "gigabytes": spec.total_disk_gib},
        {"volumes": cinder.volumes, "gigabytes": cinder.gigabytes},
        {k: int(v) for k, v in (cinder.usage or {}).items()},
        "volume",
    )
    ports: dict[str, Any] = neutron.ports or {}
    findings += quota_findings(
        {"ports": len(spec.nics)},
        {"ports": int(ports.get("limit", -1))},
        {"ports": int(ports.get("used", 0))},
        "network",
    )
    return findings


async def _volume_types(adapter: OpenStackAdapter, spec: VmSpec, plan: MigrationPlan) -> list[Finding]:
    bs = adapter.conn.block_storage
    known = await adapter.call(
        "listing volume types", lambda: {t.name for t in bs.types()} | {t.id for t in bs.types()}
    )
    wanted = {t for d in spec.disks if (t := volume_type_for(plan, d))}
    return [
        blocker(
            "volume_type.unknown",
            f"volume type {t!r} does not exist",
            "fix mappings.volume_types or default_volume_type",
        )
        for t in sorted(wanted - known)
    ]


async def _nic(adapter: OpenStackAdapter, spec: VmSpec, plan: MigrationPlan, nic_index: int) -> list[Finding]:
    nic = spec.nics[nic_index]
    try:
        target = await network.resolve_target(adapter, plan, nic)
    except FerryError as exc:
        return [blocker("network.mapping", exc)]
    net = adapter.conn.network
    findings = []
    if target.mac:
        holders = await adapter.call(
            "looking up ports by MAC",
            lambda: list(net.ports(mac_address=target.mac, network_id=target.network_id)),
        )
        mine = port_description(spec.vm_key, nic.key)
        for port in holders:
            if port.description != mine:
                findings.append(
                    blocker(
                        "network.mac_in_use",
                        f"MAC {target.mac} is already used by port {port.id}",
                        "delete or re-MAC that port, or set options.preserve_mac: false",
                    )
                )
    for address in target.fixed_ips:
        holders = await adapter.call(
            "looking up ports by IP",
            lambda a=address: list(net.ports(network_id=target.network_id, fixed_ips=f"ip_address={a}")),
        )
        mine = port_description(spec.vm_key, nic.key)
        for port in holders:
            if port.description != mine:
                findings.append(
                    blocker(
                        "network.ip_in_use",
                        f"IP {address} is already used by port {port.id}",
                        "free the address, or set options.preserve_ip: false",
                    )
                )
    return findings


async def preflight(
    adapter: OpenStackAdapter,
    spec: VmSpec,
    plan: MigrationPlan,
    required_extra_specs: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Every finding for one VM; an empty list means the launch can proceed."""
    findings: list[Finding] = []
    checks: list[Callable[[], Awaitable[list[Finding]]]] = [
        lambda: _volume_types(adapter, spec, plan),
        *[lambda i=i: _nic(adapter, spec, plan, i) for i in range(len(spec.nics))],
    ]
    try:
        choice = await flavors.choose_flavor(adapter, spec, plan, required_extra_specs)
        flavor = await adapter.call("reading the flavor", adapter.conn.compute.get_flavor, choice.flavor_id)
        ram, cores = int(flavor.ram), int(flavor.vcpus)
    except FerryError as exc:
        findings.append(blocker("flavor.fit", exc))
        ram, cores = spec.memory_mib, spec.cpus
    checks.insert(0, lambda: _quotas(adapter, spec, ram, cores))
    for check in checks:
        try:
            findings += await check()
        except FerryError as exc:
            findings.append(blocker("preflight.error", exc))
    return findings


__all__ = ["blocker", "gib_for", "preflight", "quota_findings"]
