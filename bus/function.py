"""How a function is declared: what it consumes and emits, its limits, and the explicit registry.

A handler is ``async (event, context) -> sequence of Emit``; its dependencies are injected into the
handler object by whoever builds the registry, so handlers never import nats.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from vmferry.bus.cloudevents import CloudEvent
from vmferry.bus.errors import PermanentError
from vmferry.schemas.base import EventPayload

P = TypeVar("P", bound=EventPayload)


@dataclass(frozen=True)
class Emit:
    """An event a handler wants published for a VM.

    ``key`` tells apart several events of one type emitted for one input (e.g. one per disk); it
    goes into the deterministic event id so a redelivered input never publishes duplicates.
    """

    vm_key: str
    data: EventPayload
    key: str = ""


class StepContext(Protocol):
    """What the runner offers a handler besides the event."""

    @property
    def delivery(self) -> int:
        """1 on the first delivery, 2 on the first redelivery, and so on."""
        ...

    @property
    def function(self) -> str:
        """Name of the function handling the event."""
        ...

    async def heartbeat(self) -> None:
        """Tell the server the step is alive now (the runner also does this on a timer)."""
        ...


Handler = Callable[[CloudEvent[P], StepContext], Awaitable[Sequence[Emit]]]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between retries of retryable failures; the last delay repeats."""

    delays: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)

    def delay_for(self, delivery: int) -> float:
        """Delay before the next attempt after the ``delivery``-th one failed."""
        index = min(max(delivery, 1) - 1, len(self.delays) - 1)
        return self.delays[index]


@dataclass(frozen=True)
class FunctionDef(Generic[P]):
    """One function: the event it consumes, what it may emit, and how the runner treats it."""

    name: str
    consumes: type[P]
    emits: tuple[type[EventPayload], ...]
    handler: Handler[P]
    concurrency: int = 4
    ack_wait: float = 30.0
    max_deliver: int = 5
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: seconds between in_progress heartbeats; default a third of ack_wait
    heartbeat_every: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.replace("-", "").isalnum():
            raise ValueError(f"function name {self.name!r} must be letters, digits and '-'")
        if self.max_deliver < 1 or self.concurrency < 1 or self.ack_wait <= 0:
            raise ValueError(f"function {self.name}: max_deliver, concurrency and ack_wait must be > 0")

    def check_emits(self, emits: Sequence[Emit]) -> None:
        """Refuse the whole batch if any event is of a type the function did not declare."""
        for emit in emits:
            if not isinstance(emit.data, self.emits):
                raise PermanentError(
                    f"{self.name} emitted {emit.data.spec.ce_type}, which it does not declare",
                    "add the type to the function's `emits` or fix the handler",
                )

    @property
    def heartbeat_interval(self) -> float:
        """How often the runner signals in_progress while the handler runs."""
        return self.heartbeat_every or max(self.ack_wait / 3, 0.05)


class Registry:
    """The explicit list of functions one process knows; names are unique."""

    def __init__(self, functions: Iterable[FunctionDef[Any]] = ()) -> None:
        self._functions: dict[str, FunctionDef[Any]] = {}
        for function in functions:
            self.register(function)

    def register(self, function: FunctionDef[Any]) -> None:
        """Add a function; a second one with the same name is a programming error."""
        if function.name in self._functions:
            raise ValueError(f"function {function.name!r} is registered twice")
        self._functions[function.name] = function

    def get(self, name: str) -> FunctionDef[Any]:
        """Look a function up, with the known names in the error."""
        try:
            return self._functions[name]
        except KeyError:
            known = ", ".join(sorted(self._functions)) or "none"
            raise KeyError(f"no function named {name!r} (registered: {known})") from None

    def select(self, names: Iterable[str] | None) -> list[FunctionDef[Any]]:
        """The named functions, or all of them when ``names`` is None or empty."""
        wanted = list(names or [])
        return [self.get(n) for n in wanted] if wanted else list(self)

    def __iter__(self) -> Iterator[FunctionDef[Any]]:
        return iter(self._functions.values())

    def __len__(self) -> int:
        return len(self._functions)
