"""Names of subjects, streams, the KV bucket and consumers, all derived from one prefix."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.schemas.base import EventPayload


@dataclass(frozen=True)
class Naming:
    """Every name the runtime uses on the server; one prefix keeps installations apart.

    Subjects put the VM key before the event name: ``<prefix>.<vm-key>.<event>``, so that
    ``<prefix>.*.<event>`` feeds a function and ``<prefix>.<vm-key>.>`` is one VM's history.
    """

    prefix: str = "ferry"

    @property
    def stream(self) -> str:
        """The event stream (audit log and replay source)."""
        return self.prefix.upper().replace("-", "_")

    @property
    def dlq_stream(self) -> str:
        """The dead-letter stream: copies of messages that could not be processed."""
        return f"{self.stream}_DLQ"

    @property
    def advisory_stream(self) -> str:
        """Captures the server's max-deliveries advisories so none is lost while no runner is up."""
        return f"{self.stream}_ADVISORIES"

    @property
    def state_bucket(self) -> str:
        """The per-VM state KV bucket."""
        return f"{self.prefix.replace('-', '_')}_state"

    @property
    def checkpoint_bucket(self) -> str:
        """The KV bucket of copy checkpoints (which extents of a disk pass are durably written)."""
        return f"{self.prefix.replace('-', '_')}_checkpoints"

    @property
    def log_bucket(self) -> str:
        """The object store keeping full logs of long steps (conversion), linked from events."""
        return f"{self.prefix.replace('-', '_')}_logs"

    @property
    def events_wildcard(self) -> str:
        """All events of all VMs."""
        return f"{self.prefix}.>"

    @property
    def dlq_wildcard(self) -> str:
        """All dead letters."""
        return f"{self.prefix}-dlq.>"

    @property
    def advisory_subject(self) -> str:
        """The server's advisory for messages that exhausted their deliveries on our stream."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.*"

    def subject(self, vm_key: str, payload_type: type[EventPayload]) -> str:
        """Subject of one event of one VM."""
        return f"{self.prefix}.{vm_key}.{payload_type.spec.subject_event}"

    def consumer_filter(self, payload_type: type[EventPayload]) -> str:
        """Filter that feeds a function every VM's events of one type."""
        return f"{self.prefix}.*.{payload_type.spec.subject_event}"

    def vm_history(self, vm_key: str) -> str:
        """Filter of one VM's whole history."""
        return f"{self.prefix}.{vm_key}.>"

    def dlq_subject(self, consumer: str, original_subject: str) -> str:
        """Where a dead letter of ``consumer`` for ``original_subject`` is filed."""
        tail = original_subject.removeprefix(f"{self.prefix}.")
        return f"{self.prefix}-dlq.{consumer}.{tail}"

    def durable(self, function_name: str) -> str:
        """Durable consumer name of a function."""
        return f"{self.stream}_{function_name}".replace("-", "_")

    def vm_key_of(self, subject: str) -> str | None:
        """Extract the VM key from an event subject, or None when it is not one of ours."""
        parts = subject.split(".")
        if len(parts) < 3 or parts[0] != self.prefix:
            return None
        return parts[1]
