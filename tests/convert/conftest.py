"""Fixtures for the convert function: a bus handle bound to a provisioned prefix, the OpenStack lab with a
conversion-host server, replica volumes holding a test guest's bytes (and the pass the copy recorded),
hand-built vm.synced events (final or precopy, cold or warm), and stand-ins for libguestfs tools that
fail the way a broken conversion host does (injected causes)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from tests.conversion import conftest as conversion_fixtures
from tests.conversion.conftest import CACHE
from tests.openstack import conftest as openstack_fixtures
from tests.openstack.conftest import OpenStackLab
from vmferry.adapters.conversion import HostConfig
from vmferry.adapters.openstack import clones, teardown, volumes
from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec, gib_for
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.handles import BusHandle
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.state import StateStore
from vmferry.functions.convert import Convert
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.events import (
    DiskInfo,
    NicInfo,
    SyncedVolume,
    VmIdentity,
    VmInventory,
    VmSynced,
)
from vmferry.schemas.request import (
    ConversionMode,
    DestinationRef,
    MigrationOptions,
    MigrationPlan,
    Mode,
    SourceRef,
)

GIB = 1024**3
REQUEST_ID = "req-convert"

# The lab, the conversion toolchain check and the cached guest images, shared with their own test folders.
openstack_lab = openstack_fixtures.openstack_lab
conversion_tools = conversion_fixtures.conversion_tools
guest_images = conversion_fixtures.guest_images


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "guest_conversion: converts and boots real guest images (minutes under TCG emulation)"
    )


@dataclass
class Step:
    """What the runner offers a handler; counts heartbeats."""

    delivery: int = 1
    function: str = "convert"
    beats: int = 0

    async def heartbeat(self) -> None:
        self.beats += 1


@pytest.fixture
async def bus(js: JetStreamContext, naming: Naming) -> BusHandle:
    """A bus handle bound to a freshly provisioned prefix (state bucket and log store)."""
    await provision(js, naming, [])
    handle = BusHandle()
    handle.bind(js, naming, await StateStore.open(js, naming.state_bucket))
    return handle


@pytest.fixture
def work_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short work root (the conversion's Unix sockets live below it, see MAX_WORK_ROOT)."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture
async def admin(openstack_lab: OpenStackLab) -> AsyncIterator[OpenStackAdapter]:
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    yield adapter
    adapter.close()


@pytest.fixture(scope="session")
def conversion_host(openstack_lab: OpenStackLab) -> Iterator[str]:
    """A server standing for the conversion host (the lab shows its attached volumes as devices)."""
    conn = openstack_lab.connect(openstack_lab.admin_cloud)
    bs = conn.block_storage
    boot = bs.create_volume(
        size=1, name=f"conv-host-{uuid.uuid4().hex[:8]}", volume_type=openstack_lab.volume_type
    )
    boot = bs.wait_for_status(boot, "available", failures=["error"], interval=0.5, wait=120)
    bs.set_volume_bootable_status(boot, True)
    flavor = conn.compute.find_flavor(openstack_lab.flavors[0], ignore_missing=False)
    server = conn.compute.create_server(
        name=f"conversion-host-{uuid.uuid4().hex[:8]}",
        flavor_id=flavor.id,
        networks="none",
        block_device_mapping=[
            {
                "boot_index": 0,
                "uuid": boot.id,
                "source_type": "volume",
                "destination_type": "volume",
                "delete_on_termination": True,
            }
        ],
    )
    try:
        conn.compute.wait_for_server(server, status="ACTIVE", failures=["ERROR"], interval=1, wait=180)
        yield str(server.id)
    finally:
        conn.compute.delete_server(server, ignore_missing=True)
        conn.compute.wait_for_delete(server, wait=120)
        conn.close()


def plan(lab: OpenStackLab, conversion: ConversionMode = "clone", mode: Mode = "cold") -> MigrationPlan:
    return MigrationPlan(
        source=SourceRef(name="lab"),
        destination=DestinationRef(cloud=lab.admin_cloud),
        mode=mode,
        options=MigrationOptions(conversion=conversion),
    )


def inventory(instance_uuid: str, disks: list[DiskInfo], macs: tuple[str, ...] = ()) -> VmInventory:
    return VmInventory(
        identity=VmIdentity(instance_uuid=instance_uuid, name="v2vtest"),
        cpus=1,
        memory_mib=1024,
        guest_id="debian12_64Guest",
        disks=disks,
        nics=[
            NicInfo(key=4000 + i, mac=mac, adapter_type="vmxnet3", network="VM Network")
            for i, mac in enumerate(macs)
        ],
    )


def write_image(image: Path, backing: Path) -> None:
    """Put a guest's bytes into a volume's backing file (sparse, the volume keeps its size)."""
    size = backing.stat().st_size
    subprocess.run(["cp", "--sparse=always", "--reflink=never", str(image), str(backing)], check=True)
    os.truncate(backing, size)


@dataclass
class Vm:
    """One source VM of a test: its key, its replica volumes (disk order) and the event builder."""

    lab: OpenStackLab
    adapter: OpenStackAdapter
    instance_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    disks: list[DiskInfo] = field(default_factory=list)
    replicas: list[SyncedVolume] = field(default_factory=list)

    @property
    def vm_key(self) -> str:
        return vm_key_for(self.instance_uuid)

    async def add_replica(self, image: Path | None, size_gib: int = 1) -> str:
        """A replica volume as the copy leaves it (identity metadata, the guest's bytes in its file, pass 1
        of the request recorded)."""
        size = await asyncio.to_thread(lambda: image.stat().st_size) if image is not None else 0
        disk = DiskInfo(key=2000 + len(self.disks), capacity_bytes=max(size, size_gib * GIB))
        bs = self.adapter.conn.block_storage
        made = bs.create_volume(
            size=gib_for(disk.capacity_bytes),
            name=f"replica-{uuid.uuid4().hex[:8]}",
            volume_type=self.lab.volume_type,
            metadata=volumes.identity(self.vm_key, disk.key),
        )
        bs.wait_for_status(made, "available", failures=["error"], interval=0.5, wait=120)
        backing = self.lab.backing_file(made.id)
        if image is not None:
            await asyncio.to_thread(write_image, image, backing)
        await volumes.record_pass(self.adapter, made.id, "52 aa-pass-1", 1, REQUEST_ID)
        self.disks.append(disk)
        self.replicas.append(
            SyncedVolume(disk_key=disk.key, volume_id=made.id, bytes_copied=disk.capacity_bytes)
        )
        return str(made.id)

    def synced(
        self,
        conversion: ConversionMode = "clone",
        macs: tuple[str, ...] = (),
        final: bool = True,
        mode: Mode = "cold",
    ) -> CloudEvent[VmSynced]:
        data = VmSynced(
            request_id=REQUEST_ID,
            vm_key=self.vm_key,
            plan=plan(self.lab, conversion, mode),
            vm=inventory(self.instance_uuid, self.disks, macs),
            pass_no=1,
            final=final,
            volumes=self.replicas,
        )
        return CloudEvent(
            id=uuid.uuid4().hex, type=VmSynced.spec.ce_type, source="test", subject=self.vm_key, data=data
        )

    async def inspection_clones(self) -> list[Any]:
        """The VM's inspection clones, found by identity as vmferry finds them."""
        found: list[Any] = []
        for disk in self.disks:
            found += await clones.find_clones(self.adapter, self.vm_key, disk.key, clones.INSPECTION_ROLE)
        return found

    def metadata(self, volume_id: str) -> dict[str, str]:
        return dict(self.adapter.conn.block_storage.get_volume(volume_id).metadata or {})

    def volume(self, volume_id: str) -> Any:
        return self.adapter.conn.block_storage.find_volume(volume_id, ignore_missing=True)


@pytest.fixture
async def vm(openstack_lab: OpenStackLab, admin: OpenStackAdapter) -> AsyncIterator[Vm]:
    """A VM whose replicas and conversion clones are removed afterwards (vmferry's own teardown)."""
    made = Vm(openstack_lab, admin)
    yield made
    await teardown.teardown(
        admin, VmSpec(vm_key=made.vm_key, name=f"none-{uuid.uuid4().hex}", cpus=1, memory_mib=1)
    )


def handler(
    adapter: OpenStackAdapter,
    bus: BusHandle,
    lab: OpenStackLab,
    server_id: str,
    work_root: Path,
    host: HostConfig | None = None,
    **options: Any,
) -> Convert:
    """The convert handler wired to the lab: the conversion host's devices under its instances dir."""

    async def adapters(_destination: DestinationRef) -> OpenStackAdapter:
        return adapter

    return Convert(
        adapters=adapters,
        bus=bus,
        host=host or HostConfig(appliance_cache=CACHE / "libguestfs"),
        work_root=work_root,
        conversion_host=lambda _plan: server_id,
        device_root=lambda server: lab.instances_dir / server,
        **options,
    )


def failing_tool(directory: Path, real: str, *output: str, delay: float = 0.0) -> str:
    """A stand-in for ``real`` that prints ``output`` and exits 1 (after ``delay`` seconds), as a broken
    host would; the capability probes (--version, --help, --machine-readable, virt-customize's dry run)
    still reach the real tool."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"broken-{real}"
    lines = "\n".join(output)
    path.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        '  case "$arg" in --version|--help|--machine-readable|-n) exec ' + real + ' "$@";; esac\n'
        "done\n"
        f"sleep {delay}\n"
        f"cat <<'EOF'\n{lines}\nEOF\n"
        "exit 1\n"
    )
    path.chmod(0o755)
    return str(path)
