"""Accelerator choice for the libguestfs appliance and boot checks, and the environment every
libguestfs tool runs with.

``/dev/kvm`` existing proves nothing: on some nested hosts (e.g. a paravirtual ``kvm_pvm`` module) a KVM
guest hangs right after the real-mode kernel setup. So KVM is used only when a short probe boots a
kernel with it far enough to print ``Linux version``; otherwise libguestfs is forced onto TCG.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .model import Accelerator

PROBE_TIMEOUT_S = 10.0  # a working KVM prints the banner in about a second
_probe_result: dict[str, Accelerator] = {}
_probe_lock = threading.Lock()


def newest_kernel(boot: Path = Path("/boot")) -> Path | None:
    """The host kernel image the probe (and supermin) uses, or None."""
    kernels = sorted(glob.glob(str(boot / "vmlinuz-*")), key=os.path.getmtime)
    readable = [Path(kernel) for kernel in kernels if os.access(kernel, os.R_OK)]
    return readable[-1] if readable else None


def kvm_usable(kernel: Path, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Boot ``kernel`` under KVM with no disk; True once it prints its banner within ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="vmferry-kvm-probe-") as scratch:
        console = Path(scratch) / "console.log"
        argv = [
            "qemu-system-x86_64", "-machine", "accel=kvm", "-cpu", "host", "-m", "256", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", f"file:{console}",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
        ]  # fmt: skip
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except OSError:
            return False
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                if console.exists() and b"Linux version" in console.read_bytes():
                    return True
                time.sleep(0.2)
            return console.exists() and b"Linux version" in console.read_bytes()
        finally:
            process.kill()
            process.wait()


def choose_accelerator(override: Accelerator | None = None) -> Accelerator:
    """KVM only if it demonstrably works here; the answer is cached for the process.

    ``override`` (configuration) or ``VMFERRY_ACCEL=kvm|tcg`` skips the probe.
    """
    if override is not None:
        return override
    forced = os.environ.get("VMFERRY_ACCEL", "").strip().lower()
    if forced in {accel.value for accel in Accelerator}:
        return Accelerator(forced)
    with _probe_lock:
        if "host" not in _probe_result:
            _probe_result["host"] = _probe()
        return _probe_result["host"]


def _probe() -> Accelerator:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accelerator.TCG
    kernel = newest_kernel()
    if kernel is None:
        return Accelerator.TCG
    return Accelerator.KVM if kvm_usable(kernel) else Accelerator.TCG


def guestfs_environment(
    accelerator: Accelerator, appliance_cache: Path, scratch: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a libguestfs tool: the direct backend (no libvirtd), TCG when KVM is unusable,
    a stable appliance cache, and a private TMPDIR (killed runs leave scratch files behind there)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIBGUESTFS_")}
    env.update(
        LIBGUESTFS_BACKEND="direct",
        LIBGUESTFS_CACHEDIR=str(appliance_cache),
        TMPDIR=str(scratch),
        LC_ALL="C.UTF-8",  # the failure classifier matches the untranslated messages
    )
    if accelerator is Accelerator.TCG:
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    if extra:
        env.update(extra)
    return env
