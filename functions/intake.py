"""intake: checks a migration request against this installation's configuration.

It turns ``migration.requested`` (from any producer) into ``migration.accepted``, or into a
permanent failure whose cause says which reference is unknown and what is configured instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.bus.function import Emit, FunctionDef, StepContext
from vmferry.schemas.base import request_key_for
from vmferry.schemas.events import MigrationAccepted, MigrationRequested
from vmferry.schemas.request import MigrationRequest


def _unknown(kind: str, name: str, known: frozenset[str], where: str) -> PermanentError:
    listing = ", ".join(sorted(known)) if known else "none"
    return PermanentError(
        f"the request names {kind} {name!r}, which is not configured (configured: {listing})",
        f"add it under `{where}` in the vmferry configuration of the functions, or fix the request",
    )


@dataclass(frozen=True)
class Intake:
    """The handler; it knows the configured reference names, never their secrets."""

    known_sources: frozenset[str]
    known_destinations: frozenset[str]

    def check(self, request: MigrationRequest) -> list[str]:
        """Raise for blocking problems; return warnings for the rest."""
        if request.source.name not in self.known_sources:
            raise _unknown("source", request.source.name, self.known_sources, "sources")
        if request.destination.cloud not in self.known_destinations:
            raise _unknown("destination", request.destination.cloud, self.known_destinations, "destinations")
        if request.mode == "warm" and not request.options.enable_cbt:
            raise PermanentError(
                "a warm migration copies changed blocks, but options.enable_cbt is false",
                "set options.enable_cbt: true, or use mode: cold",
            )
        warnings: list[str] = []
        selectors = [s.describe() for s in request.vms]
        repeated = sorted({s for s in selectors if selectors.count(s) > 1})
        if repeated:
            warnings.append(f"VM selectors repeated (each VM migrates once): {', '.join(repeated)}")
        if request.mode == "cold" and request.cutover.when != "immediate":
            warnings.append("cutover policy is ignored for cold migrations (the source is stopped first)")
        return warnings

    async def __call__(self, event: CloudEvent[MigrationRequested], context: StepContext) -> Sequence[Emit]:
        """Accept the request or explain why not."""
        request = event.data.request
        expected = request_key_for(request.request_id)
        if event.subject != expected:
            raise PermanentError(
                f"request {request.request_id} arrived under key {event.subject!r}",
                f"publish requests on <prefix>.{expected}.migration.requested",
            )
        warnings = self.check(request)
        return [Emit(expected, MigrationAccepted(request=request, warnings=warnings))]


def definition(handler: Intake, concurrency: int | None = None) -> FunctionDef[MigrationRequested]:
    """How the runner hosts intake."""
    return FunctionDef(
        name="intake",
        consumes=MigrationRequested,
        emits=(MigrationAccepted,),
        handler=handler,
        concurrency=concurrency or 8,
        ack_wait=30.0,
        max_deliver=5,
        description="checks migration requests against the configured sources and destinations",
    )
