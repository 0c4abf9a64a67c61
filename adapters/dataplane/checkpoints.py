"""Durable progress of one disk copy, so a crashed or cancelled transfer resumes instead of restarting.

The engine saves a checkpoint only for extents whose data it has already forced to stable storage
(fdatasync or NBD flush), through an injected ``CheckpointSink``; a JSON file sink is provided here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from vmferry.adapters.dataplane.extents import RangeSet

CopyKind = Literal["full", "cbt"]


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """What a transfer has durably copied so far.

    ``plan`` fingerprints the work (the validated extent list of a CBT pass, or the disk size of a full
    copy) so a checkpoint is never applied to a different pass. ``done`` holds merged ``[start, end)``
    byte ranges that are complete on the destination, including skipped zero ranges.
    """

    version: int = 1
    job: str
    kind: CopyKind
    disk_size: int
    plan: str
    done: list[tuple[int, int]]
    bytes_done: int
    complete: bool = False

    def done_ranges(self) -> RangeSet:
        """``done`` as a range set."""
        return RangeSet(self.done)


class CheckpointSink(Protocol):
    """Where checkpoints of one transfer are kept (a file, a KV entry, ...)."""

    def load(self) -> Checkpoint | None:
        """The last saved checkpoint, or None if there is none."""
        ...

    def save(self, checkpoint: Checkpoint) -> None:
        """Replace the stored checkpoint; must be durable when it returns."""
        ...

    def clear(self) -> None:
        """Forget the checkpoint (after the pass is complete and recorded elsewhere)."""
        ...


class JsonFileCheckpointSink:
    """A checkpoint kept as a JSON file, replaced atomically (temp file, fsync, rename, fsync folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Checkpoint | None:
        """Read the file; None when it does not exist."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return msgspec.json.decode(data, type=Checkpoint)

    def save(self, checkpoint: Checkpoint) -> None:
        """Write atomically and durably."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(msgspec.json.encode(checkpoint))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_folder(folder)

    def clear(self) -> None:
        """Delete the file."""
        self.path.unlink(missing_ok=True)
        _fsync_folder(self.path.parent)


class MemoryCheckpointSink:
    """A checkpoint held in memory (for callers that persist elsewhere, and for tests)."""

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = checkpoint
        self.saves = 0

    def load(self) -> Checkpoint | None:
        """The held checkpoint."""
        return self.checkpoint

    def save(self, checkpoint: Checkpoint) -> None:
        """Hold ``checkpoint``."""
        self.checkpoint = checkpoint
        self.saves += 1

    def clear(self) -> None:
        """Drop the held checkpoint."""
        self.checkpoint = None


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
