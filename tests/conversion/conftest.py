"""Fixtures for the real guest-conversion tests: the toolchain check, the cached test guests (built by
scripts/build-guest-image), and the conversions themselves, started together once per session on worker
threads (the way the convert function will call the adapter) so their minutes of TCG emulation overlap."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_component
from tests.conversion.bootcheck import BootOutcome, boot
from vmferry.adapters.conversion import (
    BlockDriver,
    ConversionOptions,
    ConversionResult,
    Converter,
    FileLedger,
    GuestSpec,
    HostConfig,
    Progress,
    SourceDisk,
    SourceNic,
    choose_accelerator,
)

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("VMFERRY_CACHE", Path.home() / ".cache" / "vmferry"))
HOW = "run scripts/setup-conversion as root (Debian: virt-v2v, libguestfs-tools, qemu-system-x86, a kernel)"
TOOLS = (
    "virt-v2v-in-place", "virt-v2v-inspector", "virt-customize", "qemu-system-x86_64",
    "debugfs", "sfdisk", "lsinitramfs",
)  # fmt: skip
FIRSTBOOT_MARK = "vmferry-firstboot"
FIRSTBOOT = f"""#!/bin/sh
# A user firstboot script: once the network is configured, report it. guestfs-firstboot copies its
# scripts' output to the console (writing to /dev/ttyS0 directly races with the serial getty's hangup).
for attempt in $(seq 1 90); do
  ip -o -4 addr show scope global | grep -q . && break
  sleep 1
done
echo "{FIRSTBOOT_MARK}: begin"
ip -o -4 addr show scope global 2>&1
echo "{FIRSTBOOT_MARK}: end"
"""


# Wall time and memory of each background job, printed at the end of the run (CI budget tracking).
SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY:
        terminalreporter.section("guest conversion timings")
        for line in SUMMARY:
            terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "guest_conversion: converts and boots real guest images (minutes under TCG emulation)"
    )


@pytest.fixture(scope="session")
def conversion_tools() -> None:
    """The conversion toolchain, or a failure (CI) / skip (locally)."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            missing_component(tool, HOW)
    if not any(os.access(kernel, os.R_OK) for kernel in glob.glob("/boot/vmlinuz-*")):
        missing_component("a readable kernel in /boot (supermin builds the appliance from it)", HOW)


@dataclass(frozen=True)
class GuestImages:
    """The cached test guests and what the recipe put in them."""

    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return Path(self.manifest["images"][name]["path"])


@pytest.fixture(scope="session")
def guest_images(conversion_tools: None) -> GuestImages:
    """Build (or find in the cache) the test guests."""
    script = REPO / "scripts" / "build-guest-image"
    if os.geteuid() != 0:
        done = subprocess.run([str(script)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            missing_component("the cached test guest images", "run scripts/build-guest-image as root once")
    else:
        done = subprocess.run(
            ["nice", "-n", "10", str(script)], capture_output=True, text=True, check=False, timeout=2400
        )
        if done.returncode != 0:
            pytest.fail(f"scripts/build-guest-image failed:\n{done.stderr[-3000:]}")
    paths = dict(line.split("=", 1) for line in done.stdout.split() if "=" in line)
    return GuestImages(json.loads(Path(paths["manifest"]).read_text()))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Timed:
    """A background job with its wall time."""

    future: Future[Any]
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def result(self, timeout: float = 1800) -> Any:
        value = self.future.result(timeout=timeout)
        return value

    def seconds(self) -> float:
        return round((self.finished or time.monotonic()) - self.started, 1)


@dataclass
class Session:
    """Everything the real tests share: the converter, the runs started in the background, and the
    progress each conversion reported."""

    images: GuestImages
    converter: Converter
    root: Path
    source_digest: str
    jobs: dict[str, Timed] = field(default_factory=dict)
    progress: dict[str, list[Progress]] = field(default_factory=dict)

    def options(self, name: str, **overrides: Any) -> ConversionOptions:
        return ConversionOptions(work_dir=self.root / name, timeout_s=1500, **overrides)


def single_guest(images: GuestImages) -> GuestSpec:
    return GuestSpec(
        name="v2vtest-single",
        disks=(SourceDisk(images.path("single"), identity="vm-single/disk-2000"),),
        nics=(SourceNic(images.manifest["mac"]),),  # name looked up in the guest (ifupdown)
    )


def two_disk_guest(images: GuestImages) -> GuestSpec:
    return GuestSpec(
        name="v2vtest-two-disks",
        disks=(SourceDisk(images.path("two-disk-root")), SourceDisk(images.path("two-disk-var"))),
        nics=(SourceNic(images.manifest["mac"], interface=images.manifest["interface"]),),
    )


def no_os_guest(images: GuestImages) -> GuestSpec:
    return GuestSpec(name="data-only", disks=(SourceDisk(images.path("no-os")),))


@pytest.fixture(scope="session")
def real(guest_images: GuestImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """Start every conversion and the negative boot check at once; tests wait for the ones they need."""
    root = tmp_path_factory.mktemp("conversion")
    host = HostConfig(appliance_cache=CACHE / "libguestfs")
    session = Session(
        images=guest_images,
        converter=Converter(host, FileLedger(root / "ledger")),
        root=root,
        source_digest=file_digest(guest_images.path("single")),
    )
    choose_accelerator()  # probe once, before the threads start
    firstboot = root / "report-network.sh"
    firstboot.write_text(FIRSTBOOT)

    def convert(name: str, guest: GuestSpec, options: ConversionOptions) -> Callable[[], ConversionResult]:
        seen = session.progress.setdefault(name, [])
        return lambda: session.converter.convert(guest, options, on_progress=seen.append)

    jobs: dict[str, Callable[[], Any]] = {
        "single": convert("single", single_guest(guest_images),
                          session.options("single", firstboot_scripts=(firstboot,))),
        "two-disk": convert("two-disk", two_disk_guest(guest_images),
                            session.options("two-disk", block_driver=BlockDriver.VIRTIO_SCSI)),
        # one appliance run covers both the negative case and the pre-flight: convert() rehearses the
        # conversion with virt-v2v-inspector first and must stop there, before cloning anything
        "no-os": convert("no-os", no_os_guest(guest_images), session.options("no-os", preflight=True)),
        "source-boot": lambda: boot(
            guest_images.path("single"), root / "boot-source.log", bus="virtio-blk",
            accelerator=choose_accelerator(), timeout_s=420,
        ),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="conversion") as pool:
        for name, job in jobs.items():
            timed = Timed(pool.submit(job))
            timed.future.add_done_callback(
                lambda _, timed=timed: setattr(timed, "finished", time.monotonic())
            )
            session.jobs[name] = timed
        yield session
        for timed in session.jobs.values():
            timed.future.cancel()
    for name, timed in session.jobs.items():
        SUMMARY.append(f"{name}: {timed.seconds()} s{_detail(timed)}")


def _detail(timed: Timed) -> str:
    if not timed.future.done() or timed.future.cancelled() or timed.future.exception() is not None:
        error = timed.future.exception() if timed.future.done() and not timed.future.cancelled() else None
        return f" ({type(error).__name__}: {getattr(error, 'kind', '')})" if error else ""
    value = timed.future.result()
    if isinstance(value, ConversionResult):
        runs = [f"{run.tool} {run.duration_s} s peak {run.peak_rss_kib // 1024} MiB" for run in value.runs]
        return f" ({', '.join(runs)})"
    if isinstance(value, BootOutcome):
        return f" (login={value.reached_login}, {value.failure or 'no failure'}, {value.seconds:.0f} s)"
    return ""


def boot_outcome(job: Timed) -> BootOutcome:
    outcome: BootOutcome = job.result()
    return outcome
