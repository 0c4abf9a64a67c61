"""The transfer function's test world: VMs with real flat files on vcsim-ferry, pass snapshots taken
through the vSphere adapter, Cinder volumes in the OpenStack lab attached to a conversion-host server
(their bytes land in the lab's volume files), nbdkit and libnbd for the copy, and a nats-server for
the state and checkpoint buckets.

``Rig`` ties one test's pieces together; it releases every snapshot it took and removes every volume
it made (detached from the conversion host first) at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.dataplane.conftest import dataplane_tools  # noqa: F401 - a fixture used here
from tests.openstack.conftest import OpenStackLab, openstack_lab  # noqa: F401 - a fixture used here
from tests.vsphere.conftest import lab, vcsim, vcsim_binary  # noqa: F401 - fixtures used here
from tests.vsphere.lab import Lab, VmSpec, request
from vmferry.adapters.dataplane import CopyEngine, EngineConfig
from vmferry.adapters.dataplane.snapshot_sources import TransportSettings
from vmferry.adapters.openstack import compute, teardown, volumes
from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec as DestinationSpec
from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.handles import BusHandle
from vmferry.bus.naming import Naming
from vmferry.bus.provision import provision
from vmferry.bus.state import StateStore
from vmferry.cli.oslab import ensure_conversion_host
from vmferry.functions.transfer import Transfer
from vmferry.schemas.events import DiskSnapshotReady, VmInventory, VolumeSynced
from vmferry.schemas.request import (
    DestinationRef,
    Mappings,
    MigrationOptions,
    MigrationPlan,
    SourceRef,
)
from vmferry.schemas.state import DiskProgress

MIB = 1024 * 1024
REQUEST_ID = "req-transfer"
SOURCE = "lab"


@dataclass
class Step:
    """What the runner offers a handler; counts heartbeats."""

    delivery: int = 1
    function: str = "transfer"
    heartbeats: int = 0

    async def heartbeat(self) -> None:
        self.heartbeats += 1


@dataclass(frozen=True)
class SourceVm:
    """A VM made on the simulator: its moref, key, inventory and the files holding its disks."""

    moref: str
    vm_key: str
    inventory: VmInventory
    flat_files: dict[int, Path]

    @property
    def disk_keys(self) -> list[int]:
        """Device keys of its disks, in order."""
        return [disk.key for disk in self.inventory.disks]


@dataclass
class Rig:
    """One test's source, destination, bus and handler."""

    lab: Lab
    vsphere: AsyncVsphere
    admin: OpenStackAdapter
    bus: BusHandle
    openstack: OpenStackLab
    host_id: str
    vms: list[SourceVm] = field(default_factory=list)
    snapshots: list[tuple[str, int]] = field(default_factory=list)

    def plan(self, **options: Any) -> MigrationPlan:
        """The migration plan: the lab's volume type, https transport unless told otherwise."""
        return MigrationPlan(
            source=SourceRef(name=SOURCE),
            destination=DestinationRef(cloud=self.openstack.admin_cloud),
            mode="warm",
            mappings=Mappings(default_volume_type=self.openstack.volume_type),
            options=MigrationOptions(**({"transport": "https"} | options)),
        )

    async def make_vm(self, disks: Sequence[int], cbt: bool = True) -> SourceVm:
        """A VM with thin disks of these sizes, discovered through the adapter."""
        name = f"xfer-{uuid.uuid4().hex[:12]}"
        # vcsim derives a VM's instanceUuid (so its vm key, so its volumes' identity) from the path of
        # its .vmx: a folder of its own keeps it apart from every other user of the OpenStack lab.
        made = self.lab.create_vm(VmSpec(name=name, disks=tuple(disks), cbt=cbt, directory=name))
        [found] = await self.vsphere.discover(request({"name": name}, request_id=REQUEST_ID))
        inventory = found.vm.inventory()
        vm = SourceVm(
            moref=made._moId,
            vm_key=found.vm.vm_key,
            inventory=inventory,
            flat_files={d.key: self.lab.flat_file(d.backing_file) for d in inventory.disks},
        )
        self.vms.append(vm)
        return vm

    async def snapshot(self, vm: SourceVm, pass_no: int, plan: MigrationPlan) -> list[DiskSnapshotReady]:
        """Take the pass snapshot through the adapter; one disk.snapshot.ready per disk."""
        taken = await self.vsphere.take_pass_snapshot(
            vm.moref,
            request_id=REQUEST_ID,
            vm_key=vm.vm_key,
            pass_no=pass_no,
            require_change_ids=plan.options.enable_cbt,
        )
        self.snapshots.append((vm.moref, pass_no))
        return [
            DiskSnapshotReady(
                request_id=REQUEST_ID,
                vm_key=vm.vm_key,
                plan=plan,
                vm=vm.inventory,
                pass_no=pass_no,
                vm_moref=vm.moref,
                snapshot_moref=taken.snapshot_moref,
                disk=msgspec.structs.replace(disk, backing_file=taken.disk(disk.key).backing_file),
                disk_count=len(vm.inventory.disks),
                change_id=taken.disk(disk.key).change_id,
            )
            for disk in vm.inventory.disks
        ]

    async def release(self, vm: SourceVm, pass_no: int) -> None:
        """Remove a pass snapshot (as settle does once every disk of the pass is synced)."""
        await self.vsphere.release_pass(vm.moref, REQUEST_ID, pass_no)
        self.snapshots.remove((vm.moref, pass_no))

    def set_cbt(self, vm: SourceVm, enabled: bool) -> None:
        """Switch changed block tracking of the VM (off and on again is a CBT reset)."""
        spec: Any = vim.vm.ConfigSpec
        wait: Any = WaitForTask
        wait(self.lab.vm(vm.moref).ReconfigVM_Task(spec(changeTrackingEnabled=enabled)))

    def handler(self, engine: EngineConfig | None = None, **overrides: Any) -> Transfer:
        """The handler wired to this rig (overrides replace any field)."""

        async def clients(name: str) -> AsyncVsphere:
            assert name == SOURCE
            return self.vsphere

        async def adapters(_: DestinationRef) -> OpenStackAdapter:
            return self.admin

        fields: dict[str, Any] = {
            "clients": clients,
            "adapters": adapters,
            "bus": self.bus,
            "conversion_host": lambda _plan: self.host_id,
            "device_root": lambda server_id: self.openstack.instances_dir / server_id,
            "engine": CopyEngine(engine or EngineConfig()),
            "transports": {SOURCE: TransportSettings()},
            "progress_every": 0.2,
            "heartbeat_every": 0.5,
        }
        return Transfer(**(fields | overrides))

    async def run(
        self, handler: Transfer, ready: DiskSnapshotReady, step: Step | None = None
    ) -> VolumeSynced:
        """Deliver one event; returns the one volume.synced it emits."""
        event = CloudEvent(
            id=f"{ready.vm_key}-{ready.disk.key}-{ready.pass_no}",
            type=DiskSnapshotReady.spec.ce_type,
            source="test",
            subject=ready.vm_key,
            data=ready,
        )
        emits = await handler(event, step or Step())
        assert len(emits) == 1
        assert emits[0].key == f"disk-{ready.disk.key}"
        assert isinstance(emits[0].data, VolumeSynced)
        return emits[0].data

    def volume_file(self, volume_id: str) -> Path:
        """The file behind a Cinder volume."""
        return self.openstack.backing_file(volume_id)

    async def volume(self, volume_id: str) -> Any:
        """The volume as Cinder reports it now."""
        return await self.admin.call("reading a volume", self.admin.conn.block_storage.get_volume, volume_id)

    async def vm_volumes(self, vm: SourceVm) -> list[Any]:
        """Every volume carrying the VM's identity."""
        return await volumes.vm_volumes(self.admin, vm.vm_key)

    async def progress(self, vm: SourceVm, disk_key: int) -> DiskProgress | None:
        """The disk's progress in the VM's state."""
        state, _ = await self.bus.state.get(vm.vm_key)
        return state.disks.get(str(disk_key)) if state is not None else None

    async def cleanup(self) -> None:
        """Release snapshots, detach and remove the VMs' volumes."""
        for moref, pass_no in list(self.snapshots):
            await self.vsphere.release_pass(moref, REQUEST_ID, pass_no)
        for vm in self.vms:
            for volume in await volumes.vm_volumes(self.admin, vm.vm_key):
                await compute.detach(self.admin, self.host_id, volume.id)
            await teardown.teardown(self.admin, DestinationSpec.of_inventory(vm.vm_key, vm.inventory))


def assert_same_bytes(rig: Rig, volume_id: str, flat_file: Path) -> None:
    """The volume holds the disk's bytes and nothing past the disk's end."""
    expected = flat_file.read_bytes()
    backing = rig.volume_file(volume_id)
    with backing.open("rb") as data:
        assert data.read(len(expected)) == expected, f"volume {volume_id} differs from {flat_file}"
    tail = backing.stat().st_size - len(expected)
    assert tail >= 0
    with backing.open("rb") as data:
        data.seek(len(expected))
        assert data.read(1 << 20).count(0) == min(tail, 1 << 20), "past the disk's end reads as zeroes"


@pytest.fixture
async def bus(js: JetStreamContext, naming: Naming) -> BusHandle:
    """A provisioned prefix (state and checkpoint buckets) behind a bound BusHandle."""
    await provision(js, naming, [])
    handle = BusHandle()
    handle.bind(js, naming, await StateStore.open(js, naming.state_bucket))
    return handle


@pytest.fixture
async def vsphere(lab: Lab) -> AsyncIterator[AsyncVsphere]:  # noqa: F811
    """The adapter's asyncio client on the simulator."""
    client = await AsyncVsphere.connect(lab.settings())
    yield client
    await client.close()


@pytest.fixture
async def admin(openstack_lab: OpenStackLab) -> AsyncIterator[OpenStackAdapter]:  # noqa: F811
    """The adapter with the lab's admin cloud."""
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    yield adapter
    adapter.close()


@pytest.fixture(scope="session")
def conversion_host(openstack_lab: OpenStackLab) -> Iterator[str]:  # noqa: F811
    """A server standing for the conversion host (volumes attached to it show under its device root)."""
    server_id = ensure_conversion_host(openstack_lab, f"xfer-conversion-host-{uuid.uuid4().hex[:6]}")
    try:
        yield server_id
    finally:
        conn = openstack_lab.connect(openstack_lab.admin_cloud)
        server = conn.compute.find_server(server_id)
        if server is not None:
            conn.compute.delete_server(server)
            conn.compute.wait_for_delete(server, wait=300)
        conn.close()


@pytest.fixture
async def rig(
    dataplane_tools: None,  # noqa: F811
    lab: Lab,  # noqa: F811
    vsphere: AsyncVsphere,
    admin: OpenStackAdapter,
    bus: BusHandle,
    openstack_lab: OpenStackLab,  # noqa: F811
    conversion_host: str,
) -> AsyncIterator[Rig]:
    """The test world; cleaned up at the end."""
    world = Rig(lab, vsphere, admin, bus, openstack_lab, conversion_host)
    try:
        yield world
    finally:
        await world.cleanup()


__all__ = ["MIB", "REQUEST_ID", "SOURCE", "Rig", "SourceVm", "Step", "assert_same_bytes"]
