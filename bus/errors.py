"""Errors a handler raises to tell the runner what to do: retry later, or give up and report."""

from __future__ import annotations


class FerryError(Exception):
    """An error with a cause a human can act on and, where known, the fix."""

    retryable: bool = False

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cause} (fix: {self.fix})" if self.fix else self.cause


class RetryableError(FerryError):
    """Something transient failed; the runner naks the message with backoff and tries again."""

    retryable = True

    def __init__(self, cause: str, fix: str = "", delay: float | None = None) -> None:
        super().__init__(cause, fix)
        self.delay = delay


class PermanentError(FerryError):
    """Retrying cannot help; the runner terminates the message and emits migration.failed."""


class BusUnavailableError(FerryError):
    """The NATS server cannot be reached or refused the credentials (a one-line CLI error)."""


class NotProvisionedError(FerryError):
    """A stream, bucket or consumer the runtime needs does not exist yet."""
