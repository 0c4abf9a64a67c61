"""Does the vSphere user hold the privileges a migration needs? Compare and report what is missing.

The list is the reference kit's documented role (its "VMware ACLs requirements" table, translated to
vSphere privilege ids) plus what vmferry itself does beyond it (CBT, power control). The check asks
the server for the session's effective privileges on each VM and datastore
(``AuthorizationManager.HasPrivilegeOnEntities``, falling back to ``FetchUserPrivilegeOnEntities``);
when the server can answer neither, the report says so instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import vim, vmodl

from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.faults import fault_text
from vmferry.adapters.vsphere.vmomi import moref_of, present
from vmferry.bus.errors import FerryError
from vmferry.schemas.events import Finding

log = logging.getLogger(__name__)

#: The reference kit's table (category / group / privilege as the vSphere client names it) -> id.
SEED_VM_PRIVILEGES: dict[str, str] = {
    "VirtualMachine.GuestOperations.Execute": "Guest operations > Guest operation program execution",
    "VirtualMachine.GuestOperations.Modify": "Guest operations > Guest operation modifications",
    "VirtualMachine.GuestOperations.Query": "Guest operations > Guest operation queries",
    "VirtualMachine.GuestOperations.ModifyAliases": "Guest operations > Guest operation alias modification",
    "VirtualMachine.GuestOperations.QueryAliases": "Guest operations > Guest operation alias query",
    "VirtualMachine.Provisioning.DiskRandomAccess": "Provisioning > Allow disk access",
    "VirtualMachine.Provisioning.FileRandomAccess": "Provisioning > Allow file access",
    "VirtualMachine.Provisioning.DiskRandomRead": "Provisioning > Allow read-only disk access",
    "VirtualMachine.Provisioning.GetVmFiles": "Provisioning > Allow virtual machine download",
    "VirtualMachine.Namespace.Event": "Service configuration > Allow notifications",
    "VirtualMachine.Namespace.EventNotify": (
        "Service configuration > Allow polling of global event notifications"
    ),
    "VirtualMachine.Namespace.ReadContent": "Service configuration > Read service configuration",
    "VirtualMachine.State.CreateSnapshot": "Snapshot management > Create snapshot",
    "VirtualMachine.State.RemoveSnapshot": "Snapshot management > Remove snapshot",
    "VirtualMachine.State.RenameSnapshot": "Snapshot management > Rename snapshot",
    "VirtualMachine.State.RevertToSnapshot": "Snapshot management > Revert to snapshot",
}
SEED_DATASTORE_PRIVILEGES: dict[str, str] = {"Datastore.Browse": "Datastore > Browse datastore"}
#: What vmferry does beyond the reference kit's table.
VMFERRY_VM_PRIVILEGES: dict[str, str] = {
    "VirtualMachine.Config.ChangeTracking": "Change configuration > Toggle disk change tracking (enable CBT)",
    "VirtualMachine.Interact.PowerOff": "Interaction > Power off (guest shutdown and hard stop at cutover)",
    "VirtualMachine.Interact.PowerOn": "Interaction > Power on (restart the source after a failed cutover)",
}


def required_privileges() -> dict[str, dict[str, str]]:
    """Privileges by entity kind ("VirtualMachine", "Datastore"), id -> what the vSphere client calls it."""
    return {
        "VirtualMachine": SEED_VM_PRIVILEGES | VMFERRY_VM_PRIVILEGES,
        "Datastore": dict(SEED_DATASTORE_PRIVILEGES),
    }


@dataclass(frozen=True)
class PrivilegeReport:
    """Which required privileges the user lacks, per entity moref (``vm-42`` -> ids)."""

    answered: bool
    missing: dict[str, list[str]] = field(default_factory=dict)
    #: required ids this server does not define (older vSphere); not counted as missing
    unknown: list[str] = field(default_factory=list)
    method: str = ""
    note: str = ""

    @property
    def complete(self) -> bool:
        """True when the server answered and nothing is missing."""
        return self.answered and not self.missing

    def findings(self, entities: Iterable[str] | None = None) -> list[Finding]:
        """Missing privileges on ``entities`` (default: all) as warnings; a step that needs one fails
        with NoPermission anyway, and a wrong answer must not block a migration."""
        if not self.answered:
            return [
                Finding(
                    code="privileges-unchecked",
                    severity="warning",
                    message=f"the server could not tell the user's privileges ({self.note})",
                    fix="compare the vmferry role with the documented privilege list by hand",
                )
            ]
        labels = required_privileges()["VirtualMachine"] | required_privileges()["Datastore"]
        return [
            Finding(
                code="missing-privileges",
                severity="warning",
                message=f"the vSphere user lacks on {entity}: "
                + "; ".join(f"{p} ({labels.get(p, '?')})" for p in privileges),
                fix="add these privileges to the vmferry role and assign it on the VM's folder or datacenter"
                " (propagating)",
            )
            for entity, privileges in sorted(self.missing.items())
            if entities is None or entity in set(entities)
        ]


def _known_privileges(client: VsphereClient) -> set[str] | None:
    manager = present(client.content.authorizationManager, "an authorization manager")
    try:
        record = client.read(manager, ["privilegeList"], "reading the privilege list")
    except FerryError as error:
        log.info("privilege list unreadable: %s", error)
        return None
    return {str(p.privId) for p in record.get("privilegeList", [])} or None


def _has_privilege(client: VsphereClient, entities: Sequence[Any], ids: list[str]) -> dict[str, set[str]]:
    manager = present(client.content.authorizationManager, "an authorization manager")
    session = client.current_session()
    if session is None:
        client.touch()
        session = client.current_session()
    key = present(session, "the current session").key
    granted: dict[str, set[str]] = {}
    for result in manager.HasPrivilegeOnEntities(list(entities), key, ids):
        granted[moref_of(result.entity)] = {a.privId for a in result.privAvailability or [] if a.isGranted}
    return granted


def _fetch_user_privileges(client: VsphereClient, entities: Sequence[Any]) -> dict[str, set[str]]:
    manager = present(client.content.authorizationManager, "an authorization manager")
    granted: dict[str, set[str]] = {}
    for result in manager.FetchUserPrivilegeOnEntities(list(entities), client.settings.user):
        granted[moref_of(result.entity)] = {str(p) for p in result.privileges or []}
    return granted


def check_privileges(
    client: VsphereClient, vm_morefs: Sequence[str], datastore_morefs: Sequence[str] = ()
) -> PrivilegeReport:
    """The user's effective privileges on these VMs and datastores against ``required_privileges()``."""
    required = required_privileges()
    known = _known_privileges(client)
    wanted = {kind: [p for p in ids if known is None or p in known] for kind, ids in required.items()}
    unknown = sorted({p for ids in required.values() for p in ids} - (known or set()) if known else set())
    targets: list[tuple[str, Any]] = [
        ("VirtualMachine", client.bind(vim.VirtualMachine, m)) for m in vm_morefs
    ]
    targets += [("Datastore", client.bind(vim.Datastore, m)) for m in datastore_morefs]
    all_ids = sorted({p for ids in wanted.values() for p in ids})
    granted: dict[str, set[str]] = {}
    method = "HasPrivilegeOnEntities"
    try:
        granted = _has_privilege(client, [t for _, t in targets], all_ids)
    except (vmodl.MethodFault, FerryError) as first:
        method = "FetchUserPrivilegeOnEntities"
        try:
            granted = _fetch_user_privileges(client, [t for _, t in targets])
        except (vmodl.MethodFault, FerryError) as second:
            note = f"{_text(first)}; {_text(second)}"
            return PrivilegeReport(answered=False, unknown=unknown, note=note)
    missing: dict[str, list[str]] = {}
    for kind, target in targets:
        moref = moref_of(target)
        lacking = [p for p in wanted[kind] if p not in granted.get(moref, set())]
        if lacking:
            missing[moref] = lacking
    return PrivilegeReport(answered=True, missing=missing, unknown=unknown, method=method)


def _text(error: BaseException) -> str:
    return fault_text(error) if isinstance(error, vmodl.MethodFault) else str(error)
