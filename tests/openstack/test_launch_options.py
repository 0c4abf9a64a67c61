"""Launch options against the lab: key pair, availability zone, fixed IPv6 addresses (dual stack,
DHCPv6-stateful and SLAAC subnets) and the clear errors when one of them cannot be honoured.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from tests.openstack.conftest import OpenStackLab
from tests.openstack.test_adapter import (
    SOURCE_NET,
    Made,
    Step,
    conversion_done,
    create_volumes,
    handler,
    plan_for,
    vm_spec,
)
from vmferry.adapters.openstack import network, preflight, teardown, volumes
from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.bus.errors import PermanentError
from vmferry.schemas.events import InstanceCreated, NicInfo
from vmferry.schemas.request import MigrationPlan, NetworkTarget

pytestmark = [pytest.mark.timeout(900)]


@pytest.fixture
async def admin(openstack_lab: OpenStackLab) -> AsyncIterator[OpenStackAdapter]:
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    yield adapter
    adapter.close()


@pytest.fixture
async def made(admin: OpenStackAdapter) -> AsyncIterator[Made]:
    pending = Made()
    yield pending
    for spec in pending.specs:
        await teardown.teardown(admin, spec)


@pytest.fixture
def key_pair(admin: OpenStackAdapter) -> Iterator[str]:
    """A key pair of the admin user (only the public half exists)."""
    public = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    name = f"vmferry-test-{os.urandom(4).hex()}"
    admin.conn.compute.create_keypair(name=name, public_key=public)
    yield name
    admin.conn.compute.delete_keypair(name, ignore_missing=True)


@dataclass(frozen=True)
class DualStack:
    """A test network with an IPv4 subnet and a DHCPv6-stateful IPv6 subnet."""

    network: Any
    v4: Any
    v6: Any


def _remove_network(conn: Any, network_id: str) -> None:
    for port in conn.network.ports(network_id=network_id):
        conn.network.delete_port(port, ignore_missing=True)
    conn.network.delete_network(network_id, ignore_missing=True)


def _random_v6_prefix() -> str:
    return f"fd00:{os.urandom(2).hex()}:{os.urandom(2).hex()}::/64"


@pytest.fixture
def dual_stack(admin: OpenStackAdapter) -> Iterator[DualStack]:
    conn = admin.conn
    net = conn.network.create_network(name=f"vmferry-v6-{os.urandom(3).hex()}")
    try:
        v4 = conn.network.create_subnet(
            network_id=net.id, ip_version=4, cidr=f"198.18.{os.urandom(1)[0]}.0/24", name=f"{net.name}-v4"
        )
        v6 = conn.network.create_subnet(
            network_id=net.id,
            ip_version=6,
            cidr=_random_v6_prefix(),
            ipv6_address_mode="dhcpv6-stateful",
            ipv6_ra_mode="dhcpv6-stateful",
            name=f"{net.name}-v6",
        )
        yield DualStack(net, v4, v6)
    finally:
        _remove_network(conn, net.id)


def mapped_to(plan: MigrationPlan, network: str, subnet: str | None = None) -> MigrationPlan:
    target = NetworkTarget(network=network, subnet=subnet)
    return replace(plan, mappings=replace(plan.mappings, networks={SOURCE_NET: target}))


def with_addresses(nic: NicInfo, *addresses: str) -> NicInfo:
    return replace(nic, ip_addresses=list(addresses))


async def test_key_pair_and_availability_zone_reach_the_server_and_its_volumes(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made, key_pair: str
) -> None:
    spec = vm_spec(disks=2, nics=1)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, key_name=key_pair)
    plan = replace(plan, mappings=replace(plan.mappings, availability_zone="nova"))
    volume_ids = await create_volumes(admin, spec, plan)
    emitted = await handler(admin, spec)(conversion_done(spec, plan, volume_ids), Step())
    created = emitted[0].data
    assert isinstance(created, InstanceCreated)
    conn = admin.conn
    server = conn.compute.get_server(created.server_id)
    assert server.key_name == key_pair
    assert server.availability_zone == "nova"
    assert [conn.block_storage.get_volume(v).availability_zone for v in volume_ids] == ["nova", "nova"]


async def test_a_missing_key_pair_is_a_clear_error_before_anything_is_made(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made
) -> None:
    spec = vm_spec(disks=1, nics=1)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, key_name="no-such-key")
    volume_ids = await create_volumes(admin, spec, plan)
    with pytest.raises(PermanentError) as missing:
        await handler(admin, spec)(conversion_done(spec, plan, volume_ids), Step())
    assert missing.value.cause == (
        "key pair 'no-such-key' does not exist for the user vmferry authenticates as in cloud"
        f" {openstack_lab.admin_cloud!r}"
    )
    assert "openstack keypair create --public-key" in missing.value.fix
    assert await network.vm_ports(admin, spec.vm_key) == [], "no port is made before the check"


async def test_an_unknown_availability_zone_is_a_clear_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter
) -> None:
    spec = vm_spec(disks=1, nics=0)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    plan = replace(plan, mappings=replace(plan.mappings, availability_zone="nowhere"))
    with pytest.raises(PermanentError) as refused:
        await volumes.ensure_volume(admin, spec, spec.disks[0], plan)
    assert "while creating a volume" in refused.value.cause
    assert "nowhere" in refused.value.cause
    assert await volumes.vm_volumes(admin, spec.vm_key) == []


async def test_a_dual_stack_nic_keeps_its_ipv6_address_next_to_a_mapped_ipv4_subnet(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, dual_stack: DualStack, made: Made
) -> None:
    v4 = str(ipaddress.ip_network(dual_stack.v4.cidr)[17])
    v6 = ipaddress.ip_network(dual_stack.v6.cidr)[0x1234]
    spec = vm_spec(disks=1, nics=1)
    # As a guest may report it: upper case, not compressed.
    spec = dataclasses.replace(spec, nics=(with_addresses(spec.nics[0], v4, v6.exploded.upper()),))
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True)
    plan = mapped_to(plan, dual_stack.network.name, dual_stack.v4.name)
    assert await preflight.preflight(admin, spec, plan) == []

    volume_ids = await create_volumes(admin, spec, plan)
    emitted = await handler(admin, spec)(conversion_done(spec, plan, volume_ids), Step())
    created = emitted[0].data
    assert isinstance(created, InstanceCreated)
    conn = admin.conn
    port = conn.network.get_port(created.port_ids[0])
    assert sorted((ip["subnet_id"], ip["ip_address"]) for ip in port.fixed_ips) == sorted(
        [(dual_stack.v4.id, v4), (dual_stack.v6.id, str(v6))]
    )
    assert port.mac_address == spec.nics[0].mac.lower()
    server = conn.compute.get_server(created.server_id)
    addresses = {(a["version"], a["addr"]) for a in server.addresses[dual_stack.network.name]}
    assert addresses == {(4, v4), (6, str(v6))}


async def test_an_ipv6_address_outside_the_subnets_is_a_clear_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, dual_stack: DualStack
) -> None:
    spec = vm_spec(disks=1, nics=1)
    spec = dataclasses.replace(spec, nics=(with_addresses(spec.nics[0], "fd00:dead:beef::5"),))
    plan = mapped_to(
        plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True), dual_stack.network.name
    )
    with pytest.raises(PermanentError) as outside:
        await network.resolve_target(admin, plan, spec.nics[0])
    name = dual_stack.network.name
    assert outside.value.cause.startswith(
        f"fixed IP fd00:dead:beef::5 is outside the subnets of network {name!r} ("
    )
    assert dual_stack.v4.cidr in outside.value.cause and dual_stack.v6.cidr in outside.value.cause
    assert "preserve_ip: false" in outside.value.fix
    findings = await preflight.preflight(admin, spec, plan)
    assert [f.code for f in findings] == ["network.mapping"]


@pytest.fixture
def slaac_network(admin: OpenStackAdapter) -> Iterator[tuple[Any, Any]]:
    conn = admin.conn
    net = conn.network.create_network(name=f"vmferry-slaac-{os.urandom(3).hex()}")
    try:
        subnet = conn.network.create_subnet(
            network_id=net.id,
            ip_version=6,
            cidr=_random_v6_prefix(),
            ipv6_address_mode="slaac",
            ipv6_ra_mode="slaac",
            name=f"{net.name}-v6",
        )
        yield net, subnet
    finally:
        _remove_network(conn, net.id)


async def test_slaac_addresses_come_from_the_mac_or_are_a_clear_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, slaac_network: tuple[Any, Any]
) -> None:
    net, subnet = slaac_network
    spec = vm_spec(disks=1, nics=1)
    nic = spec.nics[0]
    derived = network.eui64_address(subnet.cidr, nic.mac.lower())
    plan = mapped_to(plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True), net.name)

    # The guest's address is the one SLAAC gives its MAC: Neutron assigns it to the port itself.
    target = await network.resolve_target(admin, plan, with_addresses(nic, str(derived)))
    assert target.fixed_ips == ()
    port = await network.ensure_port(admin, spec.vm_key, target, "slaac-nic", [])
    assert [ip["ip_address"] for ip in port.fixed_ips] == [str(derived)]

    # Any other address cannot be kept on such a subnet.
    other = ipaddress.ip_network(subnet.cidr)[7]
    with pytest.raises(PermanentError) as refused:
        await network.resolve_target(admin, plan, with_addresses(nic, str(other)))
    assert refused.value.cause == (
        f"fixed IP {other} lies in subnet {subnet.cidr}, whose addresses Neutron derives from the port's"
        f" MAC (ipv6_address_mode slaac), so it cannot be set (with the source MAC it would be {derived})"
    )
    assert "dhcpv6-stateful" in refused.value.fix


async def test_an_address_that_is_not_an_ip_is_a_clear_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter
) -> None:
    spec = vm_spec(disks=1, nics=1)
    nic = with_addresses(spec.nics[0], "192.0.2.300")
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True)
    with pytest.raises(PermanentError, match=r"reports '192.0.2.300', which is not an IP address"):
        await network.resolve_target(admin, plan, nic)
