"""The vSphere side of a migration (vCenter or standalone ESXi), on pyvmomi.

* ``client.VsphereClient``: a session with verified TLS (CA bundle or pinned thumbprint), password
  from a file, transparent re-login, keep-alive, PropertyCollector reads and task waits.
* ``inventory``: one-traversal index, VM selector resolution, full VM read into ``VmDiscovered``.
* ``validation``: the catalogue of blockers and warnings (pure functions).
* ``snapshots``: CBT enabling, one snapshot per pass with changeIds, cleanup, sweep, changed areas.
* ``power``: graceful shutdown with timeout, hard power-off, power-on.
* ``privileges``: the user's effective privileges against the required list.
* ``aio``: the asyncio facade (``AsyncVsphere``) and the per-source factory (``VsphereClients``).

Every failure is a ``PermanentError`` or ``RetryableError`` whose cause and fix a human can act on.
"""

from vmferry.adapters.vsphere.aio import AsyncVsphere, VsphereClients
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import DiscoveredVm, VmFacts
from vmferry.adapters.vsphere.settings import VsphereSettings, settings_from_source
from vmferry.adapters.vsphere.snapshots import ChangedAreas, DiskState, PassSnapshot

__all__ = [
    "AsyncVsphere",
    "ChangedAreas",
    "DiscoveredVm",
    "DiskState",
    "PassSnapshot",
    "VmFacts",
    "VsphereClient",
    "VsphereClients",
    "VsphereSettings",
    "settings_from_source",
]
