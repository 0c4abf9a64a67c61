"""Neutron: source networks mapped to networks/subnets, ports found or created by MAC and network.

A port's identity is its MAC on its network (compared lower-case); ports vmferry made also carry
``vmferry_vm=<key> nic=<key> vmferry_managed=true`` in their description, which teardown relies on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.openstack.model import port_description, port_vm_prefix
from vmferry.bus.errors import PermanentError
from vmferry.schemas.events import NicInfo
from vmferry.schemas.request import MigrationPlan, NetworkTarget

#: IPv6 address modes in which Neutron assigns addresses itself (from the MAC)
AUTOMATIC_IPV6_MODES = ("slaac", "dhcpv6-stateless")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAC_ROLE = (
    "the admin role (or a role Neutron's policy allows for create_port:mac_address and"
    " create_port:fixed_ips:ip_address, e.g. the network owner's)"
)


@dataclass(frozen=True)
class PortTarget:
    """Where one NIC lands and what the port must keep."""

    nic: NicInfo
    network_id: str
    subnet_id: str | None
    mac: str | None
    fixed_ips: tuple[str, ...]
    #: each fixed IP with the id of the subnet it lies in
    ip_subnets: tuple[tuple[str, str], ...] = ()


def target_for(plan: MigrationPlan, nic: NicInfo) -> NetworkTarget:
    """The mapped network of a NIC's source portgroup, else the default; none is an error."""
    target = plan.mappings.networks.get(nic.network) or plan.mappings.default_network
    if target is None:
        raise PermanentError(
            f"NIC {nic.mac} is on source network {nic.network!r}, which mappings.networks does not map",
            "add the portgroup to mappings.networks or set mappings.default_network",
        )
    return target


async def resolve_target(adapter: OpenStackAdapter, plan: MigrationPlan, nic: NicInfo) -> PortTarget:
    """Resolve names to ids and place each fixed IP in a subnet of the network.

    An address goes to the mapped subnet when it has the address's IP version, else to the network's
    subnets of that version (so a dual-stack NIC keeps its IPv6 address next to a mapped IPv4 subnet).
    An IPv6 address in a SLAAC subnet cannot be set: Neutron derives it from the MAC itself, so it is
    dropped when it is exactly that address and the MAC is kept, and is a clear error otherwise.
    """
    net = adapter.conn.network
    target = target_for(plan, nic)
    network = await adapter.call(
        f"finding network {target.network!r}", net.find_network, target.network, ignore_missing=False
    )
    subnet = None
    if target.subnet:
        subnet = await adapter.call(
            f"finding subnet {target.subnet!r}", net.find_subnet, target.subnet, ignore_missing=False
        )
        if subnet.network_id != network.id:
            raise PermanentError(
                f"subnet {target.subnet!r} is not on network {target.network!r}", "fix the network mapping"
            )
    mac = nic.mac.lower() if plan.options.preserve_mac else None
    fixed = [_parse(a, nic) for a in nic.ip_addresses] if plan.options.preserve_ip else []
    every: list[Any] = []
    if any(subnet is None or _version(subnet) != ip.version for ip in fixed):
        every = await adapter.call(
            "listing the network's subnets", lambda: list(net.subnets(network_id=network.id))
        )
    placed: list[tuple[str, str]] = []
    for ip in fixed:
        candidates = [subnet] if subnet is not None and _version(subnet) == ip.version else every
        home = _home_subnet(ip, candidates, target.network)
        if _automatic(home):
            if mac is not None and ip == eui64_address(home.cidr, mac):
                continue  # Neutron gives the port exactly this address itself
            raise _slaac_refused(ip, home, mac)
        placed.append((str(ip), home.id))
    return PortTarget(
        nic,
        network.id,
        subnet.id if subnet is not None else None,
        mac,
        tuple(ip for ip, _ in placed),
        tuple(placed),
    )


def _parse(address: str, nic: NicInfo) -> IPAddress:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise PermanentError(
            f"NIC {nic.mac} reports {address!r}, which is not an IP address",
            "fix the address in the VM inventory, or set options.preserve_ip: false",
        ) from None


def _version(subnet: Any) -> int:
    return ipaddress.ip_network(subnet.cidr).version


def _home_subnet(ip: IPAddress, subnets: list[Any], network: str) -> Any:
    home = next(
        (s for s in subnets if _version(s) == ip.version and ip in ipaddress.ip_network(s.cidr)), None
    )
    if home is None:
        cidrs = ", ".join(s.cidr for s in subnets) or "none"
        raise PermanentError(
            f"fixed IP {ip} is outside the subnets of network {network!r} ({cidrs})",
            "map the NIC to a network/subnet that contains the address, or set options.preserve_ip: false",
        )
    return home


def _automatic(subnet: Any) -> bool:
    """Whether Neutron assigns the subnet's addresses from the MAC (SLAAC) instead of on request."""
    return getattr(subnet, "ipv6_address_mode", None) in AUTOMATIC_IPV6_MODES


def eui64_address(cidr: str, mac: str) -> ipaddress.IPv6Address:
    """The SLAAC address of a MAC in a /64: modified EUI-64 (universal/local bit flipped, ff:fe inserted)."""
    octets = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    interface_id = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    prefix = ipaddress.IPv6Network(cidr).network_address
    return ipaddress.IPv6Address(int(prefix) | int.from_bytes(interface_id, "big"))


def _slaac_refused(ip: IPAddress, subnet: Any, mac: str | None) -> PermanentError:
    derived = f" (with the source MAC it would be {eui64_address(subnet.cidr, mac)})" if mac else ""
    return PermanentError(
        f"fixed IP {ip} lies in subnet {subnet.cidr}, whose addresses Neutron derives from the port's MAC"
        f" (ipv6_address_mode {subnet.ipv6_address_mode}), so it cannot be set{derived}",
        "map the NIC to a subnet with ipv6_address_mode dhcpv6-stateful (or none), or drop the address"
        " (options.preserve_ip: false)",
    )


def subnet_for(address: str, subnets: list[Any]) -> Any | None:
    """The subnet whose CIDR holds an address."""
    ip = ipaddress.ip_address(address)
    return next(
        (
            s
            for s in subnets
            if ipaddress.ip_network(s.cidr).version == ip.version and ip in ipaddress.ip_network(s.cidr)
        ),
        None,
    )


async def security_group_ids(adapter: OpenStackAdapter, plan: MigrationPlan) -> list[str]:
    """Ids of the plan's security groups (names or ids)."""
    net = adapter.conn.network
    ids = []
    for name in plan.options.security_groups:
        # Scoped to the project: an admin sees every project's "default" group.
        group = await adapter.call(
            f"finding security group {name!r}",
            net.find_security_group,
            name,
            ignore_missing=False,
            project_id=adapter.conn.current_project_id,
        )
        ids.append(group.id)
    return ids


async def ensure_port(
    adapter: OpenStackAdapter, vm_key: str, target: PortTarget, name: str, groups: list[str]
) -> Any:
    """The NIC's port: reused when vmferry made it for this VM, created otherwise.

    A MAC already held on that network by any other port is a permanent error naming the port.
    """
    net = adapter.conn.network
    description = port_description(vm_key, target.nic.key)
    if target.mac:
        holders = await adapter.call(
            "looking up ports by MAC",
            lambda: list(net.ports(mac_address=target.mac, network_id=target.network_id)),
        )
        for port in holders:
            if port.description == description:
                return port
            raise PermanentError(
                f"MAC {target.mac} is already used on network {target.network_id} by port {port.id}"
                f" ({port.name or 'unnamed'}, device {port.device_id or 'none'})",
                "delete or re-MAC that port (is the source VM also running in OpenStack?), or set"
                " options.preserve_mac: false",
            )
    else:
        mine = await adapter.call(
            "looking up the NIC's port",
            lambda: list(net.ports(description=description, network_id=target.network_id)),
        )
        if mine:
            return mine[0]
    attrs: dict[str, Any] = {"network_id": target.network_id, "name": name, "description": description}
    if target.mac:
        attrs["mac_address"] = target.mac
    if target.ip_subnets:
        attrs["fixed_ips"] = [{"ip_address": ip, "subnet_id": subnet} for ip, subnet in target.ip_subnets]
    elif target.fixed_ips:
        attrs["fixed_ips"] = [
            {"ip_address": ip} | ({"subnet_id": target.subnet_id} if target.subnet_id else {})
            for ip in target.fixed_ips
        ]
    elif target.subnet_id:
        attrs["fixed_ips"] = [{"subnet_id": target.subnet_id}]
    if groups:
        attrs["security_group_ids"] = groups
    project = adapter.conn.current_project_id
    if project:
        attrs["project_id"] = project
    return await adapter.call(
        f"create a port with MAC {target.mac} / fixed IPs {list(target.fixed_ips)}",
        net.create_port,
        needs=MAC_ROLE,
        **attrs,
    )


async def vm_ports(adapter: OpenStackAdapter, vm_key: str) -> list[Any]:
    """Every port vmferry made for a VM (by description prefix)."""
    net = adapter.conn.network
    prefix = port_vm_prefix(vm_key)
    return await adapter.call(
        "listing the VM's ports", lambda: [p for p in net.ports() if (p.description or "").startswith(prefix)]
    )
