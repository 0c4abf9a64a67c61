"""A cold migration through every function, failing after cutover: the source is powered back on,
no snapshot is left, the copied replicas stay, and the failure names the cause and the fix."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec as DestinationSpec
from vmferry.adapters.openstack.teardown import teardown
from vmferry.bus.handles import BusHandle
from vmferry.bus.provision import provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.cli.demo import CONVERSION_HOST, demo_settings
from vmferry.cli.oslab import OpenStackLab, ensure_conversion_host
from vmferry.cli.requests import build_request, submit
from vmferry.cli.simlab import MIB, Lab, Nic, VcsimServer, VmSpec, running_vcsim, write
from vmferry.cli.wiring import registry_for, session
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.state import VmState


@pytest.fixture
def vcsim(vcsim_binary: Path, tmp_path: Path) -> Iterator[VcsimServer]:
    with running_vcsim(vcsim_binary, tmp_path) as server:
        yield server


async def _until(store: StateStore, key: str, phase: str, timeout: float = 240.0) -> VmState:
    deadline = time.monotonic() + timeout
    state: VmState | None = None
    while time.monotonic() < deadline:
        state, _ = await store.get(key)
        if state is not None and state.phase == phase:
            return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"{key} stayed in {state.phase if state else None}, never {phase}")


@pytest.mark.timeout(400)
async def test_a_failure_after_cutover_powers_the_source_back_on_and_leaves_no_snapshot(
    openstack_lab: OpenStackLab, vcsim: VcsimServer, nats_url: str, tmp_path: Path
) -> None:
    lab = Lab(vcsim)
    short = Path(tempfile.mkdtemp(prefix="vf-"))
    try:
        made = lab.create_vm(VmSpec(name="cold db", disks=(8 * MIB,), nics=(Nic(mac="00:50:56:00:c0:1d"),)))
        made.PowerOnVM_Task()
        flat = lab.flat_file(made.config.hardware.device[-2].backing.fileName)
        key = vm_key_for(made.config.instanceUuid)
        host = ensure_conversion_host(openstack_lab, CONVERSION_HOST)
        # conversion work folders hold Unix sockets: keep the path short (pytest's tmp_path is long)
        settings = demo_settings(short, nats_url, vcsim, openstack_lab, host)
        write(flat, 3 * MIB, b"cold data" * 1000)
        bus = BusHandle()
        async with session(settings) as s:
            registry = registry_for(settings, bus)
            await provision(s.js, s.naming, registry)
            store = await s.store()
            bus.bind(s.js, s.naming, store)
            runtime = Runtime(s.js, s.naming, registry, store, fetch_timeout=0.2)
            running = asyncio.create_task(runtime.run())
            try:
                request = build_request(
                    {"options": {"transport": "https", "conversion": "skip"}},
                    request_id="cold-1", source="demo-vcenter", destination="demo-cloud",
                    vm_names=("cold db",), networks=("VM Network=no-such-network",),
                )  # fmt: skip
                await submit(Publisher(s.js, s.naming), s.naming, request)
                failed = await _until(store, key, "failed")
                await _until_powered_on(lab, made)
            finally:
                runtime.stop()
                await running
        assert failed.failure is not None and failed.failure.step == "launch"
        assert "no-such-network" in failed.failure.cause and failed.failure.fix
        assert failed.passes_synced == 1 and failed.source_power is not None
        assert lab.vmferry_snapshots() == []
        replica = failed.sync.volumes if failed.sync else {}
        assert len(replica) == 1, "the replica of the only pass is kept for a retry"
    finally:
        adapter = OpenStackAdapter(
            CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)
        )
        await teardown(adapter, DestinationSpec(vm_key=key, name="cold db", cpus=1, memory_mib=1))
        adapter.close()
        lab.close()
        shutil.rmtree(short, ignore_errors=True)


async def _until_powered_on(lab: Lab, vm: object, timeout: float = 60.0) -> None:
    """restore powers the source on after the failure event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.vm(vm._moId).runtime.powerState == "poweredOn":  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the source was not powered back on after the failure")
