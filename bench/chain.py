"""Backbone benchmark: N VMs through a five-step chain of no-op functions vs a raw nats-py loop.

One embedded nats-server serves every measurement. Each measurement runs in its own child process
so that its peak RSS belongs to that side alone (one process holding both sides would report the
larger of the two for both, because CPython rarely returns freed memory). The parent samples the
child's process tree and the server with psutil; the child also reports its kernel high-water mark
(``ru_maxrss``). Variants are interleaved round by round, in rotating order, and medians are
reported with the ratio vmferry/raw of events per second.

Run: ``python -m bench.chain --vms 1000 --runs 3`` (see bench/README.md for how to read it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from vmferry.bus.cloudevents import CloudEvent, derived_id, encode
from vmferry.bus.connection import NatsSettings, connect
from vmferry.bus.embedded import EmbeddedNats, find_binary
from vmferry.bus.function import Emit, FunctionDef, Handler, StepContext
from vmferry.bus.naming import Naming
from vmferry.bus.provision import TRACKER, Limits, provision, stream_configs
from vmferry.bus.publisher import Publisher, source_of
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.schemas.base import EventPayload, vm_key_for
from vmferry.schemas.events import (
    ConversionDone,
    DiskInfo,
    DiskSnapshotReady,
    GuestInspection,
    InstanceCreated,
    MigrationCompleted,
    NicInfo,
    VmDiscovered,
    VmIdentity,
    VolumeSynced,
)
from vmferry.schemas.request import DestinationRef, MigrationPlan, SourceRef

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROFILES_DIR = RESULTS_DIR / "profiles"
RAW, VMFERRY, TRACKED = "raw", "vmferry", "vmferry+tracker"
VARIANTS = (RAW, VMFERRY, TRACKED)
LABELS = {
    RAW: "raw nats-py loop",
    VMFERRY: "vmferry, no tracker",
    TRACKED: "vmferry + tracker",
}
#: The chain: stage 0 is seeded, each function turns stage s into stage s+1.
STAGES: tuple[type[EventPayload], ...] = (
    VmDiscovered,
    DiskSnapshotReady,
    VolumeSynced,
    ConversionDone,
    InstanceCreated,
    MigrationCompleted,
)
FUNCTIONS = ("snapshot", "transfer", "convert", "launch", "complete")
STEPS = len(FUNCTIONS)
REQUEST_ID = "bench-wave-1"
PLAN = MigrationPlan(source=SourceRef(name="vcenter-lab"), destination=DestinationRef(cloud="lab"))
SEED_SOURCE = "/bench/seed"
_NAMESPACE = uuid.UUID("0b6a52f4-6c1e-4b59-8c7e-2f4b0d8f3a10")
GIB = 1024**3
MIB = 1024**2
POLL_S = 0.01
CHILD_DEADLINE_S = 1800.0

log = logging.getLogger("bench.chain")


# ---------------------------------------------------------------------------------------------
# Workload: the same valid payloads feed both sides, so messages have the same sizes.


@dataclass(frozen=True)
class VmWorkload:
    """One VM's key and its six payloads, in chain order."""

    key: str
    payloads: tuple[EventPayload, ...]


def _uuid(kind: str, index: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{kind}-{index}"))


def vm_workload(index: int) -> VmWorkload:
    """Realistic payloads for one single-disk, single-NIC VM (deterministic per index)."""
    instance_uuid = _uuid("vm", index)
    key = vm_key_for(instance_uuid)
    name = f"bench-{index:05d}"
    disk = DiskInfo(
        key=2000,
        label="Hard disk 1",
        controller="pvscsi",
        capacity_bytes=40 * GIB,
        backing_file=f"[datastore1] {name}/{name}.vmdk",
        datastore="datastore1",
        cbt_enabled=True,
    )
    nic = NicInfo(
        key=4000,
        mac=f"00:50:56:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}",
        adapter_type="vmxnet3",
        network="VM Network",
    )
    change_id = f"52 9c 1d 3e 7a 0b 44 12-8f 6e 2a 91 c4 57 b0 {index & 0xFF:02x}/7"
    volume_id = _uuid("volume", index)
    server_id = _uuid("server", index)
    common: dict[str, Any] = {"request_id": REQUEST_ID, "vm_key": key}
    planned: dict[str, Any] = {**common, "plan": PLAN}
    discovered = VmDiscovered(
        **planned,
        identity=VmIdentity(instance_uuid=instance_uuid, name=name, moref=f"vm-{1000 + index}"),
        cpus=2,
        memory_mib=4096,
        guest_id="rhel9_64Guest",
        power_state="poweredOn",
        host="esxi-01.lab",
        disks=[disk],
        nics=[nic],
    )
    planned["vm"] = discovered.inventory()
    payloads: tuple[EventPayload, ...] = (
        discovered,
        DiskSnapshotReady(
            **planned,
            pass_no=0,
            snapshot_moref=f"snapshot-{index}",
            disk=disk,
            disk_count=1,
            change_id=change_id,
        ),
        VolumeSynced(
            **planned,
            pass_no=0,
            disk_key=2000,
            disk_count=1,
            volume_id=volume_id,
            change_id=change_id,
            bytes_copied=12 * GIB,
            bytes_total=40 * GIB,
            verified=True,
        ),
        ConversionDone(
            **planned,
            volume_ids=[volume_id],
            inspection=GuestInspection(
                os_type="linux",
                distro="rhel",
                version="9.4",
                product_name="Red Hat Enterprise Linux 9.4",
                root_device="/dev/sda3",
            ),
        ),
        InstanceCreated(
            **common,
            server_id=server_id,
            flavor_id="m1.medium",
            port_ids=[_uuid("port", index)],
            volume_ids=[volume_id],
        ),
        MigrationCompleted(**common, server_id=server_id, passes=1),
    )
    return VmWorkload(key, payloads)


def workload(vms: int) -> list[VmWorkload]:
    """Every VM of the run."""
    return [vm_workload(i) for i in range(vms)]


def seed_event(vm: VmWorkload) -> CloudEvent[EventPayload]:
    """The first event of a VM, as the seeding publisher sends it."""
    return CloudEvent(
        id=derived_id("bench-seed", vm.key),
        type=VmDiscovered.spec.ce_type,
        source=SEED_SOURCE,
        subject=vm.key,
        data=vm.payloads[0],
    )


# ---------------------------------------------------------------------------------------------
# Side (a): the raw nats-py loop.


@dataclass(frozen=True)
class RawMessage:
    """A pre-encoded message: subject, headers (CloudEvents binary + Nats-Msg-Id) and body."""

    subject: str
    headers: dict[str, str]
    body: bytes


def raw_messages(naming: Naming, vms: Sequence[VmWorkload]) -> list[list[RawMessage]]:
    """Per stage, the messages the raw loop publishes: byte for byte what vmferry would send."""
    stages: list[list[RawMessage]] = [[] for _ in STAGES]
    for vm in vms:
        event = seed_event(vm)
        for stage, payload in enumerate(vm.payloads):
            if stage > 0:
                out_type = payload.spec.ce_type
                event = CloudEvent(
                    id=derived_id(event.id, out_type, vm.key, ""),
                    type=out_type,
                    source=source_of(FUNCTIONS[stage - 1]),
                    subject=vm.key,
                    data=payload,
                    extensions={"causationid": event.id},
                )
            headers, body = encode(event)
            stages[stage].append(RawMessage(naming.subject(vm.key, type(payload)), headers, body))
    return stages


def raw_consumer(naming: Naming, stage: int, window: int) -> api.ConsumerConfig:
    """The durable of raw step ``stage`` (1-based): the settings vmferry's provisioning uses."""
    return api.ConsumerConfig(
        durable_name=naming.durable(FUNCTIONS[stage - 1]),
        filter_subject=naming.consumer_filter(STAGES[stage - 1]),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=5,
        max_ack_pending=max(window * 4, 64),
    )


async def _publish_all(js: JetStreamContext, messages: Sequence[RawMessage]) -> None:
    await asyncio.gather(*(js.publish(m.subject, m.body, headers=m.headers) for m in messages))


async def raw_chain(
    js: JetStreamContext, naming: Naming, stages: list[list[RawMessage]], window: int, fetch_timeout: float
) -> None:
    """Seed stage 0, then per step: fetch a batch, publish its successors (awaiting the PubAcks)
    and only then ack the inputs, the same at-least-once order vmferry's runner keeps."""
    for start in range(0, len(stages[0]), window):
        await _publish_all(js, stages[0][start : start + window])
    for stage in range(1, len(STAGES)):
        successor = {
            previous.subject: following
            for previous, following in zip(stages[stage - 1], stages[stage], strict=True)
        }
        sub = await js.pull_subscribe_bind(durable=naming.durable(FUNCTIONS[stage - 1]), stream=naming.stream)
        handled = 0
        while handled < len(successor):
            try:
                batch = await sub.fetch(window, timeout=fetch_timeout)
            except TimeoutError:
                continue
            await _publish_all(js, [successor[m.subject] for m in batch])
            for msg in batch:
                await msg.ack()
            handled += len(batch)
        await sub.unsubscribe()


async def run_raw(options: ChildOptions) -> dict[str, Any]:
    """Measure the raw loop; returns wall time and checks."""
    nc = await nats.connect(options.url)
    try:
        js = nc.jetstream()
        naming = Naming(prefix=options.prefix)
        await js.add_stream(stream_configs(naming, Limits())[0])
        for stage in range(1, len(STAGES)):
            await js.add_consumer(naming.stream, raw_consumer(naming, stage, options.window))
        stages = raw_messages(naming, workload(options.vms))
        started, cpu_started = time.perf_counter(), time.process_time()
        await raw_chain(js, naming, stages, options.window, options.fetch_timeout)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        await nc.flush()
        stored = (await js.stream_info(naming.stream)).state.messages
        if stored != len(STAGES) * options.vms:
            raise RuntimeError(f"raw loop stored {stored} messages, expected {len(STAGES) * options.vms}")
        return {"wall_s": wall, "cpu_s": cpu, "stored": stored}
    finally:
        await nc.close()


# ---------------------------------------------------------------------------------------------
# Side (b): vmferry's runtime with five no-op functions.


def relay(next_payloads: Mapping[str, EventPayload]) -> Handler[Any]:
    """A no-op handler: emits the VM's pre-built next payload."""

    async def handle(event: CloudEvent[Any], context: StepContext) -> Sequence[Emit]:
        return [Emit(event.subject, next_payloads[event.subject])]

    return handle


def chain_functions(vms: Sequence[VmWorkload], concurrency: int) -> list[FunctionDef[Any]]:
    """The five functions of the chain."""
    return [
        FunctionDef(
            name=name,
            consumes=STAGES[step],
            emits=(STAGES[step + 1],),
            handler=relay({vm.key: vm.payloads[step + 1] for vm in vms}),
            concurrency=concurrency,
            ack_wait=30.0,
            max_deliver=5,
        )
        for step, name in enumerate(FUNCTIONS)
    ]


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(POLL_S)


async def _seed(js: JetStreamContext, naming: Naming, vms: Sequence[VmWorkload], window: int) -> None:
    publisher = Publisher(js, naming)
    for start in range(0, len(vms), window):
        await asyncio.gather(*(publisher.publish(seed_event(vm)) for vm in vms[start : start + window]))


async def _verify_vmferry(
    js: JetStreamContext, naming: Naming, store: StateStore, vms: Sequence[VmWorkload], tracker: bool
) -> dict[str, Any]:
    stored = (await js.stream_info(naming.stream)).state.messages
    dead = (await js.stream_info(naming.dlq_stream)).state.messages
    if stored != len(STAGES) * len(vms) or dead:
        raise RuntimeError(f"vmferry stored {stored} events and {dead} dead letters")
    if tracker:
        phases = [(await store.get(vm.key))[0] for vm in vms]
        incomplete = sum(1 for state in phases if state is None or state.phase != "completed")
        if incomplete:
            raise RuntimeError(f"tracker: {incomplete} VMs are not in phase completed")
    return {"stored": stored, "dead_letters": dead}


async def run_vmferry(options: ChildOptions, tracker: bool) -> dict[str, Any]:
    """Measure vmferry's runtime; with the tracker, also the time until the KV state settles."""
    nc = await connect(NatsSettings(servers=(options.url,), name="vmferry-bench"))
    try:
        js = nc.jetstream()
        naming = Naming(prefix=options.prefix)
        vms = workload(options.vms)
        functions = chain_functions(vms, options.window)
        await provision(js, naming, functions)
        done = f"{naming.stream}_bench_done"
        await js.add_consumer(
            naming.stream,
            api.ConsumerConfig(
                durable_name=done,
                filter_subject=naming.consumer_filter(MigrationCompleted),
                ack_policy=api.AckPolicy.NONE,
            ),
        )
        store = await StateStore.open(js, naming.state_bucket)
        runtime = Runtime(js, naming, functions, store, tracker=tracker, fetch_timeout=options.fetch_timeout)
        task = asyncio.create_task(runtime.run())
        await asyncio.sleep(0.5)  # runners are up and waiting before work arrives, as in production

        async def completed() -> bool:
            if task.done():
                task.result()  # a crashed runtime must fail the run, not hang it
            pending: int = (await js.consumer_info(naming.stream, done)).num_pending or 0
            return pending >= options.vms

        async def settled() -> bool:
            info = await js.consumer_info(naming.stream, naming.durable(TRACKER))
            return not info.num_pending and not info.num_ack_pending

        started, cpu_started = time.perf_counter(), time.process_time()
        await _seed(js, naming, vms, options.window)
        await _wait_for(completed, "all MigrationCompleted events")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        result: dict[str, Any] = {"wall_s": wall, "cpu_s": cpu}
        if tracker:
            await _wait_for(settled, "the tracker to catch up")
            result["settled_s"] = time.perf_counter() - started
        runtime.stop()
        await task
        result.update(await _verify_vmferry(js, naming, store, vms, tracker))
        return result
    finally:
        await nc.close()


# ---------------------------------------------------------------------------------------------
# Child process entry: one measurement, one JSON line on stdout.


@dataclass(frozen=True)
class ChildOptions:
    """What a child measures."""

    variant: str
    url: str
    prefix: str
    vms: int
    window: int
    fetch_timeout: float


async def child_main(options: ChildOptions) -> dict[str, Any]:
    """Run one measurement and add the process's peak RSS."""
    if options.variant == RAW:
        result = await run_raw(options)
    else:
        result = await run_vmferry(options, tracker=options.variant == TRACKED)
    result["handled"] = STEPS * options.vms
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---------------------------------------------------------------------------------------------
# Parent: server, interleaving, RSS sampling, cleanup, report.


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree and of the server until stopped; keeps the peaks."""

    def __init__(self, client_pid: int, server_pid: int | None, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self._client = psutil.Process(client_pid)
        self._server = psutil.Process(server_pid) if server_pid else None
        self._interval = interval
        self._halt = threading.Event()
        self.client_peak = 0
        self.server_peak = 0
        self.samples = 0

    def _tree_rss(self) -> int:
        total = 0
        for process in (self._client, *self._client.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def sample(self) -> None:
        """Take one sample (silently nothing once the child has exited)."""
        with contextlib.suppress(psutil.Error):
            self.client_peak = max(self.client_peak, self._tree_rss())
        if self._server is not None:
            with contextlib.suppress(psutil.Error):
                self.server_peak = max(self.server_peak, self._server.memory_info().rss)
        self.samples += 1

    def run(self) -> None:
        self.sample()
        while not self._halt.wait(self._interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._halt.set()
        self.join()


@dataclass
class Measurement:
    """One child's result."""

    variant: str
    round: int
    prefix: str
    wall_s: float
    events_per_s: float
    client_cpu_s: float
    client_peak_rss_mib: float
    client_ru_maxrss_mib: float
    server_peak_rss_mib: float
    settled_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def profiler_prefix(profiler: str | None, output: Path) -> list[str]:
    """The command that wraps a child when profiling (py-spy samples; cProfile instruments)."""
    if profiler is None:
        return [sys.executable]
    output.parent.mkdir(parents=True, exist_ok=True)
    if profiler == "cprofile":
        return [sys.executable, "-m", "cProfile", "-o", f"{output}.pstats"]
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("--profile py-spy needs py-spy: pip install py-spy")
    return [spy, "record", "--rate", "1000", "--format", "speedscope", "-o", f"{output}.speedscope.json",
            "--", sys.executable]  # fmt: skip


def run_child(
    options: ChildOptions, round_no: int, server_pid: int | None, profiler: str | None = None
) -> Measurement:
    """Start a child for one measurement, sample its RSS, and parse its result."""
    profile_to = PROFILES_DIR / f"{options.variant}-round{round_no}-{options.prefix}"
    command = [
        *profiler_prefix(profiler, profile_to), str(Path(__file__).resolve()), "--child", options.variant,
        "--url", options.url, "--prefix", options.prefix, "--vms", str(options.vms),
        "--concurrency", str(options.window), "--fetch-timeout", str(options.fetch_timeout),
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    sampler = RssSampler(child.pid, server_pid)
    sampler.start()
    try:
        out, _ = child.communicate(timeout=CHILD_DEADLINE_S + 60)
    finally:
        sampler.stop()
    if child.returncode != 0:
        raise RuntimeError(f"{options.variant} child failed with exit code {child.returncode}")
    # the last JSON line: a profiler wrapping the child may print its own lines after it
    result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    wall = float(result.pop("wall_s"))
    settled = result.pop("settled_s", None)
    return Measurement(
        variant=options.variant,
        round=round_no,
        prefix=options.prefix,
        wall_s=wall,
        events_per_s=result["handled"] / wall,
        client_cpu_s=float(result.pop("cpu_s")),
        client_peak_rss_mib=sampler.client_peak / MIB,
        client_ru_maxrss_mib=float(result.pop("ru_maxrss_mib")),
        server_peak_rss_mib=sampler.server_peak / MIB,
        settled_s=float(settled) if settled is not None else None,
        extra=result,
    )


async def delete_streams(url: str, prefix: str) -> list[str]:
    """Remove every stream of one run (events, dead letters, advisories, state bucket)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        mine = {Naming(prefix=prefix).stream, f"KV_{Naming(prefix=prefix).state_bucket}"}
        names = [s.config.name or "" for s in await js.streams_info()]
        doomed = [n for n in names if n in mine or n.startswith(f"{Naming(prefix=prefix).stream}_")]
        for name in doomed:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
        return doomed
    finally:
        await nc.close()


async def remaining_streams(url: str) -> list[str]:
    """Streams still on the server (should be none once every run cleaned up)."""
    nc = await nats.connect(url)
    try:
        return [s.config.name or "" for s in await nc.jetstream().streams_info()]
    finally:
        await nc.close()


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(measurements: Sequence[Measurement], args: argparse.Namespace) -> dict[str, Any]:
    """Medians per variant, ratios against raw, paired per-round ratios and the targets."""
    per_variant: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        runs = [m for m in measurements if m.variant == variant]
        settled = [m.settled_s for m in runs if m.settled_s is not None]
        per_variant[variant] = {
            "runs": len(runs),
            "wall_s": _median([m.wall_s for m in runs]),
            "events_per_s": _median([m.events_per_s for m in runs]),
            "client_cpu_s": _median([m.client_cpu_s for m in runs]),
            "client_cpu_us_per_event": 1e6 * _median([m.client_cpu_s for m in runs]) / (STEPS * args.vms),
            "client_peak_rss_mib": _median([m.client_peak_rss_mib for m in runs]),
            "client_peak_rss_mib_max": max((m.client_peak_rss_mib for m in runs), default=0.0),
            "client_ru_maxrss_mib": _median([m.client_ru_maxrss_mib for m in runs]),
            "server_peak_rss_mib": _median([m.server_peak_rss_mib for m in runs]),
            "settled_s": _median(settled) if settled else None,
            "settled_events_per_s": (STEPS * args.vms / _median(settled) if settled else None),
        }
    raw_rate = per_variant.get(RAW, {}).get("events_per_s")
    raw_cpu = per_variant.get(RAW, {}).get("client_cpu_s")
    for variant, row in per_variant.items():
        row["ratio_vs_raw"] = row["events_per_s"] / raw_rate if raw_rate else None
        # raw CPU per event / this variant's: the wall ratio to expect if both were CPU-bound
        row["cpu_ratio_vs_raw"] = raw_cpu / row["client_cpu_s"] if raw_cpu else None
        paired = [
            m.events_per_s / r.events_per_s
            for m in measurements
            if m.variant == variant
            for r in measurements
            if r.variant == RAW and r.round == m.round
        ]
        row["paired_ratios"] = paired
    targets = {
        variant: {
            "ratio_ge_0_5": (row["ratio_vs_raw"] or 0) >= 0.5,
            "client_rss_lt_300_mib": row["client_peak_rss_mib_max"] < 300,
        }
        for variant, row in per_variant.items()
        if variant != RAW
    }
    return {"variants": per_variant, "targets": targets}


def format_table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """A readable table of the medians."""
    handled = STEPS * args.vms
    lines = [
        f"vmferry backbone: {args.vms} VMs x {STEPS} no-op steps = {handled} handled events;"
        f" window {args.concurrency}, fetch timeout {args.fetch_timeout}s;"
        f" medians of {args.runs} interleaved rounds (+{args.warmup} warm-up)",
        "",
        f"{'variant':<22}{'wall s':>8}{'CPU s':>7}{'events/s':>10}{'vs raw':>8}{'paired':>12}{'by CPU':>8}"
        f"{'client RSS MiB':>16}{'server RSS MiB':>16}",
    ]
    for variant, row in summary["variants"].items():
        paired = row["paired_ratios"]
        spread = f"{min(paired):.2f}-{max(paired):.2f}" if paired and variant != RAW else ""
        ratio = f"{row['ratio_vs_raw']:.2f}x" if row["ratio_vs_raw"] is not None else "-"
        by_cpu = f"{row['cpu_ratio_vs_raw']:.2f}x" if row["cpu_ratio_vs_raw"] is not None else "-"
        lines.append(
            f"{LABELS[variant]:<22}{row['wall_s']:>8.2f}{row['client_cpu_s']:>7.2f}"
            f"{row['events_per_s']:>10.0f}{ratio:>8}{spread:>12}{by_cpu:>8}"
            f"{row['client_peak_rss_mib']:>16.1f}{row['server_peak_rss_mib']:>16.1f}"
        )
        if row["settled_s"] is not None:
            lines.append(
                f"{'  KV state settled':<22}{row['settled_s']:>8.2f}{'':>7}"
                f"{row['settled_events_per_s']:>10.0f}   (tracker caught up with every event)"
            )
    if args.profile:
        lines.append(f"PROFILED with {args.profile}: these figures are distorted, do not compare them")
    lines.append("")
    for variant, checks in summary["targets"].items():
        verdict = ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks.items())
        lines.append(f"target {LABELS[variant]}: {verdict}")
    return "\n".join(lines)


def environment(server_binary: Path) -> dict[str, Any]:
    """What the figures depend on."""
    version = subprocess.run([str(server_binary), "--version"], capture_output=True, text=True, check=False)
    return {
        "python": platform.python_version(),
        "nats_py": metadata.version("nats-py"),
        "nats_server": version.stdout.strip(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "platform": platform.platform(),
    }


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_benchmark(args: argparse.Namespace) -> int:
    """Start the server, run the interleaved rounds, print and store the results."""
    env = environment(find_binary())
    # SIGTERM must unwind through `finally` too: the server runs in its own session and would outlive us
    signal.signal(signal.SIGTERM, _exit_on_signal)
    data_dir = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    server = EmbeddedNats(data_dir)
    url = server.start()
    measurements: list[Measurement] = []
    try:
        for round_no in range(-args.warmup, args.runs):
            shift = round_no % len(args.variants)
            for variant in [*args.variants[shift:], *args.variants[:shift]]:
                options = ChildOptions(
                    variant, url, "b" + uuid.uuid4().hex[:10], args.vms, args.concurrency, args.fetch_timeout
                )
                measurement = run_child(options, round_no, server.pid, args.profile)
                asyncio.run(delete_streams(url, options.prefix))
                print(
                    f"round {round_no:>2} {LABELS[variant]:<22} {measurement.wall_s:7.2f}s"
                    f" {measurement.events_per_s:8.0f} ev/s"
                    f" client {measurement.client_peak_rss_mib:6.1f} MiB",
                    file=sys.stderr,
                )
                if round_no >= 0:
                    measurements.append(measurement)
        env["streams_left_after_cleanup"] = asyncio.run(remaining_streams(url))
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    summary = summarise(measurements, args)
    report = {
        "benchmark": "chain",
        "at": datetime.now(UTC).isoformat(),
        "settings": {
            "vms": args.vms,
            "steps": STEPS,
            "runs": args.runs,
            "warmup": args.warmup,
            "window": args.concurrency,
            "fetch_timeout_s": args.fetch_timeout,
            "variants": list(args.variants),
            "profiler": args.profile,
            "rss": "per child process (psutil tree sampling every 10 ms, plus ru_maxrss)",
        },
        "environment": env,
        "summary": summary,
        "measurements": [asdict(m) for m in measurements],
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"chain-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(summary, args))
        print(f"\nresults: {path}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--vms", type=int, default=1000, help="VMs pushed through the chain (1000)")
    parser.add_argument("--runs", type=int, default=3, help="measured rounds per variant (3)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds first (1)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="vmferry per-function concurrency = raw fetch batch and publish window (100)",
    )
    parser.add_argument(
        "--fetch-timeout",
        type=float,
        default=1.0,
        help="pull fetch timeout in seconds for both sides (1.0, the Runtime default)",
    )
    parser.add_argument(
        "--variants",
        type=lambda text: tuple(text.split(",")),
        default=VARIANTS,
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--profile",
        choices=("py-spy", "cprofile"),
        help="profile every child into bench/results/profiles/ (figures are then distorted)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if args.vms < 1 or args.runs < 1 or args.concurrency < 1:
        parser.error("--vms, --runs and --concurrency must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for both the parent and the child processes."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        options = ChildOptions(
            args.child, args.url, args.prefix, args.vms, args.concurrency, args.fetch_timeout
        )
        print(json.dumps(asyncio.run(child_main(options))))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
