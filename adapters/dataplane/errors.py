"""Errors of the disk data plane; each names what failed, where, and what a human can do about it."""

from __future__ import annotations

from vmferry.bus.errors import PermanentError, RetryableError


class LibnbdUnavailableError(PermanentError):
    """Debian's python3-libnbd binding cannot be imported from this Python."""


class SourceStartError(PermanentError):
    """An nbdkit (or qemu-nbd) source server did not start or did not become ready."""


class ExtentError(PermanentError):
    """A list of changed extents is unusable (outside the disk, overlapping, negative, empty)."""


class DestinationError(PermanentError):
    """The destination cannot take the copy (too small, not writable, wrong kind)."""


class CheckpointMismatchError(PermanentError):
    """A stored checkpoint belongs to another transfer (other disk size, kind or extent list)."""


class VerificationError(PermanentError):
    """Source and destination differ after a copy; ``offset`` is the first differing extent."""

    def __init__(self, cause: str, fix: str, offset: int) -> None:
        super().__init__(cause, fix)
        self.offset = offset


class TransferError(RetryableError):
    """A copy failed for good after its retries; resuming from the checkpoint repeats little."""

    def __init__(self, cause: str, fix: str, offset: int | None = None, length: int | None = None) -> None:
        super().__init__(cause, fix)
        self.offset = offset
        self.length = length


class TransferCancelledError(RetryableError):
    """The copy was stopped on request; completed extents are checkpointed."""
