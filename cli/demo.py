"""`vmferry demo`: a self-contained run on an embedded NATS server, for a first look and for CI.

It configures a demo source and destination, starts the stack, submits a valid request and one
that names an unknown source, follows both, shows status, history and the failure's fix, and
replays the failed one. The chain grows as the migration functions (discover, snapshot, transfer,
convert, launch) are registered; the demo then runs them end to end.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path

from vmferry.bus.connection import NatsSettings
from vmferry.bus.embedded import EmbeddedNats
from vmferry.bus.errors import FerryError
from vmferry.bus.history import history
from vmferry.bus.provision import provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.replay import replay
from vmferry.bus.runtime import Runtime
from vmferry.bus.state import StateStore
from vmferry.cli import output
from vmferry.cli.config import DestinationConfig, Settings, SourceConfig
from vmferry.cli.requests import build_request, submit
from vmferry.cli.wiring import registry_for, session
from vmferry.schemas.state import VmState

DEMO_SOURCE = "demo-vcenter"
DEMO_DESTINATION = "demo-cloud"


def demo_settings(state_dir: Path, url: str) -> Settings:
    """Settings of the demo: one source and one destination, the embedded server."""
    return Settings(
        nats=NatsSettings(servers=(url,)),
        nats_configured=True,
        prefix="demo",
        sources={DEMO_SOURCE: SourceConfig(host="127.0.0.1")},
        destinations={DEMO_DESTINATION: DestinationConfig(cloud="vmferry-admin")},
        state_dir=state_dir,
    )


async def _wait_for(store: StateStore, key: str, phases: set[str], timeout: float = 30.0) -> VmState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, _ = await store.get(key)
        if state is not None and state.phase in phases:
            return state
        await asyncio.sleep(0.1)
    raise FerryError(f"{key} did not reach {sorted(phases)} within {timeout:.0f}s", "see `vmferry -vv demo`")


def _say(as_json: bool, text: str) -> None:
    if not as_json:
        output.console.print(text, highlight=False)


async def run_demo(*, as_json: bool = False, keep: bool = False) -> dict[str, object]:
    """Run the demo; returns (and with --json prints) what happened."""
    # The demo shows its deliberate failure itself; the runner's error log would only repeat it.
    logging.getLogger("vmferry.bus.runner").setLevel(logging.CRITICAL)
    state_dir = Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    server = EmbeddedNats(state_dir / "nats")
    try:
        url = server.start()
        settings = demo_settings(state_dir, url)
        _say(as_json, f"[bold]embedded NATS[/] at {url} (JetStream store in {state_dir})")
        async with session(settings) as s:
            registry = registry_for(settings)
            changes = await provision(s.js, s.naming, registry)
            _say(as_json, f"provisioned {len(changes)} streams, buckets and consumers")
            store = await s.store()
            runtime = Runtime(s.js, s.naming, registry, store, fetch_timeout=0.2)
            running = asyncio.create_task(runtime.run())
            _say(as_json, f"functions running: {', '.join(f.name for f in registry)} + tracker, dead letters")
            publisher = Publisher(s.js, s.naming)
            good = build_request(
                {}, request_id="demo-ok", source=DEMO_SOURCE, destination=DEMO_DESTINATION,
                vm_names=("web 01 (prod) ✓",), networks=("VM Network=private",),
            )  # fmt: skip
            bad = build_request(
                {}, request_id="demo-bad", source="no-such-vcenter", destination=DEMO_DESTINATION,
                vm_names=("db/01",),
            )  # fmt: skip
            for request in (good, bad):
                await submit(publisher, s.naming, request)
                _say(as_json, f"submitted request {request.request_id}")
            ok = await _wait_for(store, "req-demo-ok", {"accepted", "discovered", "completed", "failed"})
            failed = await _wait_for(store, "req-demo-bad", {"failed"})
            output.console.print(output.state_table([ok, failed])) if not as_json else None
            if failed.failure and not as_json:
                _say(as_json, f"[red]demo-bad failed as expected:[/] {failed.failure.cause}")
                _say(as_json, f"[yellow]fix:[/] {failed.failure.fix}")
            replayed = await replay(s.js, s.naming, store, "req-demo-bad")
            again = await _wait_for(store, "req-demo-bad", {"failed"})
            _say(as_json, f"replayed req-demo-bad (generation {replayed.generation}): {again.phase} again,"
                 " as its source is still not configured")  # fmt: skip
            events = await history(s.js, s.naming, "req-demo-ok")
            if not as_json:
                output.console.print(output.history_table("req-demo-ok", events))
            runtime.stop()
            await running
        summary: dict[str, object] = {
            "nats": url,
            "accepted": ok.phase,
            "rejected": again.phase,
            "rejection": again.failure.cause if again.failure else None,
            "events": output.history_json(events),
        }
        if as_json:
            output.emit_json(summary)
        else:
            _say(
                as_json,
                "[green]demo finished[/]: the request went through the registered functions;"
                " discover, snapshot, transfer, convert and launch join the chain as they are built.",
            )
        return summary
    finally:
        server.stop()
        if keep:
            _say(as_json, f"state kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
