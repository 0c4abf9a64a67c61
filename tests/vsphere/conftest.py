"""Fixtures for tests against vcsim-ferry, the vCenter simulator with changed block tracking.

``vcsim_binary`` builds (or finds in the cache) tools/vcsim once per session via
scripts/build-vcsim; ``vcsim`` starts one simulator per test on 127.0.0.1 with a random port,
a generated password and certificate, and its own datastore folder under the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import missing_component
from vmferry.adapters.vsphere.aio import VsphereClients
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.cli.simlab import (
    BLOCK_SIZE,
    PAGE_EXTENTS,
    PAGE_SPAN,
    Lab,
    SimulatorError,
    VcsimServer,
    build_vcsim,
    running_vcsim,
    thumbprint,
)

__all__ = ["BLOCK_SIZE", "PAGE_EXTENTS", "PAGE_SPAN", "Step", "VcsimServer", "thumbprint"]


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    """Path of vcsim-ferry: $VMFERRY_VCSIM, or built (cached) by scripts/build-vcsim."""
    try:
        return build_vcsim()
    except SimulatorError as error:
        if "Go and govmomi" in error.cause:
            missing_component("Go and govmomi from Debian (to build vcsim-ferry)", error.fix)
        pytest.fail(error.cause)


@pytest.fixture
def vcsim(vcsim_binary: Path, tmp_path: Path) -> Iterator[VcsimServer]:
    """One simulator for this test: no VMs, one datastore ("ferry") over tmp_path/datastore."""
    with running_vcsim(vcsim_binary, tmp_path) as server:
        yield server


@pytest.fixture
def lab(vcsim: VcsimServer) -> Iterator[Lab]:
    """A builder session on the simulator; at the end no vmferry snapshot may be left anywhere."""
    builder = Lab(vcsim)
    try:
        yield builder
        left = builder.vmferry_snapshots()
        assert left == [], f"vmferry snapshots left behind: {left}"
    finally:
        builder.close()


@pytest.fixture
def client(lab: Lab) -> Iterator[VsphereClient]:
    """The adapter's client, connected to the simulator with verified TLS."""
    with VsphereClient(lab.settings()) as connected:
        yield connected


@pytest.fixture
async def clients(lab: Lab) -> AsyncIterator[VsphereClients]:
    """The functions' client factory with one configured source, ``lab``."""
    factory = VsphereClients({"lab": lab.settings()})
    try:
        yield factory
    finally:
        await factory.close()


@dataclass
class Step:
    """What the runner offers a handler (StepContext), counting heartbeats."""

    delivery: int = 1
    function: str = "test"
    beats: int = 0

    async def heartbeat(self) -> None:
        self.beats += 1
