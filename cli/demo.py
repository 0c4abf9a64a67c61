"""`vmferry demo`: a real warm migration on this machine, from a simulated vCenter to the OpenStack lab.

Everything runs locally: an embedded NATS server, vcsim-ferry (VMware's simulator with changed block
tracking, built by scripts/build-vcsim) holding a running VM whose disks are real files, and the
project's OpenStack lab (lab/openstack/start). The demo writes guest data, lets the whole chain
copy it (full pass), writes more and asks for a changed-blocks pass (`vmferry sync`), writes again
and cuts over (`vmferry cutover`): the source is shut down, the final pass copies what changed, and
an instance boots from the volumes with the VM's MAC. It then checks every volume byte for byte
against the source disk, shows a request that fails with its fix, and removes what it created.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec as DestinationSpec
from vmferry.adapters.openstack.teardown import teardown
from vmferry.bus.connection import NatsSettings
from vmferry.bus.embedded import EmbeddedNats
from vmferry.bus.errors import FerryError
from vmferry.bus.handles import BusHandle
from vmferry.bus.history import Recorded, history
from vmferry.bus.provision import provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.cli import output
from vmferry.cli.config import ConversionConfig, DestinationConfig, Settings, SourceConfig
from vmferry.cli.operate import request_cutover, request_pass
from vmferry.cli.oslab import OpenStackLab, ensure_conversion_host, running_lab
from vmferry.cli.requests import build_request, submit
from vmferry.cli.simlab import MIB, Lab, Nic, VcsimServer, VmSpec, build_vcsim, running_vcsim, write
from vmferry.cli.wiring import Session, registry_for, session
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.events import ConversionDone, InstanceCreated, VolumeSynced
from vmferry.schemas.state import VmState

DEMO_SOURCE = "demo-vcenter"
DEMO_DESTINATION = "demo-cloud"
DEMO_VM = "web 01 (prod) ✓"
DISKS = (64 * MIB, 16 * MIB)
CONVERSION_HOST = "vmferry-demo-conversion-host"
#: a pass of the demo's small disks takes seconds; the whole chain well under a minute
STEP_TIMEOUT = 300.0


@dataclass(frozen=True)
class DemoVm:
    """The source VM: its key and the files behind its disks."""

    key: str
    moref: str
    flat_files: tuple[Path, ...]


def demo_settings(state_dir: Path, url: str, vcsim: VcsimServer, lab: OpenStackLab, host: str) -> Settings:
    """Settings of the demo: the simulator as source, the lab as destination, the embedded server."""
    return Settings(
        nats=NatsSettings(servers=(url,)),
        nats_configured=True,
        prefix="demo",
        sources={
            DEMO_SOURCE: SourceConfig(
                host=vcsim.host,
                port=vcsim.port,
                user=vcsim.user,
                password_file=str(vcsim.password_file),
                ca_file=str(vcsim.ca_file),
            )
        },
        destinations={
            DEMO_DESTINATION: DestinationConfig(
                cloud=lab.admin_cloud,
                clouds_yaml=str(lab.clouds_yaml),
                conversion_host_id=host,
                device_root=str(lab.instances_dir / host),
            )
        },
        state_dir=state_dir,
        conversion=ConversionConfig(work_dir=str(state_dir / "work")),
    )


def _say(as_json: bool, text: str) -> None:
    if not as_json:
        output.console.print(text, highlight=False)


def _guest_writes(vm: DemoVm, seed: int) -> int:
    """What a running guest does between passes: rewrite a few scattered blocks of every disk."""
    written = 0
    for index, path in enumerate(vm.flat_files):
        size = path.stat().st_size
        for block in range(4):
            offset = (hashlib.sha256(f"{seed}/{index}/{block}".encode()).digest()[0] * size // 256) & ~0xFFFF
            data = os.urandom(128 * 1024)
            write(path, min(offset, size - len(data)), data)
            written += len(data)
    return written


def _vmware_mac() -> str:
    """A MAC from VMware's manual range (00:50:56:00-3f), new for every run."""
    tail = os.urandom(3)
    return f"00:50:56:{tail[0] & 0x3F:02x}:{tail[1]:02x}:{tail[2]:02x}"


def _make_vm(lab: Lab) -> DemoVm:
    made = lab.create_vm(
        VmSpec(
            name=DEMO_VM, disks=DISKS, nics=(Nic(mac=_vmware_mac()),), guest_id="debian12_64Guest", cbt=True
        )
    )
    made.PowerOnVM_Task()
    disks = [d for d in made.config.hardware.device if hasattr(d, "capacityInBytes")]
    files = tuple(lab.flat_file(d.backing.fileName) for d in disks)
    return DemoVm(vm_key_for(made.config.instanceUuid), made._moId, files)


async def _wait(
    store: StateStore, key: str, done: Callable[[VmState], bool], what: str, failure_ends: bool = True
) -> VmState:
    deadline = time.monotonic() + STEP_TIMEOUT
    state: VmState | None = None
    while time.monotonic() < deadline:
        state, _ = await store.get(key)
        if failure_ends and state is not None and state.phase == "failed" and state.failure is not None:
            raise FerryError(f"the demo migration failed: {state.failure.cause}", state.failure.fix)
        if state is not None and done(state):
            return state
        await asyncio.sleep(0.2)
    phase = state.phase if state else "unknown"
    raise FerryError(
        f"{key} did not get to {what} within {STEP_TIMEOUT:.0f} s (phase {phase})", "vmferry -vv demo"
    )


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(4 * MIB):
            sha.update(chunk)
    return sha.hexdigest()


def _verify(lab: OpenStackLab, vm: DemoVm, volume_ids: list[str]) -> list[dict[str, Any]]:
    """Compare every destination volume with its source disk (the volume may be larger: GiB units)."""
    results = []
    for flat, volume_id in zip(vm.flat_files, volume_ids, strict=True):
        backing = lab.backing_file(volume_id)
        size = flat.stat().st_size
        with backing.open("rb") as volume:
            head = hashlib.sha256()
            remaining = size
            while remaining:
                chunk = volume.read(min(4 * MIB, remaining))
                head.update(chunk)
                remaining -= len(chunk)
        results.append({"volume": volume_id, "equal": head.hexdigest() == _digest(flat), "bytes": size})
    return results


def _snapshots_left(vcsim: VcsimServer) -> list[str]:
    """vmferry snapshots still on the source (there must be none after a migration)."""
    builder = Lab(vcsim)
    try:
        return builder.vmferry_snapshots()
    finally:
        builder.close()


def _passes(events: list[Recorded]) -> list[dict[str, int]]:
    """Bytes copied per pass, from the volume.synced events."""
    per_pass: dict[int, int] = {}
    for recorded in events:
        data = recorded.event.data if recorded.event else None
        if isinstance(data, VolumeSynced):
            per_pass[data.pass_no] = per_pass.get(data.pass_no, 0) + data.bytes_copied
    return [{"pass": n, "bytes_copied": b} for n, b in sorted(per_pass.items())]


def _of_type(events: list[Recorded], kind: type[Any]) -> Any:
    return next(r.event.data for r in reversed(events) if r.event and isinstance(r.event.data, kind))


async def _migrate(s: Session, store: StateStore, vm: DemoVm, network: str, as_json: bool) -> VmState:
    """Full pass, guest writes, changed-blocks pass, guest writes, cutover."""
    request = build_request(
        {"options": {"transport": "https", "conversion": "skip"}},
        request_id="demo-warm", source=DEMO_SOURCE, destination=DEMO_DESTINATION, vm_names=(DEMO_VM,),
        mode="warm", cutover="manual", networks=(f"VM Network={network}",),
    )  # fmt: skip
    await submit(Publisher(s.js, s.naming), s.naming, request)
    _say(as_json, f"submitted warm migration [bold]{request.request_id}[/] of {DEMO_VM!r} ({vm.key})")
    await _wait(store, vm.key, lambda st: st.passes_synced >= 1, "the first full pass")
    _say(as_json, "pass 1 (full copy) synced; the guest keeps writing")
    _guest_writes(vm, 1)
    await request_pass(s, vm.key)
    await _wait(store, vm.key, lambda st: st.passes_synced >= 2, "the changed-blocks pass")
    _say(as_json, "pass 2 (changed blocks only) synced; the guest writes again, then cutover")
    _guest_writes(vm, 2)
    await request_cutover(s, vm.key, "vmferry demo")
    return await _wait(store, vm.key, lambda st: st.phase == "completed", "completion")


async def _bad_request(s: Session, store: StateStore, as_json: bool) -> VmState:
    bad = build_request(
        {}, request_id="demo-bad", source="no-such-vcenter", destination=DEMO_DESTINATION, vm_names=("db/01",)
    )
    await submit(Publisher(s.js, s.naming), s.naming, bad)
    failed = await _wait(store, "req-demo-bad", lambda st: st.phase == "failed", "failed", failure_ends=False)
    if failed.failure:
        _say(as_json, f"[red]demo-bad failed as expected:[/] {failed.failure.cause}")
        _say(as_json, f"[yellow]fix:[/] {failed.failure.fix}")
    return failed


async def _run_chain(settings: Settings, lab: OpenStackLab, vm: DemoVm, as_json: bool) -> dict[str, Any]:
    bus = BusHandle()
    async with session(settings) as s:
        registry = registry_for(settings, bus)
        changes = await provision(s.js, s.naming, registry)
        _say(as_json, f"provisioned {len(changes)} streams, buckets and consumers")
        store = await s.store()
        bus.bind(s.js, s.naming, store)
        runtime = Runtime(s.js, s.naming, registry, store, fetch_timeout=0.2)
        running = asyncio.create_task(runtime.run())
        _say(as_json, f"functions running: {', '.join(f.name for f in registry)} + tracker, dead letters")
        try:
            final = await _migrate(s, store, vm, lab.network, as_json)
            failed = await _bad_request(s, store, as_json)
            events = await history(s.js, s.naming, vm.key)
        finally:
            runtime.stop()
            await running
    created: InstanceCreated = _of_type(events, InstanceCreated)
    converted: ConversionDone = _of_type(events, ConversionDone)
    checks = _verify(lab, vm, list(converted.volume_ids))
    if not as_json:
        output.console.print(output.state_table([final, failed]))
        output.console.print(output.history_table(vm.key, events))
    return {
        "vm_key": vm.key,
        "migrated": final.phase,
        "server_id": created.server_id,
        "volumes": checks,
        "passes": _passes(events),
        "rejected": failed.phase,
        "rejection": failed.failure.cause if failed.failure else None,
        "events": output.history_json(events),
    }


async def _teardown(lab: OpenStackLab, vm: DemoVm) -> None:
    """Remove exactly what the migration created in the lab (server, ports, volumes), found by identity."""
    adapter = OpenStackAdapter(CloudAuth(cloud=lab.admin_cloud, clouds_yaml=lab.clouds_yaml))
    try:
        await teardown(adapter, DestinationSpec(vm_key=vm.key, name=DEMO_VM, cpus=1, memory_mib=1))
    finally:
        adapter.close()


async def run_demo(*, as_json: bool = False, keep: bool = False) -> dict[str, Any]:
    """Run the demo; returns (and with --json prints) what happened."""
    # The demo shows its deliberate failure itself; the runner's error log would only repeat it
    # (unless asked for with -v).
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("vmferry.bus.runner").setLevel(logging.CRITICAL)
    lab = running_lab()
    binary = build_vcsim()
    state_dir = Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    server = EmbeddedNats(state_dir / "nats")
    summary: dict[str, Any] = {}
    vm: DemoVm | None = None
    try:
        url = server.start()
        (state_dir / "vcsim").mkdir()
        with running_vcsim(binary, state_dir / "vcsim") as vcsim:
            builder = Lab(vcsim)
            try:
                vm = _make_vm(builder)
            finally:
                builder.close()
            _guest_writes(vm, 0)
            host = ensure_conversion_host(lab, CONVERSION_HOST)
            _say(as_json, f"[bold]embedded NATS[/] at {url}; vCenter simulator at {vcsim.url};")
            _say(as_json, f"OpenStack lab {lab.clouds_yaml}; conversion host {host}")
            settings = demo_settings(state_dir, url, vcsim, lab, host)
            summary = await _run_chain(settings, lab, vm, as_json)
            summary["snapshots_left"] = _snapshots_left(vcsim)
        if as_json:
            output.emit_json(summary)
        else:
            same = all(v["equal"] for v in summary["volumes"])
            _say(as_json, f"passes: {summary['passes']}")
            _say(
                as_json,
                f"[green]migrated[/]: server {summary['server_id']} is ACTIVE;"
                f" every volume {'equals' if same else '[red]DIFFERS FROM[/]'} its source disk.",
            )
        return summary
    finally:
        server.stop()
        if vm is not None and not keep:
            await _teardown(lab, vm)
        if keep:
            _say(as_json, f"state kept in {state_dir}; lab resources kept")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
