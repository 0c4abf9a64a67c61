"""What the OpenStack side needs to know about one source VM, and the metadata keys of its identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vmferry.schemas.events import DiskInfo, NicInfo, VmDiscovered, VmInventory

#: metadata keys vmferry writes on every volume, port description and server it creates
VM_KEY = "vmferry_vm"
DISK_KEY = "vmferry_disk"
MANAGED_KEY = "vmferry_managed"
CHANGE_ID_KEY = "vmferry_change_id"
PASS_KEY = "vmferry_pass"  # noqa: S105 - the copy pass number, not a password
#: what a vmferry volume is for; replicas carry no role, conversion clones ``converted``
ROLE_KEY = "vmferry_role"
#: the migration request whose pass the volume holds (pass numbers restart with every request)
REQUEST_KEY = "vmferry_request"


@dataclass(frozen=True)
class VmSpec:
    """The source VM as the destination sees it: identity, size, firmware, disks and NICs in order."""

    vm_key: str
    name: str
    cpus: int
    memory_mib: int
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    os_type: str = ""
    disks: tuple[DiskInfo, ...] = ()
    nics: tuple[NicInfo, ...] = field(default=())

    @classmethod
    def of(cls, vm: VmDiscovered) -> VmSpec:
        """The spec of a discovered VM."""
        return cls.of_inventory(vm.vm_key, vm.inventory())

    @classmethod
    def of_inventory(cls, vm_key: str, vm: VmInventory) -> VmSpec:
        """The spec of a VM from the inventory its events carry."""
        guest = vm.guest_id.lower()
        return cls(
            vm_key=vm_key,
            name=vm.identity.name,
            cpus=vm.cpus,
            memory_mib=vm.memory_mib,
            firmware=vm.firmware,
            secure_boot=vm.secure_boot,
            os_type="windows" if guest.startswith("win") else ("linux" if guest else ""),
            disks=tuple(vm.disks),
            nics=tuple(vm.nics),
        )

    @property
    def total_disk_gib(self) -> int:
        """Sum of the disks, rounded up to whole GiB per disk (Cinder's unit)."""
        return sum(gib_for(d.capacity_bytes) for d in self.disks)


def gib_for(capacity_bytes: int) -> int:
    """Cinder sizes are whole GiB: round up, at least 1."""
    return max(1, -(-capacity_bytes // 1024**3))


def port_description(vm_key: str, nic_key: int) -> str:
    """Ports carry their identity in the description (Neutron ports have no free-form metadata)."""
    return f"{VM_KEY}={vm_key} nic={nic_key} {MANAGED_KEY}=true"


def port_vm_prefix(vm_key: str) -> str:
    """What every description of this VM's ports starts with."""
    return f"{VM_KEY}={vm_key} nic="
