"""The validation catalogue: pure checks of one VM's inventory against the request, as findings.

A blocker stops the migration before any snapshot is taken; a warning travels with the VM. Every
finding says what is wrong and how to fix it. No I/O: everything comes from ``DiscoveredVm``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Literal

from vmferry.adapters.vsphere.inventory import DiscoveredVm
from vmferry.schemas.events import Finding
from vmferry.schemas.request import MigrationOptions, Mode

Severity = Literal["blocker", "warning"]

#: guest OS families virt-v2v cannot convert to KVM at all (guestId prefixes)
_UNSUPPORTED_GUESTS = (
    "darwin", "solaris", "netware", "os2", "dos", "win31", "win95", "win98", "winMe", "winNT",
    "win2000", "winXP", "winNet", "freebsd", "openServer", "unixWare", "eComStation", "vmkernel",
)  # fmt: skip
#: vSphere's "I don't know" guest ids
_UNKNOWN_GUESTS = ("other", "genericLinux")
#: names longer than this get cut by Neutron/Cinder name rules or hostname derivation
_NAME_LIMIT = 63
_PATH_UNSAFE = re.compile(r'[/\\:*?"<>|]')


def _finding(code: str, severity: Severity, message: str, fix: str) -> Finding:
    return Finding(code=code, severity=severity, message=message, fix=fix)


def check_cbt(found: DiscoveredVm, mode: Mode, options: MigrationOptions) -> list[Finding]:
    """Warm migrations copy changed blocks: CBT must be on for the VM and every disk, or be enabled."""
    if mode != "warm":
        return []
    severity: Severity = "warning" if options.enable_cbt else "blocker"
    fix = (
        "nothing to do: vmferry enables it before the first snapshot (a brief snapshot cycle)"
        if options.enable_cbt
        else "enable changed block tracking (ctkEnabled) or set options.enable_cbt: true"
    )
    findings: list[Finding] = []
    if not found.facts.cbt_enabled:
        findings.append(_finding("cbt-disabled", severity, "changed block tracking is off for this VM", fix))
        return findings
    untracked = [d.label or str(d.key) for d in found.vm.disks if not d.cbt_enabled and not d.rdm]
    if untracked:
        findings.append(
            _finding(
                "cbt-disabled-disk",
                severity,
                f"changed block tracking is off for {', '.join(untracked)}",
                fix,
            )
        )
    return findings


def check_snapshots(found: DiscoveredVm) -> list[Finding]:
    """Existing snapshots make a chain vmferry reads through; consolidation needs come first."""
    findings: list[Finding] = []
    if found.facts.consolidation_needed:
        findings.append(
            _finding(
                "consolidation-needed",
                "blocker",
                "the VM's disks need consolidation (a snapshot removal left delta files behind)",
                "run Snapshots > Consolidate on the VM in the vSphere client, then retry",
            )
        )
    own = [s.name for s in found.facts.snapshots if s.is_vmferry]
    others = [s.path for s in found.facts.snapshots if not s.is_vmferry]
    if others:
        findings.append(
            _finding(
                "existing-snapshots",
                "warning",
                f"the VM has {len(others)} snapshot(s): {', '.join(others[:5])}",
                "delete or consolidate them before cutover if you can: long snapshot chains slow every"
                " read and the migrated disk is the current state only",
            )
        )
    if own:
        findings.append(
            _finding(
                "stale-vmferry-snapshots",
                "warning",
                f"vmferry snapshots from earlier runs exist: {', '.join(own[:5])}",
                "remove them with the snapshot sweep (`vmferry` cleanup) once no migration uses them",
            )
        )
    return findings


def check_disks(found: DiscoveredVm) -> list[Finding]:
    """No disks, empty disks, independent, RDM and shared disks."""
    disks = found.vm.disks
    if not disks:
        return [
            _finding(
                "no-disks", "blocker", "the VM has no virtual disks", "attach its disks, or skip this VM"
            )
        ]
    findings: list[Finding] = []
    for disk in disks:
        name = disk.label or f"disk {disk.key}"
        if disk.capacity_bytes == 0:
            findings.append(
                _finding(
                    "zero-size-disk",
                    "blocker",
                    f"{name} reports a capacity of 0 bytes",
                    "check the disk in vSphere (a broken descriptor?) or detach it",
                )
            )
        if disk.disk_mode.startswith("independent"):
            findings.append(
                _finding(
                    "independent-disk",
                    "blocker",
                    f"{name} is {disk.disk_mode}: snapshots skip it, so it cannot be copied consistently",
                    "change the disk mode to Dependent (VM powered off), or detach the disk",
                )
            )
        if disk.rdm:
            mode = found.facts.rdm_modes.get(disk.key, "")
            findings.append(
                _finding(
                    "rdm-disk",
                    "blocker",
                    f"{name} is a raw device mapping ({mode or 'unknown mode'}) of a SAN LUN",
                    "migrate the LUN separately (e.g. Cinder manage) and detach it, or convert it to a"
                    " VMDK with Storage vMotion",
                )
            )
        if disk.sharing == "sharingMultiWriter" or disk.key in found.facts.shared_bus_disks:
            findings.append(
                _finding(
                    "shared-disk",
                    "blocker",
                    f"{name} is shared with other VMs (multi-writer or SCSI bus sharing)",
                    "migrate the cluster's shared storage separately and detach the disk from this VM",
                )
            )
    return findings


_DEVICE_FINDINGS: dict[str, tuple[Severity, str, str]] = {
    "pci-passthrough": (
        "blocker",
        "PCI passthrough device",
        "remove the device; OpenStack needs a PCI alias",
    ),
    "vgpu": ("blocker", "vGPU", "remove the vGPU profile; plan a GPU flavor on the destination"),
    "sriov-nic": (
        "warning",
        "SR-IOV NIC",
        "it becomes a regular virtio port; map an SR-IOV port by hand if needed",
    ),
    "usb-device": (
        "warning",
        "USB device",
        "USB passthrough does not migrate; detach it or reattach on the target",
    ),
    "vtpm": (
        "warning",
        "virtual TPM",
        "TPM contents (e.g. BitLocker keys) do not migrate; suspend BitLocker first",
    ),
}


def check_devices(found: DiscoveredVm) -> list[Finding]:
    """Devices bound to the source host do not migrate."""
    findings: list[Finding] = []
    for code, label in found.facts.special_devices:
        severity, what, fix = _DEVICE_FINDINGS[code]
        findings.append(_finding(code, severity, f"{label}: {what}", fix))
    return findings


def check_guest_os(found: DiscoveredVm) -> list[Finding]:
    """virt-v2v converts Linux and Windows; some families cannot run on KVM via virt-v2v at all."""
    guest = found.vm.guest_id
    shown = found.vm.guest_name or guest or "not set"
    if guest.startswith(_UNSUPPORTED_GUESTS):
        return [
            _finding(
                "unsupported-guest-os",
                "blocker",
                f"guest OS {shown} cannot be converted by virt-v2v",
                "migrate it another way (rebuild, or copy without conversion), or skip this VM",
            )
        ]
    if not guest or guest.startswith(_UNKNOWN_GUESTS):
        return [
            _finding(
                "unknown-guest-os",
                "warning",
                f"vSphere does not know the guest OS ({shown}); conversion will inspect the disks",
                "set the VM's Guest OS in vSphere to the installed one so problems show up before copying",
            )
        ]
    return []


def check_network_identity(found: DiscoveredVm, options: MigrationOptions) -> list[Finding]:
    """Keeping static IPs needs the addresses, which only running VMware Tools report."""
    findings: list[Finding] = []
    for key in found.facts.unnamed_networks:
        findings.append(
            _finding(
                "nic-network-unknown",
                "warning",
                f"the network of NIC {key} cannot be named",
                "check the NIC's port group in vSphere; map it explicitly in mappings.networks",
            )
        )
    if not options.preserve_ip:
        return findings
    if not found.facts.tools_running:
        findings.append(
            _finding(
                "static-ip-without-tools",
                "blocker",
                f"options.preserve_ip needs the guest's IP addresses, but VMware Tools are not running"
                f" ({found.vm.tools_status or 'status unknown'}, VM {found.vm.power_state})",
                "power the VM on and start VMware Tools (open-vm-tools), or set options.preserve_ip: false",
            )
        )
        return findings
    silent = [n.mac for n in found.vm.nics if not n.ip_addresses]
    if silent:
        findings.append(
            _finding(
                "nic-without-ip",
                "warning",
                f"VMware Tools report no IP address for NIC(s) {', '.join(silent)}",
                "those ports get an address by DHCP; configure the guest or map fixed IPs by hand",
            )
        )
    return findings


def check_name(found: DiscoveredVm) -> list[Finding]:
    """Names become instance, volume and port names and show up in file paths: report troublemakers."""
    name = found.vm.identity.name
    if not name.strip():
        return [_finding("empty-name", "blocker", "the VM has an empty name", "rename the VM in vSphere")]
    problems: list[str] = []
    if name != name.strip():
        problems.append("leading or trailing spaces")
    if any(unicodedata.category(c).startswith("C") for c in name):
        problems.append("control characters")
    if _PATH_UNSAFE.search(name):
        problems.append('characters that are unsafe in file paths (/ \\ : * ? " < > |)')
    if not name.isascii():
        problems.append("non-ASCII characters")
    if len(name) > _NAME_LIMIT:
        problems.append(f"more than {_NAME_LIMIT} characters (host names get cut)")
    if not problems:
        return []
    return [
        _finding(
            "vm-name",
            "warning",
            f"the VM name {name!r} has {', '.join(problems)}",
            "nothing blocks: vmferry keys everything by instance UUID; rename the VM if the destination"
            " instance or host name should be clean",
        )
    ]


def check_state(found: DiscoveredVm) -> list[Finding]:
    """Templates cannot be snapshotted or powered; suspended VMs lose their memory state."""
    if found.facts.template:
        return [
            _finding("template", "blocker", "this is a VM template", "convert it to a virtual machine first")
        ]
    if found.vm.power_state == "suspended":
        return [
            _finding(
                "suspended",
                "warning",
                "the VM is suspended; its memory state is not migrated",
                "resume and shut it down cleanly before cutover, or accept a crash-consistent copy",
            )
        ]
    return []


def check_firmware(found: DiscoveredVm) -> list[Finding]:
    """Secure boot needs a matching image property and OVMF build on the destination."""
    if found.vm.firmware == "efi" and found.vm.secure_boot:
        return [
            _finding(
                "secure-boot",
                "warning",
                "UEFI secure boot is on",
                "the destination must offer secure boot (os_secure_boot image property, OVMF with SB keys)",
            )
        ]
    return []


def validate(found: DiscoveredVm, mode: Mode, options: MigrationOptions) -> list[Finding]:
    """Every check, blockers first."""
    checks: Iterable[Callable[[], list[Finding]]] = (
        lambda: check_state(found),
        lambda: check_disks(found),
        lambda: check_snapshots(found),
        lambda: check_cbt(found, mode, options),
        lambda: check_devices(found),
        lambda: check_guest_os(found),
        lambda: check_network_identity(found, options),
        lambda: check_firmware(found),
        lambda: check_name(found),
    )
    findings = [f for check in checks for f in check()]
    return sorted(findings, key=lambda f: f.severity != "blocker")


def blockers(findings: Iterable[Finding]) -> list[Finding]:
    """Only the blockers."""
    return [f for f in findings if f.severity == "blocker"]
