"""Builders for vSphere test inventories on vcsim-ferry: folders, VMs with real disk files, NICs.

They use plain pyvmomi on a session of their own (the "lab" side), so the adapter under test is
only ever exercised through its own client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl
from pyVmomi.SoapAdapter import SoapStubAdapter

from vmferry.adapters.vsphere.settings import VsphereSettings
from vmferry.schemas.request import MigrationRequest

if TYPE_CHECKING:
    from tests.vsphere.conftest import VcsimServer

MIB = 1024 * 1024
KIB = 1024


@dataclass(frozen=True)
class Nic:
    """A NIC to create: on a standard network (by name) or, with ``distributed``, on the DVPG."""

    mac: str
    network: str = "VM Network"
    distributed: bool = False
    adapter: str = "vmxnet3"


@dataclass(frozen=True)
class VmSpec:
    """What create_vm builds; disks are thin FlatVer2 files on the test's datastore."""

    name: str
    disks: Sequence[int] = (4 * MIB,)
    nics: Sequence[Nic] = ()
    folder: str = ""
    guest_id: str = "rhel8_64Guest"
    firmware: str = "bios"
    cpus: int = 2
    memory_mb: int = 256
    cbt: bool = False
    directory: str = ""
    disk_mode: str = "persistent"
    extra_devices: Sequence[Any] = field(default_factory=tuple)


class Lab:
    """A pyvmomi session on the simulator for building and inspecting inventories."""

    def __init__(self, vcsim: VcsimServer) -> None:
        self.vcsim = vcsim
        self.stub = SoapStubAdapter(host=vcsim.host, port=vcsim.port, sslContext=vcsim.ssl_context())
        self.si = vim.ServiceInstance("ServiceInstance", self.stub)
        self.content = self.si.RetrieveContent()
        self.content.sessionManager.Login(vcsim.user, vcsim.password(), None)
        self.datacenter = self.content.rootFolder.childEntity[0]
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [vim.HostSystem], True)
        self.host = next(h for h in view.view if isinstance(h.parent, vim.ClusterComputeResource))
        view.Destroy()
        self.pool = self.host.parent.resourcePool
        self._created = 0
        self.dvpg = next(
            n
            for n in self.datacenter.network
            if isinstance(n, vim.dvs.DistributedVirtualPortgroup) and "Uplinks" not in n.name
        )

    def close(self) -> None:
        try:
            self.content.sessionManager.Logout()
        finally:
            self.stub.DropConnections()

    def settings(self, **overrides: Any) -> VsphereSettings:
        """Adapter settings for this simulator: verified TLS with its certificate as CA."""
        values: dict[str, Any] = {
            "host": self.vcsim.host,
            "port": self.vcsim.port,
            "user": self.vcsim.user,
            "password_file": self.vcsim.password_file,
            "ca_file": self.vcsim.ca_file,
            "keepalive": 0,
            "label": "lab",
        }
        return VsphereSettings(**(values | overrides))

    # -- building ----------------------------------------------------------------------------

    def folder(self, path: str) -> Any:
        """The VM folder at ``path`` below the datacenter's vm folder, created as needed."""
        current = self.datacenter.vmFolder
        for part in [p for p in path.split("/") if p]:
            existing = next(
                (c for c in current.childEntity if isinstance(c, vim.Folder) and c.name == part), None
            )
            current = existing or current.CreateFolder(part)
        return current

    def create_vm(self, spec: VmSpec) -> vim.VirtualMachine:
        """CreateVM_Task on a cluster host; returns the VM.

        The disks' files are made here (sparse ``-flat.vmdk`` of the disk's size in a folder named
        ``vmNNNN``) and attached as they are: vcsim would otherwise name files after the VM, which
        fails for names with '/'.
        """
        self._created += 1
        directory = spec.directory or f"vm{self._created:04d}"
        devices = [vim.vm.device.VirtualDeviceSpec(operation="add", device=self._controller())]
        devices += [self._disk_spec(directory, i, size, spec.disk_mode) for i, size in enumerate(spec.disks)]
        devices += [
            vim.vm.device.VirtualDeviceSpec(operation="add", device=self._nic(i, n))
            for i, n in enumerate(spec.nics)
        ]
        devices += [vim.vm.device.VirtualDeviceSpec(operation="add", device=d) for d in spec.extra_devices]
        config = vim.vm.ConfigSpec(
            name=spec.name,
            guestId=spec.guest_id,
            numCPUs=spec.cpus,
            memoryMB=spec.memory_mb,
            firmware=spec.firmware,
            files=vim.vm.FileInfo(vmPathName=f"[{self.vcsim.datastore}] {directory}/{directory}.vmx"),
            deviceChange=devices,
            changeTrackingEnabled=spec.cbt or None,
        )
        task = self.folder(spec.folder).CreateVM_Task(config=config, pool=self.pool, host=self.host)
        WaitForTask(task)
        return task.info.result

    def _controller(self) -> Any:
        return vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing")

    def _disk_spec(self, directory: str, index: int, size: int, mode: str) -> Any:
        folder = self.vcsim.datastore_dir / directory
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"disk{index}.vmdk").touch()
        with (folder / f"disk{index}-flat.vmdk").open("wb") as data:
            data.truncate(size)
        disk = vim.vm.device.VirtualDisk(
            key=-(index + 1),
            controllerKey=1000,
            unitNumber=index if index < 7 else index + 1,
            capacityInKB=size // KIB,
            capacityInBytes=size,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{self.vcsim.datastore}] {directory}/disk{index}.vmdk",
                diskMode=mode,
                thinProvisioned=True,
            ),
        )
        return vim.vm.device.VirtualDeviceSpec(operation="add", device=disk)

    def _nic(self, index: int, nic: Nic) -> Any:
        kinds = {
            "vmxnet3": vim.vm.device.VirtualVmxnet3,
            "e1000e": vim.vm.device.VirtualE1000e,
            "e1000": vim.vm.device.VirtualE1000,
        }
        if nic.distributed:
            backing: Any = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(
                    portgroupKey=self.dvpg.key, switchUuid=self.dvpg.config.distributedVirtualSwitch.uuid
                )
            )
        else:
            backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=nic.network)
        return kinds[nic.adapter](
            key=-(100 + index), addressType="manual", macAddress=nic.mac, backing=backing
        )

    # -- inspecting --------------------------------------------------------------------------

    def vm(self, moref: str) -> vim.VirtualMachine:
        return vim.VirtualMachine(moref, self.stub)

    def snapshot_names(self, vms: Iterable[vim.VirtualMachine] | None = None) -> dict[str, list[str]]:
        """Snapshot names of every VM (or of ``vms``), read through the PropertyCollector."""
        if vms is None:
            view = self.content.viewManager.CreateContainerView(
                self.content.rootFolder, [vim.VirtualMachine], True
            )
            vms = list(view.view)
            view.Destroy()
        vms = list(vms)
        if not vms:
            return {}
        collector = self.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=vm) for vm in vms],
            propSet=[
                vmodl.query.PropertyCollector.PropertySpec(
                    type=vim.VirtualMachine, pathSet=["snapshot", "name"]
                )
            ],
        )
        result: dict[str, list[str]] = {}
        for content in collector.RetrieveContents([spec]):
            props = {p.name: p.val for p in content.propSet}
            names: list[str] = []
            stack = list(getattr(props.get("snapshot"), "rootSnapshotList", None) or [])
            while stack:
                node = stack.pop()
                names.append(node.name)
                stack.extend(node.childSnapshotList or [])
            result[str(props.get("name"))] = sorted(names)
        return result

    def vmferry_snapshots(self) -> list[str]:
        """Every snapshot whose name starts with vmferry-, as "vm: name"."""
        return sorted(
            f"{vm}: {name}"
            for vm, names in self.snapshot_names().items()
            for name in names
            if name.startswith("vmferry-")
        )

    def flat_file(self, backing_file: str) -> Path:
        """The local file holding a disk's bytes: "[ferry] vm/vm.vmdk" -> <datastore>/vm/vm-flat.vmdk."""
        relative = backing_file.split("] ", 1)[1]
        return self.vcsim.datastore_dir / relative.replace(".vmdk", "-flat.vmdk", 1)

    def session_keys(self) -> list[str]:
        """Keys of every session the simulator knows."""
        collector = self.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=self.content.sessionManager)],
            propSet=[
                vmodl.query.PropertyCollector.PropertySpec(type=vim.SessionManager, pathSet=["sessionList"])
            ],
        )
        contents = collector.RetrieveContents([spec])
        sessions = contents[0].propSet[0].val if contents and contents[0].propSet else []
        return [s.key for s in sessions]

    def terminate(self, session_key: str) -> None:
        """End another session, as a vCenter administrator (or a session timeout) would."""
        self.content.sessionManager.TerminateSession([session_key])


def write(path: Path, offset: int, data: bytes) -> None:
    """Write guest data straight into a disk's -flat.vmdk."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def request(*selectors: dict[str, str], request_id: str = "req-1", **fields: Any) -> MigrationRequest:
    """A MigrationRequest for the lab source with these VM selectors (plus any request fields)."""
    raw = {
        "request_id": request_id,
        "source": {"name": "lab"},
        "destination": {"cloud": "test-cloud"},
        "vms": list(selectors),
    } | fields
    return msgspec.convert(raw, MigrationRequest)


def blocks_of(writes: Iterable[tuple[int, int]], block_size: int) -> list[tuple[int, int]]:
    """The blocks a list of (offset, length) writes touches, merged: what CBT must report."""
    touched = sorted(
        {
            i
            for offset, length in writes
            for i in range(offset // block_size, (offset + length - 1) // block_size + 1)
        }
    )
    merged: list[tuple[int, int]] = []
    for index in touched:
        start = index * block_size
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + block_size)
        else:
            merged.append((start, block_size))
    return merged
