"""One process's share of the system: a set of function workers plus the built-in tracker and
dead-letter workers, started together and stopped together (SIGTERM/SIGINT aware)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from typing import Any

from nats.js import JetStreamContext

from vmferry.bus.deadletter import AdvisoryProcessor, DeadLetters
from vmferry.bus.function import FunctionDef
from vmferry.bus.naming import Naming
from vmferry.bus.provision import DEADLETTER
from vmferry.bus.runner import FunctionWorker, PullLoop
from vmferry.bus.state import StateStore
from vmferry.bus.tracker import Tracker

log = logging.getLogger(__name__)


class Runtime:
    """Runs the chosen functions and built-in workers until ``stop`` (or a signal)."""

    def __init__(
        self,
        js: JetStreamContext,
        naming: Naming,
        functions: Iterable[FunctionDef[Any]],
        store: StateStore | None = None,
        *,
        tracker: bool = True,
        deadletter: bool = True,
        fetch_timeout: float = 1.0,
    ) -> None:
        dead_letters = DeadLetters(js, naming)
        self.workers = [FunctionWorker(js, naming, f, dead_letters, fetch_timeout) for f in functions]
        self._loops: list[PullLoop | Tracker] = [w.loop for w in self.workers]
        if tracker:
            if store is None:
                raise ValueError("the tracker needs the state store")
            self._loops.append(Tracker(js, naming, store, fetch_timeout=fetch_timeout))
        if deadletter:
            advisories = AdvisoryProcessor(js, naming, dead_letters)
            self._loops.append(
                PullLoop(
                    js,
                    naming.advisory_stream,
                    naming.durable(DEADLETTER),
                    4,
                    advisories.process,
                    fetch_timeout,
                )
            )
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """Stop fetching everywhere; in-flight work finishes before ``run`` returns."""
        if not self._stopped.is_set():
            log.info("stopping: finishing in-flight work")
        self._stopped.set()
        for loop in self._loops:
            loop.stop()

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Run every loop; if one fails, stop the others and re-raise."""
        tasks = [asyncio.create_task(loop.run()) for loop in self._loops]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
