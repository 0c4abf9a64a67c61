"""The per-VM state document kept in the JetStream KV bucket, and the phases a VM moves through."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

Phase = Literal[
    "requested",
    "accepted",
    "discovered",
    "snapshotting",
    "syncing",
    "synced",
    "cutover",
    "converting",
    "converted",
    "launched",
    "completed",
    "failed",
    "replaying",
]

#: Phases after which nothing more happens unless an operator replays.
TERMINAL_PHASES: frozenset[str] = frozenset({"completed", "failed"})


class StepRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The last outcome of one step (function) for this VM."""

    status: Literal["done", "failed"]
    event_id: str
    event_type: str
    stream_seq: int
    at: datetime


class DiskProgress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Copy progress and CBT position of one disk."""

    change_id: str | None = None
    pass_no: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    eta_s: float | None = None
    volume_id: str | None = None


class FailureRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why the VM stopped, and which input `vmferry replay` re-drives."""

    step: str
    cause: str
    fix: str
    retryable: bool
    failed_event_id: str | None
    failed_subject: str | None
    failed_stream_seq: int | None
    at: datetime


class VmState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Everything known about one VM's migration (or one request, for ``req-`` keys)."""

    key: str
    request_id: str = ""
    name: str = ""
    phase: Phase = "requested"
    pass_no: int = 0
    steps: dict[str, StepRecord] = {}
    disks: dict[str, DiskProgress] = {}
    vm_keys: list[str] = []
    failure: FailureRecord | None = None
    replays: int = 0
    last_event_type: str = ""
    last_event_seq: int = 0
    updated_at: datetime | None = None
