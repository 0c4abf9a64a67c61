"""The OpenStack lab does what vmferry's OpenStack side needs: auth, volumes with real bytes, ports, boot.

Every call goes through openstacksdk to the real services; the only stand-ins are Nova's fake
hypervisor, the lab's file-backed Cinder driver and its port-binding ML2 driver.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from openstack import exceptions

from tests.openstack.conftest import OpenStackLab, wait_for

pytestmark = [
    # The first test to ask for the lab may have to start it (and build its venv on a fresh machine).
    pytest.mark.timeout(900),
    # openstacksdk 4.x trips over its own deprecations (e.g. every resource it builds calls its
    # deprecated _compute_attributes; from 4.21 every cloud read from clouds.yaml warns about
    # InfluxDB, configured or not): these categories only ever name openstacksdk's own removals.
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK50Warning"),
    pytest.mark.filterwarnings("ignore::openstack.warnings.RemovedInSDK60Warning"),
]
GIB = 1024**3


class Cleanup:
    """Resources to delete after a test, in the order OpenStack needs: servers, volumes, ports, images."""

    def __init__(self) -> None:
        self.servers: list[tuple[Any, Any]] = []
        self.volumes: list[tuple[Any, Any]] = []
        self.ports: list[tuple[Any, Any]] = []
        self.images: list[tuple[Any, str]] = []

    def run(self) -> None:
        for conn, server in self.servers:
            conn.compute.delete_server(server, ignore_missing=True)
            conn.compute.wait_for_delete(server, wait=120)
        for conn, volume in self.volumes:
            current = conn.block_storage.find_volume(volume.id)
            if current is not None:
                # A server's deletion detaches its volumes asynchronously.
                conn.block_storage.wait_for_status(current, "available", failures=["error"], wait=60)
                conn.block_storage.delete_volume(current)
                conn.block_storage.wait_for_delete(current, wait=60)
        for conn, port in self.ports:
            conn.network.delete_port(port, ignore_missing=True)
        for conn, image_id in self.images:
            conn.image.delete_image(image_id, ignore_missing=True)
        self.servers, self.volumes, self.ports, self.images = [], [], [], []


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    pending = Cleanup()
    yield pending
    pending.run()


@pytest.fixture(scope="module")
def admin(openstack_lab: OpenStackLab) -> Iterator[Any]:
    conn = openstack_lab.connect(openstack_lab.admin_cloud)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def member(openstack_lab: OpenStackLab) -> Iterator[Any]:
    conn = openstack_lab.connect(openstack_lab.member_cloud)
    yield conn
    conn.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def available_volume(conn: Any, lab: OpenStackLab, cleanup: Cleanup, size: int = 1, **attrs: Any) -> Any:
    volume = conn.block_storage.create_volume(
        size=size, name=unique("vol"), volume_type=lab.volume_type, **attrs
    )
    cleanup.volumes.append((conn, volume))
    return conn.block_storage.wait_for_status(volume, "available", failures=["error"], interval=0.5, wait=120)


def boot_from_volume(conn: Any, lab: OpenStackLab, cleanup: Cleanup, volume: Any, networks: Any) -> Any:
    conn.block_storage.set_volume_bootable_status(volume, True)
    flavor = conn.compute.find_flavor(lab.flavors[0], ignore_missing=False)
    server = conn.compute.create_server(
        name=unique("srv"),
        flavor_id=flavor.id,
        networks=networks,
        block_device_mapping=[
            {
                "boot_index": 0,
                "uuid": volume.id,
                "source_type": "volume",
                "destination_type": "volume",
                "delete_on_termination": False,
            }
        ],
    )
    cleanup.servers.append((conn, server))
    return conn.compute.wait_for_server(server, status="ACTIVE", failures=["ERROR"], interval=1, wait=180)


def test_admin_and_member_clouds_authenticate_with_their_own_roles(
    openstack_lab: OpenStackLab, admin: Any, member: Any
) -> None:
    assert admin.authorize()
    assert member.authorize()
    assert admin.identity.get_project(admin.current_project_id).name == "admin"
    assert member.identity.get_project(member.current_project_id).name == openstack_lab.project
    assert any(user.name == "admin" for user in admin.identity.users())
    # Real Keystone policy: a project member may not list users.
    with pytest.raises(exceptions.ForbiddenException):
        list(member.identity.users())


def test_volume_is_a_real_file_the_conversion_host_sees_while_attached(
    openstack_lab: OpenStackLab, member: Any, cleanup: Cleanup
) -> None:
    data = available_volume(
        member, openstack_lab, cleanup, size=2, metadata={"vmware_disk": "[ds1] vm/vm.vmdk"}
    )
    backing = openstack_lab.backing_file(data.id)
    assert backing.stat().st_size == 2 * GIB
    assert backing.stat().st_blocks * 512 < GIB, "a new volume should be a sparse file"
    assert data.metadata == {"vmware_disk": "[ds1] vm/vm.vmdk"}

    conversion_host = boot_from_volume(
        member, openstack_lab, cleanup, available_volume(member, openstack_lab, cleanup), networks="none"
    )
    device = openstack_lab.device_path(conversion_host.id, data.id)
    assert not device.exists()

    member.compute.create_volume_attachment(conversion_host, volume=data.id)
    member.block_storage.wait_for_status(data, "in-use", failures=["error"], interval=0.5, wait=120)
    wait_for(f"{device} on the conversion host", device.exists, timeout=30)
    assert device.resolve() == backing.resolve()

    # The data plane writes through the device; the bytes land in the volume's backing file ...
    payload = os.urandom(4096)
    offset = GIB + 512 * 1024
    with device.open("r+b") as disk:
        disk.seek(offset)
        disk.write(payload)
    with backing.open("rb") as volume_file:
        volume_file.seek(offset)
        assert volume_file.read(len(payload)) == payload
    # ... and what is in the volume reads back through the device.
    with backing.open("r+b") as volume_file:
        volume_file.write(b"MBR!")
    with device.open("rb") as disk:
        assert disk.read(4) == b"MBR!"

    member.compute.delete_volume_attachment(conversion_host, data.id)
    member.block_storage.wait_for_status(data, "available", failures=["error"], interval=0.5, wait=120)
    assert not device.exists(), "a detached volume must disappear from the conversion host"
    with backing.open("rb") as volume_file:
        volume_file.seek(offset)
        assert volume_file.read(len(payload)) == payload, "detaching must keep the data"

    cleanup.run()
    assert not backing.exists(), "deleting the volume must delete its backing file"


def test_port_with_fixed_mac_binds_on_the_compute_host(
    openstack_lab: OpenStackLab, admin: Any, member: Any, cleanup: Cleanup
) -> None:
    network = member.network.find_network(openstack_lab.network, ignore_missing=False)
    mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in os.urandom(3))
    # Neutron's policy lets only an admin (or the network's owner) choose a MAC on a shared network.
    with pytest.raises(exceptions.ForbiddenException):
        member.network.create_port(network_id=network.id, mac_address=mac)
    port = admin.network.create_port(
        network_id=network.id, mac_address=mac, name=unique("port"), project_id=member.current_project_id
    )
    cleanup.ports.append((admin, port))
    assert port.mac_address == mac
    assert port.binding_vif_type == "unbound"

    bound = admin.network.update_port(port, binding_host_id=openstack_lab.compute_host)
    assert bound.binding_vif_type == "ovs"
    assert wait_for("port ACTIVE", lambda: admin.network.get_port(port.id).status == "ACTIVE", timeout=30)

    admin.network.update_port(port, binding_host_id="")
    assert admin.network.get_port(port.id).binding_vif_type == "unbound"


def test_server_boots_from_volume_with_fixed_mac_port_and_cleans_up(
    openstack_lab: OpenStackLab, admin: Any, member: Any, cleanup: Cleanup
) -> None:
    network = member.network.find_network(openstack_lab.network, ignore_missing=False)
    mac = "00:50:56:" + ":".join(f"{b:02x}" for b in os.urandom(3))
    port = admin.network.create_port(
        network_id=network.id, mac_address=mac, name=unique("port"), project_id=member.current_project_id
    )
    cleanup.ports.append((admin, port))
    root = available_volume(member, openstack_lab, cleanup)

    server = boot_from_volume(member, openstack_lab, cleanup, root, networks=[{"port": port.id}])

    assert server.status == "ACTIVE"
    addresses = server.addresses[openstack_lab.network]
    assert [a["OS-EXT-IPS-MAC:mac_addr"] for a in addresses] == [mac]
    attached = member.block_storage.get_volume(root.id)
    assert attached.status == "in-use"
    assert [a["server_id"] for a in attached.attachments] == [server.id]
    bound = admin.network.get_port(port.id)
    assert (bound.device_id, bound.device_owner, bound.binding_vif_type) == (server.id, "compute:nova", "ovs")
    assert bound.binding_host_id == openstack_lab.compute_host
    assert openstack_lab.device_path(server.id, root.id).exists()

    cleanup.run()
    assert member.compute.find_server(server.id) is None
    assert member.block_storage.find_volume(root.id) is None
    assert not openstack_lab.backing_file(root.id).exists()
    assert not openstack_lab.device_path(server.id, root.id).exists()
    assert admin.network.find_port(port.id) is None


def test_image_bytes_reach_a_volume_and_come_back_through_glance(
    openstack_lab: OpenStackLab, member: Any, cleanup: Cleanup
) -> None:
    payload = os.urandom(1024 * 1024)
    image = member.image.create_image(
        name=unique("img"), disk_format="raw", container_format="bare", data=payload, allow_duplicates=True
    )
    cleanup.images.append((member, image.id))
    wait_for("image active", lambda: member.image.get_image(image.id).status == "active", timeout=60)

    volume = available_volume(member, openstack_lab, cleanup, image_id=image.id)
    assert volume.is_bootable
    with openstack_lab.backing_file(volume.id).open("rb") as volume_file:
        assert volume_file.read(len(payload)) == payload

    upload = member.block_storage.upload_volume_to_image(
        volume, unique("img"), disk_format="raw", container_format="bare"
    )
    cleanup.images.append((member, upload["image_id"]))
    wait_for("uploaded image active", lambda: member.image.get_image(upload["image_id"]).status == "active")
    assert member.image.download_image(upload["image_id"]).content[: len(payload)] == payload
