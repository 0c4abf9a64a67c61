"""Inventory of a vSphere endpoint: an index of every VM and container in one traversal, resolution
of a request's VM selectors against it, and the full read of the selected VMs into ``VmDiscovered``.

Names: vSphere stores ``%``, ``/`` and ``\\`` in entity names escaped as ``%25``, ``%2f`` and
``%5c``. Inventory paths (``/DC0/vm/prod/web``) use the escaped names, so ``/`` only ever separates
path parts; VM names are shown and matched unescaped (a name selector also matches the escaped form).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

from pyVmomi import vim

from vmferry.adapters.vsphere.client import Record, VsphereClient
from vmferry.adapters.vsphere.vmomi import moref_of
from vmferry.bus.errors import PermanentError
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.events import DiskInfo, NicInfo, VmDiscovered, VmIdentity
from vmferry.schemas.request import MigrationPlan, MigrationRequest, VmSelector

#: what the index reads for every object, in one ContainerView traversal
INDEX_PROPERTIES: dict[type, list[str]] = {
    vim.Folder: ["name", "parent"],
    vim.Datacenter: ["name", "parent"],
    vim.VirtualApp: ["name", "parent", "parentFolder"],
    vim.ComputeResource: ["name", "parent"],
    vim.HostSystem: ["name", "parent"],
    vim.Datastore: ["name"],
    vim.Network: ["name"],
    vim.dvs.DistributedVirtualPortgroup: ["key"],
    vim.VirtualMachine: ["name", "parent", "parentVApp", "config.instanceUuid", "config.template"],
}
#: what the full read takes of each selected VM, in one call for all of them
VM_PROPERTIES: list[str] = [
    "name",
    "config.instanceUuid",
    "config.uuid",
    "config.template",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.firmware",
    "config.bootOptions.efiSecureBootEnabled",
    "config.guestId",
    "config.guestFullName",
    "config.changeTrackingEnabled",
    "config.extraConfig",
    "guest.toolsRunningStatus",
    "guest.toolsVersionStatus2",
    "guest.guestFullName",
    "guest.net",
    "runtime.powerState",
    "runtime.host",
    "runtime.consolidationNeeded",
    "snapshot",
]

_ESCAPED = re.compile(r"%(2[fF]|5[cC]|25)")
_UNESCAPE = {"2f": "/", "5c": "\\", "25": "%"}
VMFERRY_SNAPSHOT_PREFIX = "vmferry-"


def unescape_name(name: str) -> str:
    """An entity name as a human wrote it (vSphere escapes %, / and \\ in names)."""
    return _ESCAPED.sub(lambda m: _UNESCAPE[m.group(1).lower()], name)


# ---------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True)
class Entity:
    """A container, host, datastore or network of the index."""

    moref: str
    kind: str
    name: str
    parent: str | None = None


@dataclass(frozen=True)
class VmEntry:
    """A VM as the index knows it: enough to select it and to name it in messages."""

    moref: str
    name: str
    raw_name: str
    folder: str
    datacenter: str
    instance_uuid: str
    template: bool

    @property
    def path(self) -> str:
        """The VM's inventory path (escaped names)."""
        return f"{self.folder}/{self.raw_name}"

    def describe(self) -> str:
        """``'web 01' (vm-42 at /DC0/vm/prod)`` for messages."""
        return f"{self.name!r} ({self.moref} at {self.folder})"


@dataclass
class Index:
    """Every VM, folder, datacenter, host, cluster, datastore and network of one endpoint."""

    entities: dict[str, Entity] = field(default_factory=dict)
    vms: list[VmEntry] = field(default_factory=list)
    portgroups: dict[str, str] = field(default_factory=dict)

    def name_of(self, moref: str | None) -> str:
        """The (escaped) name of an indexed object, or "" if unknown."""
        entity = self.entities.get(moref or "")
        return entity.name if entity else ""

    def path_of(self, moref: str | None) -> str:
        """Inventory path of an entity: ``/DC0/vm/folder`` (the root folder is ``""``)."""
        parts: list[str] = []
        seen: set[str] = set()
        current = self.entities.get(moref or "")
        while current is not None and current.moref not in seen:
            seen.add(current.moref)
            parts.append(current.name)
            current = self.entities.get(current.parent or "")
        return "/" + "/".join(reversed(parts)) if parts else ""

    def datacenter_of(self, moref: str | None) -> str:
        """Name of the datacenter an entity lives in, or "" (e.g. outside any datacenter)."""
        seen: set[str] = set()
        current = self.entities.get(moref or "")
        while current is not None and current.moref not in seen:
            if current.kind == "Datacenter":
                return current.name
            seen.add(current.moref)
            current = self.entities.get(current.parent or "")
        return ""

    def folders(self) -> list[str]:
        """Paths of every VM folder (folders that hold VMs, directly or below)."""
        return sorted({p for vm in self.vms for p in _ancestors(vm.folder)})


def _ancestors(path: str) -> Iterable[str]:
    parts = path.split("/")
    for end in range(2, len(parts) + 1):
        yield "/".join(parts[:end])


def _moref(value: Any) -> str | None:
    return moref_of(value) if value is not None else None


def build_index(records: Iterable[Record]) -> Index:
    """Assemble the index from the records of one traversal (pure; see ``load_index``)."""
    index = Index()
    vm_records: list[Record] = []
    for record in records:
        if record.kind == "VirtualMachine":
            vm_records.append(record)
            continue
        parent = record.get("parentFolder") or record.get("parent")
        index.entities[record.moref] = Entity(
            record.moref, record.kind, str(record.get("name", "")), _moref(parent)
        )
        if record.kind == "DistributedVirtualPortgroup" and record.get("key"):
            index.portgroups[str(record.get("key"))] = str(record.get("name", ""))
    for record in vm_records:
        container = _moref(record.get("parent") or record.get("parentVApp"))
        raw_name = str(record.get("name", ""))
        index.vms.append(
            VmEntry(
                moref=record.moref,
                name=unescape_name(raw_name),
                raw_name=raw_name,
                folder=index.path_of(container),
                datacenter=index.datacenter_of(container),
                instance_uuid=str(record.get("config.instanceUuid", "")),
                template=bool(record.get("config.template", False)),
            )
        )
    return index


def load_index(client: VsphereClient) -> Index:
    """Read the index in one PropertyCollector traversal."""
    return build_index(client.read_all(INDEX_PROPERTIES, doing="reading the inventory index"))


# ---------------------------------------------------------------------------------------------
# Selector resolution


def _uuid_key(value: str) -> str:
    try:
        return uuid.UUID(value).hex
    except ValueError:
        return value.lower()


def _close_names(wanted: str, vms: Sequence[VmEntry]) -> str:
    by_name: dict[str, list[VmEntry]] = {}
    for vm in vms:
        by_name.setdefault(vm.name, []).append(vm)
    lowered = wanted.casefold()
    close = [n for n in by_name if n.casefold() == lowered or (len(lowered) >= 3 and lowered in n.casefold())]
    close += [n for n in difflib.get_close_matches(wanted, list(by_name), n=5, cutoff=0.6) if n not in close]
    if not close:
        return "no VM has a similar name"
    return "close names: " + "; ".join(v.describe() for n in close[:5] for v in by_name[n][:2])


def _in_datacenter(vms: Sequence[VmEntry], datacenter: str | None) -> list[VmEntry]:
    return [v for v in vms if not datacenter or v.datacenter == datacenter]


def _folder_candidates(index: Index, wanted: str, datacenter: str | None) -> list[str]:
    path = "/" + wanted.strip().strip("/")
    datacenters = [datacenter] if datacenter else sorted({v.datacenter for v in index.vms if v.datacenter})
    candidates = [path] + [f"/{dc}/vm{path}" for dc in datacenters]
    known = set(index.folders())
    return [c for c in candidates if c in known]


def _by_name(index: Index, selector: VmSelector, datacenter: str | None) -> list[VmEntry]:
    wanted = selector.name or ""
    scope = _in_datacenter(index.vms, datacenter)
    found = [v for v in scope if wanted in (v.name, v.raw_name)]
    if not found:
        raise PermanentError(
            f"no VM is named {wanted!r}{_where(datacenter)} ({_close_names(wanted, scope)})",
            "check the spelling (names are case-sensitive), or select the VM by moref or instance_uuid",
        )
    if len(found) > 1:
        listing = "; ".join(v.describe() for v in found)
        raise PermanentError(
            f"{len(found)} VMs are named {wanted!r}{_where(datacenter)}: {listing}",
            "select one by moref or instance_uuid (or by folder), or rename the duplicates",
        )
    return found


def _by_folder(index: Index, selector: VmSelector, datacenter: str | None) -> list[VmEntry]:
    wanted = selector.folder or ""
    paths = _folder_candidates(index, wanted, datacenter)
    if not paths:
        close = difflib.get_close_matches("/" + wanted.strip("/"), index.folders(), n=5, cutoff=0.5)
        hint = f"close folders: {', '.join(close)}" if close else "no VM folder has a similar path"
        raise PermanentError(
            f"no VM folder {wanted!r}{_where(datacenter)} ({hint})",
            "give the inventory path, e.g. /DC0/vm/prod/web or prod/web; write '/' inside a name as %2f",
        )
    found = [v for v in index.vms if not v.template and any(_under(v.folder, p) for p in paths)]
    if not found:
        raise PermanentError(f"VM folder {paths[0]} holds no VMs", "select another folder, or add VMs to it")
    return found


def _under(folder: str, path: str) -> bool:
    return folder == path or folder.startswith(path + "/")


def _where(datacenter: str | None) -> str:
    return f" in datacenter {datacenter!r}" if datacenter else ""


def resolve_one(index: Index, selector: VmSelector, datacenter: str | None = None) -> list[VmEntry]:
    """The VMs one selector picks; raises PermanentError naming candidates when it picks none or several."""
    if selector.moref:
        found = [v for v in index.vms if v.moref == selector.moref]
        if not found:
            raise PermanentError(
                f"no VM has the managed object reference {selector.moref!r}",
                "morefs change when a VM is re-registered; select it by instance_uuid or name",
            )
        return found
    if selector.instance_uuid:
        key = _uuid_key(selector.instance_uuid)
        found = [v for v in index.vms if _uuid_key(v.instance_uuid) == key]
        if not found:
            raise PermanentError(
                f"no VM has the instance UUID {selector.instance_uuid}",
                "use the VM's config.instanceUuid (not its BIOS uuid); the VM may have been removed",
            )
        return found
    if selector.folder:
        return _by_folder(index, selector, datacenter)
    return _by_name(index, selector, datacenter)


def resolve(index: Index, selectors: Sequence[VmSelector], datacenter: str | None = None) -> list[VmEntry]:
    """The VMs a request selects, each once, in selector order; all unresolvable selectors in one error."""
    chosen: dict[str, VmEntry] = {}
    problems: list[PermanentError] = []
    for selector in selectors:
        try:
            for vm in resolve_one(index, selector, datacenter):
                chosen.setdefault(vm.moref, vm)
        except PermanentError as error:
            problems.append(error)
    if problems:
        raise PermanentError(
            "; ".join(f"selector {i + 1}: {p.cause}" for i, p in enumerate(problems))
            if len(problems) > 1
            else problems[0].cause,
            " / ".join(dict.fromkeys(p.fix for p in problems)),
        )
    return list(chosen.values())


# ---------------------------------------------------------------------------------------------
# Full read


@dataclass(frozen=True)
class SnapshotNode:
    """One existing snapshot of a VM."""

    name: str
    moref: str
    description: str
    path: str
    created: datetime | None = None

    @property
    def is_vmferry(self) -> bool:
        """Created by vmferry (by name)."""
        return self.name.startswith(VMFERRY_SNAPSHOT_PREFIX)


@dataclass(frozen=True)
class VmFacts:
    """What validation needs beyond ``VmDiscovered`` (see the report for the proposed schema fields)."""

    moref: str
    folder: str
    datacenter: str
    template: bool = False
    cbt_enabled: bool = False
    consolidation_needed: bool = False
    tools_running: bool = False
    snapshots: tuple[SnapshotNode, ...] = ()
    #: (finding code, device label) of devices that do not migrate: passthrough, vGPU, SR-IOV, USB, TPM
    special_devices: tuple[tuple[str, str], ...] = ()
    #: disk keys on a controller with bus sharing (physical or virtual)
    shared_bus_disks: tuple[int, ...] = ()
    #: disk key -> RDM compatibility mode ("physicalMode" / "virtualMode")
    rdm_modes: dict[int, str] = field(default_factory=dict)
    #: NIC keys whose network could not be named
    unnamed_networks: tuple[int, ...] = ()
    #: morefs of the datastores holding the VM's disks
    datastores: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiscoveredVm:
    """The inventory of one VM: the event payload (without findings yet) and the extra facts."""

    vm: VmDiscovered
    facts: VmFacts


_CONTROLLERS: tuple[tuple[type, str, str], ...] = (
    (vim.vm.device.ParaVirtualSCSIController, "pvscsi", "scsi"),
    (vim.vm.device.VirtualLsiLogicSASController, "lsilogic-sas", "scsi"),
    (vim.vm.device.VirtualLsiLogicController, "lsilogic", "scsi"),
    (vim.vm.device.VirtualBusLogicController, "buslogic", "scsi"),
    (vim.vm.device.VirtualSCSIController, "scsi", "scsi"),
    (vim.vm.device.VirtualNVMEController, "nvme", "nvme"),
    (vim.vm.device.VirtualAHCIController, "sata", "sata"),
    (vim.vm.device.VirtualSATAController, "sata", "sata"),
    (vim.vm.device.VirtualIDEController, "ide", "ide"),
)
_NIC_TYPES: tuple[tuple[type, str], ...] = (
    (vim.vm.device.VirtualSriovEthernetCard, "sriov"),
    (vim.vm.device.VirtualVmxnet3Vrdma, "vmxnet3-vrdma"),
    (vim.vm.device.VirtualVmxnet3, "vmxnet3"),
    (vim.vm.device.VirtualVmxnet2, "vmxnet2"),
    (vim.vm.device.VirtualVmxnet, "vmxnet"),
    (vim.vm.device.VirtualE1000e, "e1000e"),
    (vim.vm.device.VirtualE1000, "e1000"),
    (vim.vm.device.VirtualPCNet32, "pcnet32"),
)
_INDEPENDENT = ("independent_persistent", "independent_nonpersistent")


@dataclass(frozen=True)
class _Controller:
    kind: str
    prefix: str
    bus: int
    shared: bool


def _controllers(devices: Sequence[Any]) -> dict[int, _Controller]:
    found: dict[int, _Controller] = {}
    for device in devices:
        kind_name = next(
            ((name, prefix) for kind, name, prefix in _CONTROLLERS if isinstance(device, kind)), None
        )
        if kind_name is not None:
            shared = str(getattr(device, "sharedBus", "noSharing") or "noSharing") != "noSharing"
            bus = int(getattr(device, "busNumber", 0) or 0)
            found[device.key] = _Controller(kind_name[0], kind_name[1], bus, shared)
    return found


def _disk_datastore(device: Any) -> str | None:
    if not isinstance(device, vim.vm.device.VirtualDisk):
        return None
    return _moref(getattr(device.backing, "datastore", None))


def _label(device: Any) -> str:
    info = getattr(device, "deviceInfo", None)
    return str(getattr(info, "label", "") or f"device {device.key}")


def _datastore_name(index: Index, backing: Any) -> str:
    name = index.name_of(_moref(getattr(backing, "datastore", None)))
    if name:
        return name
    file_name = str(getattr(backing, "fileName", "") or "")
    return file_name[1 : file_name.index("]")] if file_name.startswith("[") and "]" in file_name else ""


@dataclass
class _DiskFacts:
    disks: list[DiskInfo] = field(default_factory=list)
    shared_bus: list[int] = field(default_factory=list)
    rdm_modes: dict[int, str] = field(default_factory=dict)


def _disks(index: Index, devices: Sequence[Any], cbt: bool, extra: dict[str, str]) -> _DiskFacts:
    controllers = _controllers(devices)
    facts = _DiskFacts()
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        backing = device.backing
        controller = controllers.get(device.controllerKey or 0, _Controller("", "", 0, False))
        unit = int(device.unitNumber or 0)
        mode = str(getattr(backing, "diskMode", "") or "persistent")
        rdm_mode = ""
        if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
            rdm_mode = str(backing.compatibilityMode or "")
            facts.rdm_modes[device.key] = rdm_mode
        per_disk = extra.get(f"{controller.prefix}{controller.bus}:{unit}.ctkEnabled", "").lower()
        tracked = cbt and per_disk != "false" and mode not in _INDEPENDENT and rdm_mode != "physicalMode"
        thin = getattr(backing, "thinProvisioned", None)
        capacity = _capacity(device)
        facts.disks.append(
            DiskInfo(
                key=device.key,
                label=_label(device),
                controller=controller.kind,
                bus_number=controller.bus,
                unit_number=unit,
                capacity_bytes=capacity,
                backing_file=str(getattr(backing, "fileName", "") or ""),
                datastore=unescape_name(_datastore_name(index, backing)),
                thin=True if thin is None else bool(thin),
                disk_mode=mode,
                rdm=bool(rdm_mode),
                sharing=str(getattr(backing, "sharing", "") or "sharingNone"),
                cbt_enabled=tracked,
            )
        )
        if controller.shared:
            facts.shared_bus.append(device.key)
    facts.disks.sort(key=lambda d: (d.controller, d.bus_number, d.unit_number, d.key))
    return facts


def _capacity(disk: Any) -> int:
    """Bytes: ``capacityInBytes``, else ``capacityInKB`` (vcsim sets only what the creator set)."""
    in_bytes = int(disk.capacityInBytes or 0)
    return in_bytes if in_bytes else int(disk.capacityInKB or 0) * 1024


def _guest_ips(guest_nics: Sequence[Any]) -> dict[str, list[str]]:
    """IP addresses the guest tools report, by device key (``"key:N"``) and by MAC (``"mac:..."``)."""
    found: dict[str, list[str]] = {}
    for nic in guest_nics:
        config = getattr(nic, "ipConfig", None)
        addresses = [a.ipAddress for a in getattr(config, "ipAddress", None) or []] or list(
            nic.ipAddress or []
        )
        usable = [a for a in addresses if _usable_ip(a)]
        key = getattr(nic, "deviceConfigId", -1)
        if key is not None and key >= 0:
            found[f"key:{key}"] = usable
        if nic.macAddress:
            found[f"mac:{str(nic.macAddress).lower()}"] = usable
    return found


def _usable_ip(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (parsed.is_link_local or parsed.is_loopback)


def _network(index: Index, backing: Any) -> tuple[str, bool]:
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        key = str(backing.port.portgroupKey or "") if backing.port else ""
        return unescape_name(index.portgroups.get(key, "")), True
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
        return str(backing.opaqueNetworkId or ""), False
    name = index.name_of(_moref(getattr(backing, "network", None))) or str(
        getattr(backing, "deviceName", "") or ""
    )
    return unescape_name(name), False


def _nics(index: Index, devices: Sequence[Any], guest_nics: Sequence[Any]) -> tuple[list[NicInfo], list[int]]:
    ips = _guest_ips(guest_nics)
    nics: list[NicInfo] = []
    unnamed: list[int] = []
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualEthernetCard):
            continue
        mac = str(device.macAddress or "").lower()
        network, distributed = _network(index, device.backing)
        if not network:
            unnamed.append(device.key)
        adapter = next((name for kind, name in _NIC_TYPES if isinstance(device, kind)), type(device).__name__)
        nics.append(
            NicInfo(
                key=device.key,
                mac=mac,
                adapter_type=adapter,
                network=network,
                distributed=distributed,
                ip_addresses=ips.get(f"key:{device.key}") or ips.get(f"mac:{mac}") or [],
            )
        )
    nics.sort(key=lambda n: n.key)
    return nics, unnamed


def _special_devices(devices: Sequence[Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for device in devices:
        if isinstance(device, vim.vm.device.VirtualPCIPassthrough):
            vgpu = isinstance(device.backing, vim.vm.device.VirtualPCIPassthrough.VmiopBackingInfo)
            found.append(("vgpu" if vgpu else "pci-passthrough", _label(device)))
        elif isinstance(device, vim.vm.device.VirtualSriovEthernetCard):
            found.append(("sriov-nic", _label(device)))
        elif isinstance(device, vim.vm.device.VirtualUSB):
            found.append(("usb-device", _label(device)))
        elif isinstance(device, vim.vm.device.VirtualTPM):
            found.append(("vtpm", _label(device)))
    return found


def snapshot_nodes(tree: Any) -> list[SnapshotNode]:
    """Every snapshot of a VM's ``snapshot`` property (a tree), oldest first."""
    nodes: list[SnapshotNode] = []
    stack = [(node, "") for node in getattr(tree, "rootSnapshotList", None) or []]
    while stack:
        node, parent = stack.pop()
        path = f"{parent}/{node.name}" if parent else str(node.name)
        description = str(node.description or "")
        nodes.append(
            SnapshotNode(str(node.name), moref_of(node.snapshot), description, path, node.createTime)
        )
        stack.extend((child, path) for child in node.childSnapshotList or [])
    return sorted(nodes, key=lambda n: (n.created or datetime.min.replace(tzinfo=UTC), n.moref))


PowerState = Literal["poweredOn", "poweredOff", "suspended"]
_POWER_STATES: tuple[PowerState, ...] = ("poweredOn", "poweredOff", "suspended")


def _power_state(value: Any) -> PowerState:
    text = str(value or "poweredOff")
    return next((s for s in _POWER_STATES if s == text), "poweredOff")


def _host_and_cluster(index: Index, host_moref: str | None) -> tuple[str, str]:
    host = index.entities.get(host_moref or "")
    if host is None:
        return "", ""
    parent = index.entities.get(host.parent or "")
    cluster = parent.name if parent is not None and parent.kind == "ClusterComputeResource" else ""
    return unescape_name(host.name), unescape_name(cluster)


def build_vm(index: Index, entry: VmEntry, record: Record, request: MigrationRequest) -> DiscoveredVm:
    """Turn one VM's properties into ``VmDiscovered`` + ``VmFacts`` (pure; no findings yet)."""
    instance_uuid = str(record.get("config.instanceUuid", "") or entry.instance_uuid)
    if not instance_uuid or record.get("config.hardware.numCPU") is None:
        raise PermanentError(
            f"VM {entry.describe()} has no readable configuration (inaccessible or orphaned:"
            f" {', '.join(record.missing) or 'config unset'})",
            "make the VM accessible in vSphere (reconnect its host, re-register it) and retry",
        )
    devices: list[Any] = list(record.get("config.hardware.device", []))
    cbt = bool(record.get("config.changeTrackingEnabled", False))
    extra = {str(o.key): str(o.value) for o in record.get("config.extraConfig", []) if o.key}
    disk_facts = _disks(index, devices, cbt, extra)
    nics, unnamed = _nics(index, devices, list(record.get("guest.net", [])))
    snapshots = snapshot_nodes(record.get("snapshot"))
    host, cluster = _host_and_cluster(index, _moref(record.get("runtime.host")))
    firmware: Literal["bios", "efi"] = "efi" if str(record.get("config.firmware", "")) == "efi" else "bios"
    tools = str(record.get("guest.toolsRunningStatus", "") or "")
    if str(record.get("guest.toolsVersionStatus2", "")) == "guestToolsNotInstalled":
        tools = "guestToolsNotInstalled"
    vm = VmDiscovered(
        request_id=request.request_id,
        plan=MigrationPlan.of(request),
        vm_key=vm_key_for(instance_uuid),
        identity=VmIdentity(
            instance_uuid=instance_uuid,
            bios_uuid=cast("str | None", record.get("config.uuid")),
            moref=entry.moref,
            name=unescape_name(str(record.get("name", entry.raw_name))),
        ),
        cpus=max(int(record.get("config.hardware.numCPU", 1)), 1),
        memory_mib=max(int(record.get("config.hardware.memoryMB", 1)), 1),
        firmware=firmware,
        secure_boot=bool(record.get("config.bootOptions.efiSecureBootEnabled", False)),
        guest_id=str(record.get("config.guestId", "") or ""),
        guest_name=str(record.get("guest.guestFullName", "") or record.get("config.guestFullName", "") or ""),
        tools_status=tools,
        power_state=_power_state(record.get("runtime.powerState")),
        host=host,
        cluster=cluster,
        disks=disk_facts.disks,
        nics=nics,
        snapshots=[s.name for s in snapshots],
    )
    facts = VmFacts(
        moref=entry.moref,
        folder=entry.folder,
        datacenter=entry.datacenter,
        template=bool(record.get("config.template", entry.template)),
        cbt_enabled=cbt,
        consolidation_needed=bool(record.get("runtime.consolidationNeeded", False)),
        tools_running=tools == "guestToolsRunning",
        snapshots=tuple(snapshots),
        special_devices=tuple(_special_devices(devices)),
        shared_bus_disks=tuple(disk_facts.shared_bus),
        rdm_modes=disk_facts.rdm_modes,
        unnamed_networks=tuple(unnamed),
        datastores=tuple(sorted({m for d in devices if (m := _disk_datastore(d))})),
    )
    return DiscoveredVm(vm, facts)


def read_vms(client: VsphereClient, entries: Sequence[VmEntry]) -> dict[str, Record]:
    """The full properties of the given VMs, in one PropertyCollector call."""
    refs = [client.bind(vim.VirtualMachine, e.moref) for e in entries]
    return client.read_many(refs, vim.VirtualMachine, VM_PROPERTIES, doing="reading the selected VMs")


def discover(client: VsphereClient, request: MigrationRequest) -> list[DiscoveredVm]:
    """Resolve the request's selectors and read every selected VM (two PropertyCollector calls)."""
    index = load_index(client)
    entries = resolve(index, request.vms, request.source.datacenter)
    records = read_vms(client, entries)
    found: list[DiscoveredVm] = []
    problems: list[str] = []
    fixes: list[str] = []
    for entry in entries:
        record = records.get(entry.moref)
        if record is None:
            problems.append(f"VM {entry.describe()} disappeared while it was being read")
            fixes.append("retry the request; if the VM was removed on purpose, drop it from the request")
            continue
        try:
            found.append(build_vm(index, entry, record, request))
        except PermanentError as error:
            problems.append(error.cause)
            fixes.append(error.fix)
    if problems:
        raise PermanentError("; ".join(problems), " / ".join(dict.fromkeys(fixes)))
    return found


def find_vm(client: VsphereClient, instance_uuid: str) -> str:
    """The moref of the VM with this instanceUuid (morefs change on re-registration, the UUID not)."""
    search = client.content.searchIndex
    if search is None:
        raise PermanentError(f"vSphere {client.where} has no search index", "is this vCenter or ESXi?")
    found = client.call(
        f"looking up VM {instance_uuid}",
        lambda: search.FindByUuid(None, instance_uuid, True, True),
    )
    if found is None:
        raise PermanentError(
            f"no VM with instance UUID {instance_uuid} on {client.where} (removed since discovery?)",
            "re-run discovery for this VM, or drop it from the migration",
        )
    return moref_of(found)
