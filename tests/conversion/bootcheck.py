"""Headless boot check: start a disk image in qemu (serial console to a file, no display, no network
egress), and wait for a login prompt or a known boot failure. The disk is attached with snapshot=on,
so the check never writes the image."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.adapters.conversion import Accelerator

# "host login: " -- service output may follow on the same line, so no end-of-line anchor.
LOGIN = re.compile(rb"^\S+ login: ", re.MULTILINE)
FAILURES = re.compile(rb"Gave up waiting for root|ALERT! |\(initramfs\)|Kernel panic|end Kernel panic")


@dataclass(frozen=True)
class BootOutcome:
    """How a boot ended: at a login prompt, at a recognised failure, or at the deadline."""

    reached_login: bool
    failure: str | None
    seconds: float
    console: Path
    waited_for: tuple[str, ...] = ()

    def console_text(self) -> str:
        """The serial console output."""
        return self.console.read_text(errors="replace")


def qemu_argv(
    image: Path, disk_format: str, bus: str, console: Path, accelerator: Accelerator, mac: str | None
) -> list[str]:
    """qemu command line for the check. The NIC (if any) hangs off an empty hub: link up, no traffic."""
    argv = [
        "qemu-system-x86_64", "-machine", f"pc,accel={accelerator.value}", "-cpu", "max" if accelerator is
        Accelerator.TCG else "host", "-m", "1024", "-smp", "1", "-display", "none", "-monitor", "none",
        "-serial", f"file:{console}", "-no-reboot", "-nodefaults",
        "-drive", f"file={image},format={disk_format},if=none,id=disk0,snapshot=on",
    ]  # fmt: skip
    if bus == "virtio-blk":
        argv += ["-device", "virtio-blk-pci,drive=disk0"]
    elif bus == "virtio-scsi":
        argv += ["-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0"]
    elif bus == "pvscsi":
        argv += ["-device", "pvscsi,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0"]
    else:
        raise ValueError(f"unknown bus {bus!r}")
    if mac is not None:
        argv += ["-netdev", "hubport,id=net0,hubid=0", "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]
    return argv


def boot(
    image: Path,
    console: Path,
    *,
    bus: str = "virtio-blk",
    disk_format: str = "raw",
    accelerator: Accelerator = Accelerator.TCG,
    mac: str | None = None,
    timeout_s: float = 300.0,
    also_wait_for: tuple[bytes, ...] = (),
) -> BootOutcome:
    """Boot ``image`` until a login prompt (and every ``also_wait_for`` text) or a failure shows on the
    console, or ``timeout_s`` passes; the qemu process is always stopped."""
    console.parent.mkdir(parents=True, exist_ok=True)
    console.write_bytes(b"")
    argv = qemu_argv(image, disk_format, bus, console, accelerator, mac)
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while time.monotonic() - started < timeout_s:
            text = console.read_bytes()
            failure = FAILURES.search(text)
            if failure:
                return BootOutcome(False, failure[0].decode(), time.monotonic() - started, console)
            if LOGIN.search(text) and all(wanted in text for wanted in also_wait_for):
                waited = tuple(wanted.decode() for wanted in also_wait_for)
                return BootOutcome(True, None, time.monotonic() - started, console, waited)
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                return BootOutcome(False, f"qemu exited {process.returncode}: {stderr[-500:]}", 0.0, console)
            time.sleep(1.0)
        return BootOutcome(False, None, time.monotonic() - started, console)
    finally:
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()
