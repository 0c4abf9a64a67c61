"""The migration functions: one module per step, each a pure handler with injected dependencies.

``build_registry`` is the explicit list of what exists; the CLI wires dependencies into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.bus.function import Registry
from vmferry.functions import intake


@dataclass(frozen=True)
class Dependencies:
    """What the functions need from the outside world, resolved by the composition root (CLI)."""

    known_sources: frozenset[str] = frozenset()
    known_destinations: frozenset[str] = frozenset()
    concurrency: dict[str, int] = field(default_factory=dict)


def build_registry(deps: Dependencies) -> Registry:
    """Every function of the flow, with its dependencies injected."""
    return Registry(
        [
            intake.definition(
                intake.Intake(deps.known_sources, deps.known_destinations),
                deps.concurrency.get("intake"),
            )
        ]
    )
