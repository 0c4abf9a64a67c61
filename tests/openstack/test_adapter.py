"""vmferry's OpenStack adapter and the launch function against the real lab.

Idempotent launch (no duplicate volume, port or server), multi-disk multi-NIC VMs with fixed MACs
and IPs, flavor choice, teardown, and the clear errors for MACs in use, IPs outside the subnet,
member credentials setting MACs and wrong credentials.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from msgspec.structs import replace

from tests.openstack.conftest import OpenStackLab
from vmferry.adapters.openstack import compute, flavors, instances, network, preflight, teardown, volumes
from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.devices import device_path
from vmferry.adapters.openstack.model import CHANGE_ID_KEY, PASS_KEY, VmSpec
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.functions import launch as launch_fn
from vmferry.schemas.base import instance_uuid_of, vm_key_for
from vmferry.schemas.events import (
    ConversionDone,
    DiskInfo,
    GuestInspection,
    InstanceCreated,
    MigrationCompleted,
    NicInfo,
    VmIdentity,
    VmInventory,
)
from vmferry.schemas.request import (
    DestinationRef,
    Mappings,
    MigrationOptions,
    MigrationPlan,
    NetworkTarget,
    SourceRef,
)

pytestmark = [pytest.mark.timeout(900)]
GIB = 1024**3
SOURCE_NET = "VM Network"


@dataclass
class Step:
    """What the runner offers a handler."""

    delivery: int = 1
    function: str = "launch"

    async def heartbeat(self) -> None:
        return None


def random_mac(prefix: str = "00:50:56") -> str:
    return prefix + ":" + ":".join(f"{b:02X}" for b in os.urandom(3))


def random_ip() -> str:
    return f"192.0.2.{random.randint(20, 250)}"


def plan_for(lab: OpenStackLab, cloud: str, **options: Any) -> MigrationPlan:
    return MigrationPlan(
        source=SourceRef(name="lab"),
        destination=DestinationRef(cloud=cloud),
        mappings=Mappings(
            networks={SOURCE_NET: NetworkTarget(network=lab.network)},
            default_volume_type=lab.volume_type,
        ),
        options=MigrationOptions(**options),
    )


def vm_spec(disks: int = 2, nics: int = 2, ip: str | None = None, **attrs: Any) -> VmSpec:
    return VmSpec(
        vm_key=vm_key_for(str(uuid.uuid4())),
        name=f"vm-{uuid.uuid4().hex[:8]}",
        cpus=attrs.pop("cpus", 2),
        memory_mib=attrs.pop("memory_mib", 3000),
        disks=tuple(
            DiskInfo(key=2000 + i, capacity_bytes=(i + 1) * GIB, datastore="ds1") for i in range(disks)
        ),
        nics=tuple(
            NicInfo(
                key=4000 + i,
                mac=random_mac(),
                network=SOURCE_NET,
                ip_addresses=[ip] if ip and i == 0 else [],
            )
            for i in range(nics)
        ),
        **attrs,
    )


@pytest.fixture(scope="module")
def admin_auth(openstack_lab: OpenStackLab) -> CloudAuth:
    return CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)


@pytest.fixture
async def admin(admin_auth: CloudAuth) -> AsyncIterator[OpenStackAdapter]:
    adapter = OpenStackAdapter(admin_auth)
    yield adapter
    adapter.close()


@pytest.fixture
async def member(openstack_lab: OpenStackLab) -> AsyncIterator[OpenStackAdapter]:
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.member_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    yield adapter
    adapter.close()


class Made:
    """VMs a test launches; torn down afterwards with the adapter's own teardown."""

    def __init__(self) -> None:
        self.specs: list[VmSpec] = []


@pytest.fixture
async def made(admin: OpenStackAdapter) -> AsyncIterator[Made]:
    pending = Made()
    yield pending
    for spec in pending.specs:
        await teardown.teardown(admin, spec)


class ApiCalls:
    """Counts HTTP requests a connection sends (keystoneauth's requests session hook)."""

    def __init__(self, adapter: OpenStackAdapter) -> None:
        self.requests: list[str] = []
        adapter.conn.session.session.hooks["response"].append(self._count)

    def _count(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self.requests.append(f"{response.request.method} {response.request.url.split('?')[0]}")


async def create_volumes(adapter: OpenStackAdapter, spec: VmSpec, plan: MigrationPlan) -> list[str]:
    return [(await volumes.ensure_volume(adapter, spec, disk, plan)).id for disk in spec.disks]


def conversion_done(spec: VmSpec, plan: MigrationPlan, volume_ids: list[str]) -> CloudEvent[ConversionDone]:
    data = ConversionDone(
        request_id="req-1",
        vm_key=spec.vm_key,
        plan=plan,
        vm=inventory_of(spec),
        volume_ids=volume_ids,
        inspection=GuestInspection(os_type="linux"),
    )
    return CloudEvent(
        id="evt-1", type=ConversionDone.spec.ce_type, source="test", subject=spec.vm_key, data=data
    )


def inventory_of(spec: VmSpec) -> VmInventory:
    """The inventory a conversion.done carries for this spec."""
    return VmInventory(
        identity=VmIdentity(instance_uuid=instance_uuid_of(spec.vm_key), name=spec.name),
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        firmware=spec.firmware,
        secure_boot=spec.secure_boot,
        disks=list(spec.disks),
        nics=list(spec.nics),
    )


def handler(adapter: OpenStackAdapter, spec: VmSpec) -> launch_fn.Launch:
    async def adapters(_: DestinationRef) -> OpenStackAdapter:
        return adapter

    return launch_fn.Launch(adapters=adapters, active_timeout=300)


async def test_launch_twice_creates_one_server_with_disks_and_nics_in_order(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made
) -> None:
    ip = random_ip()
    spec = vm_spec(ip=ip, firmware="efi")
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True, security_groups=["default"])
    calls = ApiCalls(admin)
    volume_ids = await create_volumes(admin, spec, plan)
    first = await handler(admin, spec)(conversion_done(spec, plan, volume_ids[::-1]), Step())
    counted = len(calls.requests)
    print(f"\nOpenStack API calls from volume creation to ACTIVE (2 disks, 2 NICs): {counted}")
    for line in calls.requests:
        print("  ", line)

    again_volumes = await create_volumes(admin, spec, plan)
    second = await handler(admin, spec)(conversion_done(spec, plan, again_volumes), Step())
    assert again_volumes == volume_ids
    created = first[0].data
    assert isinstance(created, InstanceCreated)
    assert second[0].data == created, "a rerun must find the same server, ports and volumes"
    completed = first[1].data
    assert isinstance(completed, MigrationCompleted) and completed.server_id == created.server_id
    assert created.volume_ids == volume_ids, "root disk first, data disks in source order"

    conn = admin.conn
    server = conn.compute.get_server(created.server_id)
    assert server.status == "ACTIVE"
    assert server.metadata["vmferry_vm"] == spec.vm_key
    attached = [a.volume_id for a in conn.compute.volume_attachments(server)]
    assert sorted(attached) == sorted(volume_ids)
    root = conn.block_storage.get_volume(volume_ids[0])
    assert root.is_bootable
    assert root.volume_image_metadata["hw_firmware_type"] == "uefi"
    assert root.volume_image_metadata["hw_machine_type"] == "q35"
    assert root.volume_image_metadata["os_type"] == "linux"
    ports = [conn.network.get_port(p) for p in created.port_ids]
    assert [p.mac_address for p in ports] == [n.mac.lower() for n in spec.nics]
    assert ports[0].fixed_ips[0]["ip_address"] == ip
    assert all(p.device_id == server.id for p in ports)
    default_group = conn.network.find_security_group("default", project_id=conn.current_project_id)
    assert default_group is not None
    assert all(p.security_group_ids == [default_group.id] for p in ports)
    macs = [a["OS-EXT-IPS-MAC:mac_addr"] for a in server.addresses[openstack_lab.network]]
    assert sorted(macs) == sorted(n.mac.lower() for n in spec.nics)
    assert len(await network.vm_ports(admin, spec.vm_key)) == 2
    assert len(await volumes.vm_volumes(admin, spec.vm_key)) == 2
    assert counted < 60


async def test_teardown_removes_exactly_what_vmferry_made(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made
) -> None:
    spec = vm_spec(disks=2, nics=1)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, flavor_policy="create")
    conn = admin.conn
    net = conn.network.find_network(openstack_lab.network, ignore_missing=False)
    bystander_port = conn.network.create_port(network_id=net.id, name=f"{spec.name}-nic0")
    bystander_volume = conn.block_storage.create_volume(size=1, name=f"{spec.name}-disk2000")
    try:
        made.specs.append(spec)
        volume_ids = await create_volumes(admin, spec, plan)
        emitted = await handler(admin, spec)(conversion_done(spec, plan, volume_ids), Step())
        created = emitted[0].data
        assert isinstance(created, InstanceCreated)

        listing = await teardown.teardown(admin, spec, dry_run=True)
        expected = {
            ("server", created.server_id),
            *(("port", p) for p in created.port_ids),
            *(("volume", v) for v in volume_ids),
            ("flavor", created.flavor_id),
        }
        assert {(r.kind, r.id) for r in listing} == expected
        assert conn.compute.find_server(created.server_id) is not None, "a dry run removes nothing"

        await teardown.teardown(admin, spec)
        assert await teardown.teardown(admin, spec, dry_run=True) == []
        assert conn.compute.find_server(created.server_id) is None
        assert conn.compute.find_flavor(created.flavor_id) is None
        assert all(conn.network.find_port(p) is None for p in created.port_ids)
        for volume_id in volume_ids:
            current = conn.block_storage.find_volume(volume_id)
            assert current is None or current.status == "deleting"
        assert conn.network.find_port(bystander_port.id) is not None, "a same-named port is not vmferry's"
        assert conn.block_storage.find_volume(bystander_volume.id) is not None
    finally:
        conn.network.delete_port(bystander_port, ignore_missing=True)
        conn.block_storage.wait_for_status(bystander_volume, "available", failures=["error"], wait=60)
        conn.block_storage.delete_volume(bystander_volume.id, ignore_missing=True)


async def test_volume_identity_cbt_state_and_conversion_host_device(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made
) -> None:
    spec = vm_spec(disks=1, nics=0)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    volume = await volumes.ensure_volume(admin, spec, spec.disks[0], plan)
    again = await volumes.ensure_volume(admin, spec, spec.disks[0], plan)
    assert again.id == volume.id
    assert volume.volume_type == openstack_lab.volume_type
    admin.conn.block_storage.set_volume_metadata(volume, owner_note="kept")
    await volumes.record_pass(admin, volume.id, "52 3c/41", 2)
    meta = admin.conn.block_storage.get_volume(volume.id).metadata
    assert meta == {
        "vmferry_vm": spec.vm_key,
        "vmferry_disk": "2000",
        "vmferry_managed": "true",
        "owner_note": "kept",
        CHANGE_ID_KEY: "52 3c/41",
        PASS_KEY: "2",
    }

    host_spec = vm_spec(disks=1, nics=0)
    made.specs.append(host_spec)
    host_volumes = await create_volumes(admin, host_spec, plan)
    host = await handler(admin, host_spec)(conversion_done(host_spec, plan, host_volumes), Step())
    assert isinstance(host[0].data, InstanceCreated)
    host_id = host[0].data.server_id
    root = openstack_lab.instances_dir / host_id
    device = await compute.attach(admin, host_id, volume.id, root)
    assert device == device_path(volume.id, root) == openstack_lab.device_path(host_id, volume.id)
    assert device.resolve() == openstack_lab.backing_file(volume.id).resolve()
    assert await compute.attach(admin, host_id, volume.id, root) == device, "attaching twice is a no-op"
    await compute.detach(admin, host_id, volume.id)
    await compute.detach(admin, host_id, volume.id)
    assert not device.exists()


async def test_flavor_choice_is_never_undersized(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter
) -> None:
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    # 4 GiB + 1 MiB of RAM does not fit m1.medium (4096 MiB): the next size up.
    choice = await flavors.choose_flavor(admin, vm_spec(cpus=2, memory_mib=4097), plan)
    assert choice.name == "m1.large"
    assert "4097 MiB" in choice.reason
    assert (await flavors.choose_flavor(admin, vm_spec(cpus=1, memory_mib=2048), plan)).name == "m1.small"
    with pytest.raises(PermanentError, match="no flavor has >= 64 vCPUs"):
        await flavors.choose_flavor(admin, vm_spec(cpus=64), plan)
    # Not booting from volume, the lab's flavors (0 GiB disk) cannot hold 3 GiB of disks.
    local = plan_for(openstack_lab, openstack_lab.admin_cloud, boot_from_volume=False)
    with pytest.raises(PermanentError, match="3 GiB disk"):
        await flavors.choose_flavor(admin, vm_spec(cpus=1, memory_mib=512), local)
    with pytest.raises(PermanentError, match="extra specs"):
        await flavors.choose_flavor(admin, vm_spec(cpus=1), plan, {"hw:cpu_policy": "dedicated"})
    spec = vm_spec(cpus=4, memory_mib=8192)
    explicit = replace(plan, mappings=replace(plan.mappings, flavors={spec.name: "m1.medium"}))
    with pytest.raises(PermanentError, match="too small: 2 vCPUs < 4; 4096 MiB RAM < 8192 MiB"):
        await flavors.choose_flavor(admin, spec, explicit)


async def test_mac_used_by_another_port_is_a_clear_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made
) -> None:
    spec = vm_spec(disks=1, nics=1)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud)
    conn = admin.conn
    net = conn.network.find_network(openstack_lab.network, ignore_missing=False)
    other = conn.network.create_port(network_id=net.id, mac_address=spec.nics[0].mac.lower())
    try:
        findings = await preflight.preflight(admin, spec, plan)
        assert [f.code for f in findings] == ["network.mac_in_use"]
        volume_ids = await create_volumes(admin, spec, plan)
        with pytest.raises(
            PermanentError, match=f"MAC {spec.nics[0].mac.lower()} is already used .* {other.id}"
        ):
            await handler(admin, spec)(conversion_done(spec, plan, volume_ids), Step())
    finally:
        conn.network.delete_port(other, ignore_missing=True)


async def test_ip_outside_the_subnet_is_a_clear_error(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter
) -> None:
    spec = vm_spec(disks=1, nics=1, ip="198.51.100.7")
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True)
    with pytest.raises(PermanentError, match=r"198.51.100.7 is outside the subnets .* \(192.0.2.0/24\)"):
        await network.resolve_target(admin, plan, spec.nics[0])
    findings = await preflight.preflight(admin, spec, plan)
    assert [f.code for f in findings] == ["network.mapping"]
    assert "preserve_ip" in findings[0].fix


async def test_preflight_of_a_fitting_vm_finds_nothing_and_flags_unknown_types(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter
) -> None:
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True)
    assert await preflight.preflight(admin, vm_spec(ip=random_ip()), plan) == []
    odd = replace(plan, mappings=replace(plan.mappings, default_volume_type="no-such-type"))
    big = vm_spec(cpus=1000, memory_mib=10**7)
    codes = sorted(f.code for f in await preflight.preflight(admin, big, odd))
    assert codes == ["flavor.fit", "quota.compute.cores", "quota.compute.ram", "volume_type.unknown"]


async def test_member_setting_a_mac_is_told_it_needs_admin(
    openstack_lab: OpenStackLab, member: OpenStackAdapter
) -> None:
    spec = vm_spec(disks=1, nics=1)
    plan = plan_for(openstack_lab, openstack_lab.member_cloud)
    target = await network.resolve_target(member, plan, spec.nics[0])
    with pytest.raises(PermanentError) as refused:
        await network.ensure_port(member, spec.vm_key, target, "x", [])
    assert "not allowed to create a port with MAC" in refused.value.cause
    assert "admin role" in refused.value.fix and "mac_address" in refused.value.fix


@pytest.fixture
def wrong_clouds_yaml(openstack_lab: OpenStackLab, tmp_path: Path) -> Iterator[Path]:
    clouds = yaml.safe_load(openstack_lab.clouds_yaml.read_text())
    clouds["clouds"][openstack_lab.member_cloud]["auth"]["password"] = "not-the-password"
    path = tmp_path / "clouds.yaml"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(clouds))
    yield path


async def test_wrong_credentials_are_a_clear_permanent_error(
    openstack_lab: OpenStackLab, wrong_clouds_yaml: Path
) -> None:
    adapter = OpenStackAdapter(CloudAuth(cloud=openstack_lab.member_cloud, clouds_yaml=wrong_clouds_yaml))
    with pytest.raises(PermanentError) as refused:
        await adapter.check_auth()
    assert "refused the credentials of cloud 'vmferry-member'" in refused.value.cause
    assert "not-the-password" not in str(refused.value)
    assert "clouds.yaml" in refused.value.fix
    adapter.close()


async def test_ports_without_preserved_mac_are_found_again_by_their_identity(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter, made: Made
) -> None:
    spec = vm_spec(disks=1, nics=2)
    made.specs.append(spec)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_mac=False)
    first = await instances.ensure_ports(admin, spec, plan)
    assert await instances.ensure_ports(admin, spec, plan) == first
    macs = {admin.conn.network.get_port(p).mac_address for p in first}
    assert macs.isdisjoint({n.mac.lower() for n in spec.nics}), "Neutron chose the MACs"


async def test_preflight_flags_an_ip_already_in_use(
    openstack_lab: OpenStackLab, admin: OpenStackAdapter
) -> None:
    ip = random_ip()
    spec = vm_spec(disks=1, nics=1, ip=ip)
    plan = plan_for(openstack_lab, openstack_lab.admin_cloud, preserve_ip=True)
    conn = admin.conn
    net = conn.network.find_network(openstack_lab.network, ignore_missing=False)
    holder = conn.network.create_port(network_id=net.id, fixed_ips=[{"ip_address": ip}])
    try:
        findings = await preflight.preflight(admin, spec, plan)
        assert [(f.code, f.message) for f in findings] == [
            ("network.ip_in_use", f"IP {ip} is already used by port {holder.id}")
        ]
    finally:
        conn.network.delete_port(holder, ignore_missing=True)


async def test_quota_exceeded_is_a_clear_permanent_error(
    openstack_lab: OpenStackLab, member: OpenStackAdapter
) -> None:
    spec = vm_spec(disks=0, nics=0)
    huge = DiskInfo(key=2000, capacity_bytes=5000 * GIB)
    plan = plan_for(openstack_lab, openstack_lab.member_cloud)
    with pytest.raises(PermanentError) as refused:
        await volumes.ensure_volume(member, spec, huge, plan)
    assert refused.value.cause.startswith("quota exceeded in cloud 'vmferry-member' while creating a volume")
    assert "openstack quota set" in refused.value.fix
    assert await volumes.vm_volumes(member, spec.vm_key) == []
