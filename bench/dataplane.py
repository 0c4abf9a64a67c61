"""Benchmark of the disk data plane: vmferry's copy engine against nbdcopy (and cp as the physical limit),
from the same persistent nbdkit sources onto files under /tmp, all in one run so ratios are comparable.

Scenarios (methods interleaved round-robin, >= 3 runs each, medians reported):
  dense   4 GiB random data: engine vs nbdcopy vs cp (throughput)
  sparse  4 GiB, ~10 % data in 1 MiB runs, holes elsewhere: bytes written <= data + 1 %, time <= 1.1x nbdcopy
  thick   the same content fully allocated (zero detection): same targets
  cbt     1,000 random 64 KiB changed extents with verification: <= 10 % of the full copy; with 5 ms
          read latency (nbdkit delay filter) <= 20 %
  resume  engine killed once half the disk is written, then resumed: resume copies <= 60 %
  memory  engine peak RSS <= 256 MiB
Every copy ends durable (engine: fdatasync; nbdcopy --flush; cp + fsync) inside the timed region.

Usage: .venv/bin/python bench/dataplane.py [--size-gib 4] [--runs 3] [--json results.json]
Needs scripts/setup-dataplane. Files live in a private folder under /tmp and are deleted at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.adapters.dataplane import (
    CopyEngine,
    FileDestination,
    JsonFileCheckpointSink,
    LocalSource,
    NbdkitFilter,
    NbdkitServer,
)

GiB = 1 << 30
MiB = 1 << 20


# ---- child mode: one engine copy in its own process (so its RSS and CPU are measured alone) -----------


def child_main(argv: list[str]) -> None:
    mode, uri, destination = argv[0], argv[1], Path(argv[2])
    options = dict(item.split("=", 1) for item in argv[3:])
    target = FileDestination(destination, reads_as_zero=options.get("zero", "1") == "1")
    sink = JsonFileCheckpointSink(Path(options["checkpoint"])) if "checkpoint" in options else None
    engine = CopyEngine()
    if mode == "full":
        result = engine.full_copy(uri, target, job="bench", checkpoint=sink)
    else:
        extents = json.loads(Path(options["extents"]).read_text())
        result = engine.copy_changed(uri, target, extents, job="bench", checkpoint=sink)  # always verifies
    print(
        json.dumps(
            {
                "bytes_read": result.bytes_read,
                "bytes_written": result.bytes_written,
                "bytes_resumed": result.bytes_resumed,
                "seconds": result.seconds,
                "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


# ---- measuring ---------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # the copy: nbdcopy/cp process wall time; the engine's own time, connect to flush
    cpu: float  # client CPU seconds (user + system), the source nbdkit not included
    allocated: int  # destination bytes on disk afterwards
    info: dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0  # process wall time (for the engine: includes starting Python and imports)

    @property
    def max_rss(self) -> int:
        """Peak RSS the engine child measured itself (0 for other tools)."""
        return int(self.info.get("max_rss", 0))


def run_process(argv: list[str]) -> tuple[float, float, str]:
    """Run a command; return its wall seconds, its own CPU seconds, and its stdout."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert process.stdout is not None
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    if process.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed with status {process.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime, output


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fresh_file(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size)


def engine_argv(mode: str, uri: str, destination: Path, **options: str) -> list[str]:
    return [sys.executable, __file__, "--child", mode, uri, str(destination)] + [
        f"{key}={value}" for key, value in options.items()
    ]


def run_engine(uri: str, destination: Path, size: int) -> Run:
    fresh_file(destination, size)
    wall, cpu, output = run_process(engine_argv("full", uri, destination))
    info = json.loads(output)
    run = Run(info["seconds"], cpu, allocated(destination), info, wall)
    destination.unlink()
    return run


def run_nbdcopy(uri: str, destination: Path, size: int) -> Run:
    fresh_file(destination, size)
    seconds, cpu, _ = run_process(["nbdcopy", "--destination-is-zero", "--flush", uri, str(destination)])
    run = Run(seconds, cpu, allocated(destination), wall=seconds)
    destination.unlink()
    return run


def run_cp(source: Path, destination: Path) -> Run:
    destination.unlink(missing_ok=True)
    started = time.monotonic()
    _, cpu, _ = run_process(["cp", "--sparse=auto", str(source), str(destination)])
    fsync(destination)
    seconds = time.monotonic() - started
    run = Run(seconds, cpu, allocated(destination), wall=seconds)
    destination.unlink()
    return run


def interleave(methods: dict[str, Callable[[], Run]], runs: int) -> dict[str, list[Run]]:
    results: dict[str, list[Run]] = {name: [] for name in methods}
    for round_number in range(runs):
        for name, method in methods.items():
            result = method()
            results[name].append(result)
            print(f"    round {round_number + 1} {name:>8}: {result.seconds:6.2f} s", flush=True)
    return results


def median(runs: list[Run], key: Callable[[Run], float] = lambda run: run.seconds) -> float:
    return statistics.median(key(run) for run in runs)


def spread(runs: list[Run]) -> str:
    values = [run.seconds for run in runs]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


# ---- preparing data ----------------------------------------------------------------------------------


def make_sources(folder: Path, size: int) -> dict[str, Path]:
    random_image = folder / "src-random.img"
    with random_image.open("wb") as handle:
        remaining = size
        while remaining:
            chunk = min(64 * MiB, remaining)
            handle.write(os.urandom(chunk))
            remaining -= chunk
    sparse_image = folder / "src-sparse.img"
    subprocess.run(
        ["nbdkit", "-U", "-", "sparse-random", f"size={size}", "seed=42", "runlength=1048576",
         "random-content=true", "--run", f'nbdcopy "$uri" {sparse_image}'],
        check=True,
    )  # fmt: skip
    thick_image = folder / "src-thick.img"
    subprocess.run(["cp", "--sparse=never", str(sparse_image), str(thick_image)], check=True)
    return {"random": random_image, "sparse": sparse_image, "thick": thick_image}


def make_cbt(folder: Path, base: Path, size: int, count: int) -> tuple[Path, Path, Path]:
    """v2 = base with ``count`` random 64 KiB extents rewritten; replica = base (the previous pass)."""
    generator = random.Random(1000)
    slots = sorted(generator.sample(range(size // 65536), count))
    v2 = folder / "cbt-v2.img"
    replica = folder / "cbt-replica.img"
    shutil.copyfile(base, v2)
    shutil.copyfile(base, replica)
    with v2.open("r+b") as handle:
        for slot in slots:
            handle.seek(slot * 65536)
            handle.write(generator.randbytes(65536))
    extents = folder / "changed.json"
    extents.write_text(json.dumps([[slot * 65536, 65536] for slot in slots]))
    fsync(v2)
    fsync(replica)
    return v2, replica, extents


# ---- the benchmark -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--extents", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    if arguments.runs < 3:
        parser.error("use at least 3 runs")
    size = int(arguments.size_gib * GiB) // MiB * MiB
    folder = Path(tempfile.mkdtemp(prefix="vmferry-bench-", dir="/tmp"))
    servers: list[NbdkitServer] = []
    figures: dict[str, Any] = {"size": size, "runs": arguments.runs}
    checks: list[tuple[str, float, float, bool]] = []  # name, value, limit, ok
    try:
        print(f"preparing {size / GiB:.1f} GiB images in {folder} ...", flush=True)
        sources = make_sources(folder, size)
        data = allocated(sources["sparse"])

        def serve(path: Path, *filters: NbdkitFilter) -> str:
            server = NbdkitServer(LocalSource(path, format="raw").nbdkit_command().with_filters(*filters))
            servers.append(server.start())
            return server.uri

        uris = {shape: serve(path) for shape, path in sources.items()}
        destination = folder / "dst.img"

        print("dense (random data):", flush=True)
        dense = interleave(
            {
                "cp": lambda: run_cp(sources["random"], destination),
                "nbdcopy": lambda: run_nbdcopy(uris["random"], destination, size),
                "engine": lambda: run_engine(uris["random"], destination, size),
            },
            arguments.runs,
        )
        full_time = median(dense["engine"])
        figures["dense"] = {name: [run.__dict__ for run in runs] for name, runs in dense.items()}

        shaped: dict[str, dict[str, list[Run]]] = {}
        for shape in ("sparse", "thick"):
            print(f"{shape}:", flush=True)
            shaped[shape] = interleave(
                {
                    "nbdcopy": functools.partial(run_nbdcopy, uris[shape], destination, size),
                    "engine": functools.partial(run_engine, uris[shape], destination, size),
                },
                arguments.runs,
            )
            figures[shape] = {name: [run.__dict__ for run in runs] for name, runs in shaped[shape].items()}
            written = max(run.allocated for run in shaped[shape]["engine"])
            checks.append(
                (f"{shape}: engine bytes on disk / data", written / data, 1.01, written <= data * 1.01)
            )
            ratio = median(shaped[shape]["engine"]) / median(shaped[shape]["nbdcopy"])
            checks.append((f"{shape}: engine time / nbdcopy time", ratio, 1.10, ratio <= 1.10))

        print("cbt:", flush=True)
        v2, replica, extents = make_cbt(folder, sources["random"], size, arguments.extents)
        cbt_uri = serve(v2)
        cbt_slow_uri = serve(v2, NbdkitFilter("delay", (("delay-read", "5ms"),)))

        def cbt(uri: str) -> Run:
            wall, cpu, output = run_process(engine_argv("cbt", uri, replica, zero="0", extents=str(extents)))
            info = json.loads(output)
            return Run(info["seconds"], cpu, 0, info, wall)

        passes = interleave(
            {"cbt": lambda: cbt(cbt_uri), "cbt+5ms": lambda: cbt(cbt_slow_uri)}, arguments.runs
        )
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", cbt_uri, str(replica)], check=False
        )
        figures["cbt"] = {name: [run.__dict__ for run in runs] for name, runs in passes.items()}
        figures["cbt_identical"] = compare.returncode == 0
        for name, limit in (("cbt", 0.10), ("cbt+5ms", 0.20)):
            ratio = median(passes[name]) / full_time
            checks.append((f"{name}: pass with verification / full copy", ratio, limit, ratio <= limit))
        identical = compare.returncode == 0
        checks.append(("cbt: replica identical to v2 (qemu-img compare)", float(identical), 1, identical))
        for path in (v2, replica):
            path.unlink()

        print("kill at ~50 % and resume:", flush=True)
        resumes: list[Run] = []
        for round_number in range(arguments.runs):
            checkpoint = folder / "checkpoint.json"
            checkpoint.unlink(missing_ok=True)
            fresh_file(destination, size)
            # nbdkit 1.32 may abort when a client dies with replies in flight: each round gets its own
            # server, and the resume starts a new one (as a restarted transfer function would).
            victim_uri = serve(sources["random"])
            argv = engine_argv("full", victim_uri, destination, checkpoint=str(checkpoint))
            victim = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            # "half done" as the disk sees it: random data allocates exactly what has been written
            while victim.poll() is None and allocated(destination) < size // 2:
                time.sleep(0.005)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            at_kill = allocated(destination) / size
            argv = engine_argv("full", serve(sources["random"]), destination, checkpoint=str(checkpoint))
            wall, cpu, output = run_process(argv)
            info = json.loads(output)
            run = Run(info["seconds"], cpu, allocated(destination), info, wall)
            seconds = run.seconds
            same = subprocess.run(["cmp", "-s", str(sources["random"]), str(destination)], check=False)
            run.info["identical"] = same.returncode == 0
            resumes.append(run)
            read, resumed = run.info["bytes_read"] / size, run.info["bytes_resumed"] / size
            run.info["written_at_kill"] = at_kill
            print(
                f"    round {round_number + 1}   resume: {seconds:6.2f} s, read {read:.0%} "
                f"(killed with {at_kill:.0%} written, {resumed:.0%} checkpointed), "
                f"identical={run.info['identical']}",
                flush=True,
            )
            destination.unlink()
        figures["resume"] = [run.__dict__ for run in resumes]
        resume_bytes = statistics.median(run.info["bytes_read"] for run in resumes) / size
        resume_time = median(resumes) / full_time
        checks.append(
            ("resume: bytes copied after the kill / disk", resume_bytes, 0.60, resume_bytes <= 0.60)
        )
        checks.append(("resume: resume time / full copy time", resume_time, 0.60, resume_time <= 0.60))
        all_identical = all(run.info["identical"] for run in resumes)
        checks.append(("resume: results identical to the source", float(all_identical), 1, all_identical))

        engine_runs = dense["engine"] + shaped["sparse"]["engine"] + shaped["thick"]["engine"] + resumes
        peak = max(run.max_rss for run in engine_runs + passes["cbt"] + passes["cbt+5ms"])
        checks.append(("engine peak RSS, MiB", peak / MiB, 256, peak <= 256 * MiB))

        print_report(size, data, dense, shaped, passes, full_time, checks)
        figures["checks"] = [
            {"name": name, "value": value, "limit": limit, "ok": ok} for name, value, limit, ok in checks
        ]
        if arguments.json:
            arguments.json.write_text(json.dumps(figures, indent=2, default=str))
        return 0 if all(ok for *_, ok in checks) else 1
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _rss(runs: list[Run]) -> str:
    peak = max(run.max_rss for run in runs)
    return f"{peak / MiB:.0f}" if peak else "-"


def print_report(
    size: int,
    data: int,
    dense: dict[str, list[Run]],
    shaped: dict[str, dict[str, list[Run]]],
    passes: dict[str, list[Run]],
    full_time: float,
    checks: list[tuple[str, float, float, bool]],
) -> None:
    print()
    print(f"disk {size / GiB:.1f} GiB; sparse/thick data {data / MiB:.0f} MiB; seconds = median (min-max)")
    print("engine: 'copy s' is its own time (connect to final flush), 'proc s' adds starting Python")
    print(
        f"{'shape':<7} {'method':<8} {'copy s':<20} {'proc s':>7} {'MB/s virt':>10} {'CPU s':>7} "
        f"{'RSS MiB':>8} {'on disk MiB':>12}"
    )
    for shape, methods in [("dense", dense), ("sparse", shaped["sparse"]), ("thick", shaped["thick"])]:
        for name, runs in methods.items():
            print(
                f"{shape:<7} {name:<8} {spread(runs):<20} {median(runs, lambda run: run.wall):>7.2f} "
                f"{size / median(runs) / 1e6:>10.0f} "
                f"{median(runs, lambda run: run.cpu):>7.2f} {_rss(runs):>8} "
                f"{max(run.allocated for run in runs) / MiB:>12.0f}"
            )
    for name, runs in passes.items():
        process = median(runs, lambda run: run.wall)
        print(f"{name:<16} {spread(runs):<20} {process:>7.2f} (full copy {full_time:.2f} s)")
    engine, nbdcopy, cp = (median(dense[name]) for name in ("engine", "nbdcopy", "cp"))
    print()
    print(
        f"dense throughput: engine/nbdcopy = {nbdcopy / engine:.2f}, engine/cp = {cp / engine:.2f} "
        "(above 1: the engine is faster)"
    )
    for name, value, limit, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3f} (limit {limit})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
