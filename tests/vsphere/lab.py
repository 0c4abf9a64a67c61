"""Test helpers over the simulated vSphere (vmferry.cli.simlab): requests for the lab source and
the blocks CBT must report for a list of writes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from vmferry.cli.simlab import KIB, MIB, Lab, Nic, VcsimServer, VmSpec, write
from vmferry.schemas.request import MigrationRequest

__all__ = ["KIB", "MIB", "Lab", "Nic", "VcsimServer", "VmSpec", "blocks_of", "request", "write"]


def request(*selectors: dict[str, str], request_id: str = "req-1", **fields: Any) -> MigrationRequest:
    """A MigrationRequest for the lab source with these VM selectors (plus any request fields)."""
    raw = {
        "request_id": request_id,
        "source": {"name": "lab"},
        "destination": {"cloud": "test-cloud"},
        "vms": list(selectors),
    } | fields
    return msgspec.convert(raw, MigrationRequest)


def blocks_of(writes: Iterable[tuple[int, int]], block_size: int) -> list[tuple[int, int]]:
    """The blocks a list of (offset, length) writes touches, merged: what CBT must report."""
    touched = sorted(
        {
            i
            for offset, length in writes
            for i in range(offset // block_size, (offset + length - 1) // block_size + 1)
        }
    )
    merged: list[tuple[int, int]] = []
    for index in touched:
        start = index * block_size
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + block_size)
        else:
            merged.append((start, block_size))
    return merged
