"""The migration functions: one module per step, each a pure handler with injected dependencies.

``build_registry`` is the explicit list of what exists, in flow order; the CLI wires dependencies
into it. Every function is registered whether or not this process is configured for it, so
provisioning always declares the whole chain; an unconfigured source or destination is a clear
error when a function first needs it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.adapters.conversion.model import HostConfig
from vmferry.adapters.dataplane.snapshot_sources import TransportSettings
from vmferry.adapters.openstack.client import OpenStackAdapter
from vmferry.adapters.vsphere.aio import AsyncVsphere
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Registry
from vmferry.bus.handles import BusHandle
from vmferry.functions import convert, cutover, discover, intake, launch, settle, snapshot, transfer
from vmferry.schemas.request import DestinationRef, MigrationPlan

VsphereFactory = Callable[[str], Awaitable[AsyncVsphere]]
OpenStackFactory = Callable[[DestinationRef], Awaitable[OpenStackAdapter]]


@dataclass(frozen=True)
class ConversionHostConfig:
    """Where replicas are attached for one destination: the Nova server this process runs on."""

    server_id: str | None = None
    #: where that server's /dev/disk/by-id is seen from this process ("/" on the host itself)
    device_root: Path = Path("/")


async def _no_vsphere(source: str) -> AsyncVsphere:
    raise PermanentError(f"vSphere source {source!r} is not configured", "add it under `sources`")


async def _no_openstack(destination: DestinationRef) -> OpenStackAdapter:
    raise PermanentError(
        f"OpenStack destination {destination.cloud!r} is not configured", "add it under `destinations`"
    )


@dataclass(frozen=True)
class Dependencies:
    """What the functions need from the outside world, resolved by the composition root (CLI)."""

    known_sources: frozenset[str] = frozenset()
    known_destinations: frozenset[str] = frozenset()
    concurrency: dict[str, int] = field(default_factory=dict)
    bus: BusHandle = field(default_factory=BusHandle)
    vsphere: VsphereFactory = _no_vsphere
    openstack: OpenStackFactory = _no_openstack
    #: destination name -> its conversion host
    conversion_hosts: Mapping[str, ConversionHostConfig] = field(default_factory=dict)
    #: source name -> nbdkit transport settings (vddk, ssh)
    transports: Mapping[str, TransportSettings] = field(default_factory=dict)
    conversion: HostConfig = field(default_factory=lambda: HostConfig(appliance_cache=Path("appliance")))
    work_dir: Path = Path("work")

    def conversion_host(self, plan: MigrationPlan) -> str:
        """The server id replicas of this plan's destination are attached to."""
        host = self.conversion_hosts.get(plan.destination.cloud)
        if host is None or not host.server_id:
            raise PermanentError(
                f"no conversion host is configured for destination {plan.destination.cloud!r}",
                f"set destinations.{plan.destination.cloud}.conversion_host_id to the Nova server id of"
                " the machine the transfer and convert functions run on",
            )
        return host.server_id

    def device_root(self, server_id: str) -> Path:
        """Where the conversion host's attached volumes appear from this process."""
        for host in self.conversion_hosts.values():
            if host.server_id == server_id:
                return host.device_root
        return Path("/")


def build_registry(deps: Dependencies) -> Registry:
    """Every function of the flow, with its dependencies injected."""
    workers = deps.concurrency.get
    return Registry(
        [
            intake.definition(intake.Intake(deps.known_sources, deps.known_destinations), workers("intake")),
            discover.definition(discover.Discover(deps.vsphere), workers("discover")),
            snapshot.definition(snapshot.Snapshot(deps.vsphere, deps.bus), workers("snapshot")),
            snapshot.pass_definition(snapshot.PassSnapshot(deps.vsphere, deps.bus), workers("snapshot-pass")),
            transfer.definition(
                transfer.Transfer(
                    clients=deps.vsphere,
                    adapters=deps.openstack,
                    bus=deps.bus,
                    conversion_host=deps.conversion_host,
                    transports=deps.transports,
                    device_root=deps.device_root,
                ),
                workers("transfer"),
            ),
            settle.definition(settle.Settle(deps.vsphere, deps.bus), workers("settle")),
            cutover.definition(cutover.Cutover(deps.vsphere, deps.bus), workers("cutover")),
            convert.definition(
                convert.Convert(
                    adapters=deps.openstack,
                    bus=deps.bus,
                    host=deps.conversion,
                    work_root=deps.work_dir / "conversion",
                    conversion_host=deps.conversion_host,
                    device_root=deps.device_root,
                ),
                workers("convert"),
            ),
            launch.definition(launch.Launch(deps.openstack, deps.bus), workers("launch")),
            cutover.restore_definition(cutover.Restore(deps.vsphere, deps.bus), workers("restore")),
        ]
    )
