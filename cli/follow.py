"""Following requests and VMs as they move: `migrate --wait` and `status --watch`."""

from __future__ import annotations

import asyncio
import time

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from vmferry.bus.state import StateStore
from vmferry.cli import output
from vmferry.schemas.state import TERMINAL_PHASES, VmState


async def _request_states(store: StateStore, key: str) -> list[VmState]:
    request, _ = await store.get(key)
    if request is None:
        return []
    vms = [st for k in request.vm_keys if (st := (await store.get(k))[0]) is not None]
    return [request, *vms]


def settled(states: list[VmState]) -> bool:
    """A request settles when it failed, or once it has VMs and every VM has finished."""
    if not states:
        return False
    request, vms = states[0], states[1:]
    if request.phase == "failed":
        return True
    return bool(vms) and all(vm.phase in TERMINAL_PHASES for vm in vms)


class _CopyBars:
    """One progress bar per VM: bytes copied of its disks, with the phase as the label."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()
        )
        self._tasks: dict[str, TaskID] = {}

    def update(self, vms: list[VmState]) -> None:
        for vm in vms:
            total = sum(d.bytes_total for d in vm.disks.values())
            done = sum(d.bytes_done for d in vm.disks.values())
            label = f"{vm.name or vm.key} [{vm.phase}]"
            if vm.key not in self._tasks:
                self._tasks[vm.key] = self.progress.add_task(label, total=total or None)
            self.progress.update(self._tasks[vm.key], description=label, total=total or None, completed=done)


async def follow(store: StateStore, key: str, timeout: float, *, quiet: bool = False) -> list[VmState]:
    """Show the request, its VMs and their copy progress until they settle or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    states: list[VmState] = []
    bars = _CopyBars()
    with Live(output.state_table(states), console=output.console, transient=quiet) as live:
        while time.monotonic() < deadline:
            states = await _request_states(store, key)
            bars.update(states[1:])
            live.update(Group(output.state_table(states), bars.progress))
            if settled(states):
                break
            await asyncio.sleep(0.5)
    return states


async def watch_all(store: StateStore, key: str | None) -> None:
    """Redraw the status table on every change until interrupted."""
    current: dict[str, VmState] = {}
    with Live(output.state_table([]), console=output.console) as live:
        async for state in store.watch():
            if key and key not in (state.key, state.name, state.request_id):
                continue
            current[state.key] = state
            live.update(output.state_table(sorted(current.values(), key=lambda s: s.key)))
