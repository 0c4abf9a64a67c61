"""A simulated vSphere for `vmferry demo` and the tests: vcsim-ferry (tools/vcsim, built by
scripts/build-vcsim) started as a child process on loopback with a generated password and
certificate, and a builder that creates folders and VMs whose disks are real files on its datastore.

The builder uses plain pyvmomi on a session of its own, so vmferry's adapter is only ever exercised
through its own client.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import selectors
import ssl
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyVim.task
import pyVmomi
import pyVmomi.SoapAdapter

from vmferry.adapters.vsphere.settings import VsphereSettings
from vmferry.bus.errors import FerryError

# A builder for demos and tests: pyvmomi's untyped constructors are used through Any here, rather
# than through the adapter's typed helpers, to keep this module a plain script of vSphere calls.
vim: Any = pyVmomi.vim
vmodl: Any = pyVmomi.vmodl
WaitForTask: Any = pyVim.task.WaitForTask
SoapStubAdapter: Any = pyVmomi.SoapAdapter.SoapStubAdapter

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "scripts" / "build-vcsim"
MISSING_PREREQUISITES = 3  # exit status of scripts/build-vcsim --no-install
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Change tracking settings of the test servers: small pages so that callers must page.
BLOCK_SIZE = 64 * 1024
PAGE_SPAN = 1024 * 1024
PAGE_EXTENTS = 2


@dataclass(frozen=True)
class VcsimServer:
    """How to reach one running simulator; the password is only in ``password_file``."""

    url: str
    host: str
    port: int
    user: str
    password_file: Path
    ca_file: Path
    thumbprint_sha256: str
    thumbprint_sha1: str
    datastore: str
    datastore_dir: Path
    pid: int
    block_size: int = BLOCK_SIZE
    page_span: int = PAGE_SPAN
    page_extents: int = PAGE_EXTENTS

    def password(self) -> str:
        """The password, read from its 0600 file."""
        return self.password_file.read_text()

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server against its own certificate."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def thumbprint(der: bytes, algorithm: str) -> str:
    """A certificate thumbprint as vSphere writes it: upper-case hex pairs joined by colons."""
    digest = hashlib.new(algorithm, der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class SimulatorError(FerryError):
    """vcsim-ferry could not be built or started."""


def build_vcsim(install: bool = False) -> Path:
    """The vcsim-ferry binary: $VMFERRY_VCSIM, or built (cached) by scripts/build-vcsim."""
    override = os.environ.get("VMFERRY_VCSIM")
    if override:
        return Path(override)
    command = [str(BUILD_SCRIPT)] + ([] if install else ["--no-install"])
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode == MISSING_PREREQUISITES:
        raise SimulatorError(
            "Go and govmomi from Debian are needed to build vcsim-ferry",
            "run scripts/build-vcsim (installs golang-go and golang-github-vmware-govmomi-dev with apt)",
        )
    if result.returncode != 0:
        raise SimulatorError(f"scripts/build-vcsim failed ({result.returncode}):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def _read_ready_line(process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    """The JSON line vcsim-ferry prints once it listens; fails the test if none comes."""
    if process.stdout is None:
        raise SimulatorError("vcsim-ferry was started without a stdout pipe")
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        readable = selector.select(START_TIMEOUT)
    line = process.stdout.readline() if readable else b""
    if not line:
        process.kill()
        process.wait()
        raise SimulatorError(f"vcsim-ferry did not start within {START_TIMEOUT} s:\n{log.read_text()}")
    ready: dict[str, object] = json.loads(line)
    return ready


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def running_vcsim(binary: Path, workdir: Path) -> Iterator[VcsimServer]:
    """One simulator: no VMs, one datastore ("ferry") over workdir/datastore; stopped on exit."""
    datastore_dir = workdir / "datastore"
    password_file = workdir / "vcsim-password"
    ca_file = workdir / "vcsim-cert.pem"
    log = workdir / "vcsim.log"
    _write_secret(password_file, secrets.token_urlsafe(24))
    command = [
        str(binary),
        "-l", "127.0.0.1:0",
        "-vm", "0", "-ds", "0",
        "-datastore", f"ferry={datastore_dir}",
        "-username", "vmferry",
        "-password-file", str(password_file),
        "-cert-out", str(ca_file),
        "-cbt-block-size", str(BLOCK_SIZE),
        "-cbt-page-span", str(PAGE_SPAN),
        "-cbt-page-extents", str(PAGE_EXTENTS),
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, cwd=workdir
        )
    try:
        ready = _read_ready_line(process, log)
        url = str(ready["url"])
        der = ssl.PEM_cert_to_DER_cert(ca_file.read_text())
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise SimulatorError(f"vcsim-ferry announced an unusable URL {url!r}")
        yield VcsimServer(
            url=url,
            host=parts.hostname,
            port=parts.port,
            user="vmferry",
            password_file=password_file,
            ca_file=ca_file,
            thumbprint_sha256=thumbprint(der, "sha256"),
            thumbprint_sha1=thumbprint(der, "sha1"),
            datastore="ferry",
            datastore_dir=datastore_dir,
            pid=process.pid,
        )
        if process.poll() is not None:
            raise SimulatorError(
                f"vcsim-ferry exited while in use ({process.returncode}):\n{log.read_text()}"
            )
    finally:
        _stop(process)


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
        """Log the builder's session out."""
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

    def create_vm(self, spec: VmSpec) -> Any:
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
            # vcsim derives UUIDs from a per-process sequence: two simulators would hand out the
            # same instanceUuid, and their VMs would share one identity in a shared OpenStack lab.
            uuid=str(uuid.uuid4()),
            instanceUuid=str(uuid.uuid4()),
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

    def vm(self, moref: str) -> Any:
        """The VM with this moref, bound to the builder's session."""
        return vim.VirtualMachine(moref, self.stub)

    def snapshot_names(self, vms: Iterable[Any] | None = None) -> dict[str, list[str]]:
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
    """Write guest data straight into a disk's -flat.vmdk (what a running guest would do)."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
