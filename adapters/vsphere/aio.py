"""The asyncio face of the vSphere adapter: every blocking call runs in a worker thread
(``asyncio.to_thread``), a bounded number at a time per endpoint, so the event loop never blocks.

``VsphereClients`` is the factory the functions get injected: connected clients by source name.
A cancelled coroutine cannot stop its thread; the vSphere call finishes (or times out) on its own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from vmferry.adapters.vsphere import inventory, power, privileges, snapshots
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.settings import VsphereSettings, settings_from_source
from vmferry.bus.errors import PermanentError
from vmferry.schemas.request import MigrationRequest

if TYPE_CHECKING:
    from vmferry.cli.config import SourceConfig

T = TypeVar("T")
P = ParamSpec("P")


class AsyncVsphere:
    """One connected endpoint for asyncio code; at most ``max_concurrent`` calls run at once."""

    def __init__(self, client: VsphereClient, max_concurrent: int = 8) -> None:
        self.sync = client
        self._slots = asyncio.Semaphore(max_concurrent)

    @classmethod
    async def connect(cls, settings: VsphereSettings, max_concurrent: int = 8) -> AsyncVsphere:
        """Connect and log in (in a thread)."""
        client = await asyncio.to_thread(VsphereClient(settings).connect)
        return cls(client, max_concurrent)

    async def run(
        self, function: Callable[Concatenate[VsphereClient, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``function(client, *args, **kwargs)`` in a worker thread."""
        async with self._slots:
            return await asyncio.to_thread(functools.partial(function, self.sync, *args, **kwargs))

    async def close(self) -> None:
        """Log out and close the connections."""
        await asyncio.to_thread(self.sync.close)

    # -- the operations the functions use ------------------------------------------------------

    async def discover(self, request: MigrationRequest) -> list[inventory.DiscoveredVm]:
        """Resolve the request's selectors and read the selected VMs."""
        return await self.run(inventory.discover, request)

    async def find_vm(self, instance_uuid: str) -> str:
        """The current moref of a VM, by instanceUuid."""
        return await self.run(inventory.find_vm, instance_uuid)

    async def enable_cbt(self, vm_moref: str, request_id: str) -> bool:
        """Turn changed block tracking on (with the activation snapshot cycle)."""
        return await self.run(snapshots.enable_cbt, vm_moref, request_id)

    async def take_pass_snapshot(self, vm_moref: str, **options: Any) -> snapshots.PassSnapshot:
        """Take or find the pass snapshot (see ``snapshots.take_pass_snapshot`` for the options)."""
        return await self.run(snapshots.take_pass_snapshot, vm_moref, **options)

    async def release_pass(self, vm_moref: str, request_id: str, pass_no: int) -> int:
        """Remove a recorded pass's snapshot."""
        return await self.run(snapshots.release_pass, vm_moref, request_id, pass_no)

    async def changed_areas(
        self, vm_moref: str, snapshot_moref: str, disk: snapshots.DiskState, base_change_id: str | None
    ) -> snapshots.ChangedAreas:
        """What to copy of one disk in one pass."""
        return await self.run(snapshots.changed_areas, vm_moref, snapshot_moref, disk, base_change_id)

    async def list_vmferry_snapshots(self, request_id: str | None = None) -> list[snapshots.VmferrySnapshot]:
        """Every vmferry snapshot on this endpoint (of one request, if given)."""
        return await self.run(snapshots.list_vmferry_snapshots, request_id)

    async def sweep(self, **options: Any) -> list[snapshots.VmferrySnapshot]:
        """Remove stale vmferry snapshots (see ``snapshots.sweep``)."""
        return await self.run(snapshots.sweep, **options)

    async def stop_vm(self, vm_moref: str, shutdown_timeout: float) -> power.StopResult:
        """Guest shutdown with a timeout, then power-off."""
        return await self.run(power.stop_vm, vm_moref, shutdown_timeout)

    async def start_vm(self, vm_moref: str) -> bool:
        """Power on."""
        return await self.run(power.start_vm, vm_moref)

    async def check_privileges(
        self, vm_morefs: Sequence[str], datastore_morefs: Sequence[str] = ()
    ) -> privileges.PrivilegeReport:
        """Compare the user's privileges with the required list."""
        return await self.run(privileges.check_privileges, vm_morefs, datastore_morefs)


class VsphereClients:
    """Connected endpoints by configured source name, connected on first use and kept."""

    def __init__(self, settings: Mapping[str, VsphereSettings], max_concurrent: int = 8) -> None:
        self._settings = dict(settings)
        self._max_concurrent = max_concurrent
        self._clients: dict[str, AsyncVsphere] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._configured: dict[str, SourceConfig] = {}

    @classmethod
    def from_sources(cls, sources: Mapping[str, SourceConfig], max_concurrent: int = 8) -> VsphereClients:
        """From the ``sources`` section of the vmferry configuration.

        Each source is checked when first used, so one incomplete entry does not stop a process
        that never needs it; the error then names the entry and what it lacks.
        """
        clients = cls({}, max_concurrent)
        clients._configured = dict(sources)
        return clients

    async def __call__(self, source: str) -> AsyncVsphere:
        """The connected client for ``source``."""
        if source not in self._settings and source in self._configured:
            self._settings[source] = settings_from_source(source, self._configured[source])
        if source not in self._settings:
            known = ", ".join(sorted(self._settings)) or "none"
            raise PermanentError(
                f"vSphere source {source!r} is not configured (configured: {known})",
                "add it under `sources` in the vmferry configuration of the functions",
            )
        lock = self._locks.setdefault(source, asyncio.Lock())
        async with lock:
            client = self._clients.get(source)
            if client is None:
                client = await AsyncVsphere.connect(self._settings[source], self._max_concurrent)
                self._clients[source] = client
            return client

    async def close(self) -> None:
        """Close every connected client."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
