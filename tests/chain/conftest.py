"""The whole chain needs every real component: NATS (tests/conftest.py), vcsim-ferry and the lab.

``chain`` starts a runtime with the registered functions (or a subset) against a simulator and the
lab, in this process; tests drive it with requests and operator commands.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.openstack.conftest import openstack_lab
from tests.vsphere.conftest import vcsim_binary
from vmferry.bus.handles import BusHandle
from vmferry.bus.provision import provision
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.cli.config import Settings
from vmferry.cli.demo import CONVERSION_HOST, demo_settings
from vmferry.cli.oslab import OpenStackLab, ensure_conversion_host
from vmferry.cli.simlab import VcsimServer, running_vcsim
from vmferry.cli.wiring import Session, registry_for, session
from vmferry.schemas.state import VmState

__all__ = ["openstack_lab", "vcsim_binary"]


@pytest.fixture
def vcsim(vcsim_binary: Path, tmp_path: Path) -> Iterator[VcsimServer]:
    with running_vcsim(vcsim_binary, tmp_path) as server:
        yield server


@pytest.fixture
def settings(openstack_lab: OpenStackLab, vcsim: VcsimServer, nats_url: str) -> Iterator[Settings]:
    """The demo's configuration: source demo-vcenter (the simulator), destination demo-cloud (the lab)."""
    host = ensure_conversion_host(openstack_lab, CONVERSION_HOST)
    # conversion work folders hold Unix sockets: keep the path short (pytest's tmp_path is long)
    short = Path(tempfile.mkdtemp(prefix="vf-"))
    try:
        yield demo_settings(short, nats_url, vcsim, openstack_lab, host)
    finally:
        shutil.rmtree(short, ignore_errors=True)


@dataclass
class Chain:
    """A running runtime and what tests need to drive it."""

    session: Session
    store: StateStore

    async def until(self, key: str, done: Callable[[VmState], bool], timeout: float = 240.0) -> VmState:
        """Poll the VM's state until ``done`` holds."""
        deadline = time.monotonic() + timeout
        state: VmState | None = None
        while time.monotonic() < deadline:
            state, _ = await self.store.get(key)
            if state is not None and done(state):
                return state
            await asyncio.sleep(0.2)
        raise AssertionError(f"{key} never got there; last phase {state.phase if state else None}")


@asynccontextmanager
async def running_chain(settings: Settings, functions: Sequence[str] = ()) -> AsyncIterator[Chain]:
    """Provision and run the functions (all when empty) until the block ends."""
    bus = BusHandle()
    async with session(settings) as s:
        registry = registry_for(settings, bus)
        await provision(s.js, s.naming, registry)
        store = await s.store()
        bus.bind(s.js, s.naming, store)
        runtime = Runtime(s.js, s.naming, registry.select(functions), store, fetch_timeout=0.2)
        running = asyncio.create_task(runtime.run())
        try:
            yield Chain(s, store)
        finally:
            runtime.stop()
            await running
