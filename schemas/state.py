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


class StepProgress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How far a long step other than a disk copy (e.g. conversion) has come."""

    percent: float = 0.0
    detail: str = ""
    at: datetime | None = None


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


class SyncedDisk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One disk's outcome in a pass."""

    volume_id: str
    change_id: str | None = None
    bytes_copied: int = 0


class PassSync(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which disks finished the current pass; the join that emits ``vm.synced`` keeps it."""

    pass_no: int
    final: bool = False
    disk_count: int
    #: disk key (as text) -> volume id, change id and bytes of that disk's volume.synced
    volumes: dict[str, SyncedDisk] = {}
    #: the disk whose volume.synced completed the pass (only its delivery emits vm.synced)
    completed_by: int | None = None


class SourcePower(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """vmferry powered the source VM off for cutover; kept so a later failure can power it back on."""

    source: str
    instance_uuid: str
    powered_off_at: datetime
    power_on_on_failure: bool = True
    #: the cutover.requested that did it (a second request meanwhile changes nothing)
    cutover_event: str = ""
    #: set when the source was powered on again after a failure
    restored_at: datetime | None = None


class Cancellation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An operator cancelled this VM's migration under one request; later requests are unaffected."""

    request_id: str
    by: str | None = None
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
    #: step name -> progress of long steps that are not disk copies (conversion)
    progress: dict[str, StepProgress] = {}
    vm_keys: list[str] = []
    sync: PassSync | None = None
    #: passes completed for every disk (the next precopy pass is this + 1)
    passes_synced: int = 0
    source_power: SourcePower | None = None
    cancelled: Cancellation | None = None
    failure: FailureRecord | None = None
    replays: int = 0
    last_event_type: str = ""
    last_event_seq: int = 0
    updated_at: datetime | None = None
