"""Rendering for humans (rich tables) and machines (``--json``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from vmferry.bus.history import Recorded
from vmferry.bus.publisher import function_of
from vmferry.schemas.state import VmState

console = Console()
errors = Console(stderr=True)


def to_plain(value: Any) -> Any:
    """A contract value as plain JSON-compatible data."""
    return msgspec.to_builtins(value)


def emit_json(value: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(msgspec.json.encode(msgspec.to_builtins(value)).decode() + "\n")


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60}m ago" if seconds < 7200 else f"{seconds // 3600}h ago"


def _progress(state: VmState) -> str:
    done = sum(d.bytes_done for d in state.disks.values())
    total = sum(d.bytes_total for d in state.disks.values())
    return f"{100 * done / total:.0f}%" if total else "-"


def state_table(states: Sequence[VmState]) -> Table:
    """One row per VM or request."""
    table = Table(title="vmferry status", expand=False)
    for column in ("key", "name", "phase", "pass", "copied", "last step", "updated", "problem"):
        table.add_column(column, overflow="fold")
    for state in states:
        last_step = max(state.steps.items(), key=lambda kv: kv[1].stream_seq, default=None)
        problem = f"{state.failure.step}: {state.failure.cause}" if state.failure else ""
        phase = f"[red]{state.phase}[/]" if state.phase == "failed" else state.phase
        table.add_row(
            state.key,
            state.name or (f"request {state.request_id}" if state.key.startswith("req-") else ""),
            phase,
            str(state.pass_no),
            _progress(state),
            last_step[0] if last_step else "-",
            _ago(state.updated_at),
            problem,
        )
    return table


def state_detail(state: VmState) -> None:
    """A VM's document, readable."""
    console.print(state_table([state]))
    if state.vm_keys:
        console.print(f"VMs of this request: {', '.join(state.vm_keys)}")
    for name, step in sorted(state.steps.items(), key=lambda kv: kv[1].stream_seq):
        console.print(f"  step {name}: {step.status} ({step.event_type}, seq {step.stream_seq})")
    if state.failure:
        console.print(f"[red]failed in {state.failure.step}:[/] {state.failure.cause}")
        if state.failure.fix:
            console.print(f"[yellow]fix:[/] {state.failure.fix}")
        console.print("then re-drive it with: vmferry replay " + state.key)


def history_table(key: str, events: Sequence[Recorded]) -> Table:
    """One row per stored event of a VM."""
    table = Table(title=f"events of {key}")
    for column in ("seq", "time", "type", "from", "id"):
        table.add_column(column, overflow="fold")
    for item in events:
        if item.event is None:
            table.add_row(str(item.seq), "-", f"[red]unreadable: {item.problem}[/]", "-", item.subject)
            continue
        event = item.event
        table.add_row(
            str(item.seq),
            event.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            event.type,
            function_of(event.source),
            event.id,
        )
    return table


def history_json(events: Sequence[Recorded]) -> list[dict[str, Any]]:
    """Stored events as plain data."""
    rows: list[dict[str, Any]] = []
    for item in events:
        row: dict[str, Any] = {"seq": item.seq, "subject": item.subject}
        if item.event is None:
            row["problem"] = item.problem
        else:
            row |= {
                "id": item.event.id,
                "type": item.event.type,
                "source": item.event.source,
                "time": item.event.time.isoformat(),
                "data": msgspec.to_builtins(item.event.data),
            }
        rows.append(row)
    return rows
