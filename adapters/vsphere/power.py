"""Power control for cutover: graceful guest shutdown with a timeout, then a hard power-off; power on.

The graceful path is always tried on a powered-on VM (a stale tools status must not force a hard
stop); vSphere refuses it at once when VMware Tools cannot do it, and the hard power-off follows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from pyVmomi import vim, vmodl

from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.faults import fault_text, translate_error
from vmferry.bus.errors import PermanentError

log = logging.getLogger(__name__)

StopMethod = Literal["already-off", "guest-shutdown", "power-off"]
#: faults that mean "the guest cannot shut itself down now": fall back to a hard power-off
_NO_GRACEFUL = (vim.fault.ToolsUnavailable, vim.fault.InvalidState, vmodl.fault.NotSupported)


@dataclass(frozen=True)
class StopResult:
    """How the VM was stopped and how long it took."""

    method: StopMethod
    seconds: float
    note: str = ""


def power_state(client: VsphereClient, vm_moref: str) -> str:
    """``poweredOn``, ``poweredOff`` or ``suspended``."""
    vm = client.bind(vim.VirtualMachine, vm_moref)
    return str(
        client.read(vm, ["runtime.powerState"], f"reading the power state of {vm_moref}").get(
            "runtime.powerState", ""
        )
    )


def _wait_off(client: VsphereClient, vm_moref: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if power_state(client, vm_moref) == "poweredOff":
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 5.0)


def _ask_guest(client: VsphereClient, vm_moref: str) -> str:
    """Ask the guest to shut down; "" if asked, else why it could not be asked."""
    vm = client.bind(vim.VirtualMachine, vm_moref)
    try:
        vm.ShutdownGuest()
    except _NO_GRACEFUL as fault:
        return f"guest shutdown refused ({fault_text(fault)})"
    except Exception as exc:
        raise translate_error(exc, f"asking the guest of {vm_moref} to shut down", client.where) from exc
    return ""


def _hard_off(client: VsphereClient, vm_moref: str, timeout: float) -> None:
    vm = client.bind(vim.VirtualMachine, vm_moref)
    try:
        client.run_task(f"powering off {vm_moref}", vm.PowerOffVM_Task, timeout)
    except PermanentError as error:
        # it may have gone down on its own meanwhile
        if "InvalidPowerState" not in error.cause or power_state(client, vm_moref) != "poweredOff":
            raise


def stop_vm(
    client: VsphereClient, vm_moref: str, shutdown_timeout: float, power_off_timeout: float = 600.0
) -> StopResult:
    """Stop a VM for cutover: guest shutdown, waiting up to ``shutdown_timeout`` s, then power-off."""
    started = time.monotonic()
    state = power_state(client, vm_moref)
    if state == "poweredOff":
        return StopResult("already-off", 0.0)
    note = ""
    if state == "poweredOn" and shutdown_timeout > 0:
        note = _ask_guest(client, vm_moref)
        if not note and _wait_off(client, vm_moref, shutdown_timeout):
            return StopResult("guest-shutdown", time.monotonic() - started)
        note = note or f"the guest did not stop within {shutdown_timeout:.0f} s"
    elif state == "suspended":
        note = "the VM was suspended"
    log.warning("%s: %s; powering it off", vm_moref, note or "no graceful shutdown wanted")
    _hard_off(client, vm_moref, power_off_timeout)
    return StopResult("power-off", time.monotonic() - started, note)


def start_vm(client: VsphereClient, vm_moref: str, timeout: float = 600.0) -> bool:
    """Power a VM on; False if it already was on."""
    if power_state(client, vm_moref) == "poweredOn":
        return False
    vm = client.bind(vim.VirtualMachine, vm_moref)
    client.run_task(f"powering on {vm_moref}", lambda: vm.PowerOnVM_Task(None), timeout)
    return True
