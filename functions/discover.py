"""discover: reads the VMs a migration request selects from vSphere, validates each one, and emits
one ``vm.discovered`` per VM, keyed by its instanceUuid.

Selectors that pick nothing or several VMs, unreadable VMs and blocking findings fail the whole
request with one PermanentError that names every VM, blocker and fix; warnings travel with the VM.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.adapters.vsphere.inventory import DiscoveredVm
from vmferry.adapters.vsphere.privileges import PrivilegeReport
from vmferry.adapters.vsphere.validation import blockers, validate
from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import FerryError, PermanentError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.schemas.events import Finding, MigrationAccepted, VmDiscovered
from vmferry.schemas.request import MigrationRequest

#: a connected vSphere client for a configured source name
ClientFactory = Callable[[str], Awaitable[AsyncVsphere]]
#: MigrationFailed.cause holds at most 4096 characters
_CAUSE_LIMIT = 3500
#: folders whose privileges are checked (on one VM each)
_PRIVILEGE_SAMPLES = 50


@dataclass(frozen=True)
class _Privileges:
    """The privilege report and which VM stood for each folder."""

    report: PrivilegeReport | None
    samples: dict[str, str]

    def findings_for(self, vm: DiscoveredVm) -> list[Finding]:
        """The privilege warnings that concern this VM (via its folder's sample) and its datastores."""
        if self.report is None:
            return []
        sample = self.samples.get(vm.facts.folder)
        if sample is None:
            return []
        return self.report.findings([sample, *vm.facts.datastores])


def _blocked_text(found: DiscoveredVm, findings: Sequence[Finding]) -> str:
    identity = found.vm.identity
    items = "; ".join(f"[{f.code}] {f.message} (fix: {f.fix})" for f in findings)
    return f"VM {identity.name!r} ({identity.moref} at {found.facts.folder}): {items}"


def _blocked_error(blocked: Sequence[tuple[DiscoveredVm, list[Finding]]]) -> PermanentError:
    texts = [_blocked_text(found, findings) for found, findings in blocked]
    cause = f"{len(blocked)} VM(s) cannot be migrated as they are: " + " | ".join(texts)
    if len(cause) > _CAUSE_LIMIT:
        cause = cause[: _CAUSE_LIMIT - 40].rsplit(" | ", 1)[0] + f" | ... ({len(texts)} VMs in all)"
    return PermanentError(
        cause,
        "fix each blocker in vSphere (or drop the VM from the request), then submit the request again",
    )


@dataclass(frozen=True)
class Discover:
    """The handler; ``clients`` gives a connected vSphere client per configured source name."""

    clients: ClientFactory
    check_privileges: bool = True

    async def _privileges(self, client: AsyncVsphere, found: Sequence[DiscoveredVm]) -> _Privileges:
        """Check the user's privileges on one VM per folder (roles are granted on folders and
        datacenters in practice; checking every VM of a large request costs seconds) and on
        every datastore. Best effort: a server that cannot answer yields a warning, not an error."""
        if not self.check_privileges or not found:
            return _Privileges(None, {})
        samples: dict[str, str] = {}
        for vm in found:
            if len(samples) < _PRIVILEGE_SAMPLES:
                samples.setdefault(vm.facts.folder, vm.facts.moref)
        datastores = sorted({d for f in found for d in f.facts.datastores})
        try:
            report = await client.check_privileges(sorted(set(samples.values())), datastores)
        except FerryError as error:
            report = PrivilegeReport(answered=False, note=error.cause)
        return _Privileges(report, samples)

    async def inspect(self, request: MigrationRequest) -> list[tuple[DiscoveredVm, list[Finding]]]:
        """Every selected VM with all its findings; changes nothing (also `vmferry validate`)."""
        client = await self.clients(request.source.name)
        found = await client.discover(request)
        privileges = await self._privileges(client, found)
        return [
            (vm, validate(vm, request.mode, request.options) + privileges.findings_for(vm)) for vm in found
        ]

    async def __call__(self, event: CloudEvent[MigrationAccepted], context: StepContext) -> Sequence[Emit]:
        """Discover, validate, and emit one vm.discovered per selected VM."""
        emits: list[Emit] = []
        blocked: list[tuple[DiscoveredVm, list[Finding]]] = []
        for vm, findings in await self.inspect(event.data.request):
            blocking = blockers(findings)
            if blocking:
                blocked.append((vm, blocking))
                continue
            discovered: VmDiscovered = msgspec.structs.replace(vm.vm, findings=findings)
            emits.append(Emit(discovered.vm_key, discovered))
        if blocked:
            raise _blocked_error(blocked)
        return emits


def definition(handler: Discover, concurrency: int | None = None) -> FunctionDef[MigrationAccepted]:
    """How the runner hosts discover."""
    return FunctionDef(
        name="discover",
        consumes=MigrationAccepted,
        emits=(VmDiscovered,),
        handler=handler,
        concurrency=concurrency or 4,
        ack_wait=60.0,
        max_deliver=5,
        description="reads the selected VMs from vSphere, validates them and emits vm.discovered",
    )
