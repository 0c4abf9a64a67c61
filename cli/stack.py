"""`vmferry up`: the embedded server (unless one is configured), provisioning and functions in one process."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace

from vmferry.bus.embedded import EmbeddedNats
from vmferry.bus.errors import FerryError
from vmferry.bus.handles import BusHandle
from vmferry.bus.provision import provision
from vmferry.bus.runtime import Runtime
from vmferry.cli import output
from vmferry.cli.config import Settings, embedded_url
from vmferry.cli.wiring import registry_for, session

log = logging.getLogger(__name__)


def _start_embedded(settings: Settings, port: int | None) -> tuple[EmbeddedNats, Settings]:
    running = embedded_url(settings)
    if running:
        raise FerryError(
            f"an embedded server from another `vmferry up` is already running at {running}",
            "use that one (other commands find it automatically) or stop it first",
        )
    server = EmbeddedNats(settings.state_dir / "nats", port=port)
    url = server.start()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.embedded_record.write_text(json.dumps({"url": url, "pid": server.pid, "owner": os.getpid()}))
    return server, replace(settings, nats=replace(settings.nats, servers=(url,)), nats_configured=True)


async def run_stack(
    settings: Settings,
    functions: Sequence[str],
    use_embedded: bool,
    port: int | None,
    *,
    announce: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT; the embedded server stops with us."""
    server: EmbeddedNats | None = None
    if use_embedded:
        server, settings = _start_embedded(settings, port)
    try:
        async with session(settings) as s:
            bus = BusHandle()
            registry = registry_for(settings, bus)
            selected = registry.select(functions)
            await provision(s.js, s.naming, registry, settings.limits)
            store = await s.store()
            bus.bind(s.js, s.naming, store)
            runtime = Runtime(s.js, s.naming, selected, store)
            runtime.install_signal_handlers()
            if announce:
                where = settings.nats.describe()
                names = ", ".join(f.name for f in selected) or "none"
                output.console.print(
                    f"vmferry up: NATS {where} (prefix {s.naming.prefix}); functions: {names};"
                    " tracker and dead-letter workers on. Ctrl-C stops."
                )
            await runtime.run()
    finally:
        if server is not None:
            server.stop()
            settings.embedded_record.unlink(missing_ok=True)
