"""`vmferry validate` and `vmferry snapshots`: read-only checks and clean-up against a vSphere source.

They talk to vSphere directly (no NATS needed), with the same configuration the functions use.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rich.table import Table

from vmferry.adapters.vsphere.aio import VsphereClients
from vmferry.cli import output
from vmferry.cli.config import Settings
from vmferry.functions.discover import Discover
from vmferry.schemas.request import MigrationRequest


async def validate(settings: Settings, request: MigrationRequest, as_json: bool) -> int:
    """Print the catalogue findings of the selected VMs; 1 when any blocker is found, else 0."""
    clients = VsphereClients.from_sources(settings.sources)
    try:
        inspected = await Discover(clients).inspect(request)
    finally:
        await clients.close()
    rows: list[dict[str, Any]] = [
        {
            "vm": found.vm.identity.name,
            "vm_key": found.vm.vm_key,
            "moref": found.vm.identity.moref,
            "findings": [output.to_plain(f) for f in findings],
        }
        for found, findings in inspected
    ]
    blocked = any(f["severity"] == "blocker" for row in rows for f in row["findings"])
    if as_json:
        output.emit_json(rows)
        return 1 if blocked else 0
    table = Table(title=f"validation of {len(rows)} VM(s) from {request.source.name}")
    for column in ("vm", "moref", "severity", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if not row["findings"]:
            table.add_row(row["vm"], row["moref"], "[green]ok[/]", "", "")
        for finding in row["findings"]:
            severity = "[red]blocker[/]" if finding["severity"] == "blocker" else "[yellow]warning[/]"
            table.add_row(row["vm"], row["moref"], severity, f"{finding['code']}: {finding['message']}",
                          finding["fix"])  # fmt: skip
    output.console.print(table)
    return 1 if blocked else 0


async def snapshots(
    settings: Settings,
    source: str,
    *,
    request_id: str | None,
    older_than_hours: float | None,
    remove: bool,
    as_json: bool,
) -> None:
    """List vmferry snapshots of a source, or remove the stale ones."""
    clients = VsphereClients.from_sources(settings.sources)
    try:
        client = await clients(source)
        if remove:
            older = timedelta(hours=older_than_hours) if older_than_hours is not None else None
            found = await client.sweep(request_id=request_id, older_than=older)
        else:
            found = await client.list_vmferry_snapshots(request_id)
    finally:
        await clients.close()
    rows = [
        {
            "vm": s.vm_name,
            "vm_moref": s.vm_moref,
            "snapshot": s.name,
            "snapshot_moref": s.snapshot_moref,
            "created": s.created.isoformat() if s.created else None,
        }
        for s in found
    ]
    if as_json:
        output.emit_json({"removed" if remove else "found": rows})
        return
    verb = "removed" if remove else "found"
    output.console.print(f"{len(rows)} vmferry snapshot(s) {verb}")
    for row in rows:
        output.console.print(f"  {row['vm']} ({row['vm_moref']}): {row['snapshot']} {row['created'] or ''}")
