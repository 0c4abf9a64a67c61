"""The ``vmferry`` command: up, run, provision, migrate, status, events, replay and demo."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from vmferry.bus.errors import FerryError
from vmferry.bus.handles import BusHandle
from vmferry.bus.history import history
from vmferry.bus.provision import DEADLETTER, TRACKER, provision
from vmferry.bus.publisher import Publisher
from vmferry.bus.replay import replay
from vmferry.bus.runtime import Runtime
from vmferry.cli import output
from vmferry.cli.config import Settings, load
from vmferry.cli.requests import build_request, load_request_file, submit
from vmferry.cli.wiring import Session, registry_for, session

T = TypeVar("T")
log = logging.getLogger("vmferry")


@dataclass
class Ctx:
    """Options shared by every command."""

    settings: Settings
    json: bool


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _fail(ctx: Ctx, error: FerryError) -> None:
    if ctx.json:
        output.emit_json({"error": error.cause, "fix": error.fix})
    else:
        output.errors.print(f"[red]error:[/] {error.cause}", highlight=False)
        if error.fix:
            output.errors.print(f"[yellow]fix:[/] {error.fix}", highlight=False)
    sys.exit(2)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FerryErrors into a one-line error (plus fix) and exit code 2."""

    def wrapper(ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(ctx, *args, **kwargs)
        except FerryError as error:
            _fail(ctx, error)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return click.pass_obj(wrapper)


@click.group()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML config file.")
@click.option("--nats-url", envvar="VMFERRY_NATS_URL", help="NATS server URL(s), comma-separated.")
@click.option("--prefix", envvar="VMFERRY_PREFIX", help="Subject/stream prefix (default: ferry).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="vmferry")
@click.pass_context
def cli(
    context: click.Context,
    config_file: Path | None,
    nats_url: str | None,
    prefix: str | None,
    as_json: bool,
    verbose: int,
) -> None:
    """vmferry: migrate VMware VMs to OpenStack with functions chained on NATS JetStream."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load(config_file, nats_url, prefix)
    except FerryError as error:
        _fail(Ctx(Settings(nats=load(env={}).nats, nats_configured=False), as_json), error)
        return
    context.obj = Ctx(settings, as_json)


# -------------------------------------------------------------------------------------------------
# Running functions


@cli.command()
@click.option("-f", "--function", "functions", multiple=True, help="Run only these functions.")
@click.option("--embedded/--no-embedded", default=None, help="Force the embedded NATS server on/off.")
@click.option("--port", type=int, default=None, help="Port of the embedded server (default: random).")
@command
def up(ctx: Ctx, functions: tuple[str, ...], embedded: bool | None, port: int | None) -> None:
    """Start everything in one process: NATS (embedded unless configured), provisioning, functions."""
    from vmferry.cli.stack import run_stack  # noqa: PLC0415 - keeps other commands' start-up light

    use_embedded = embedded if embedded is not None else not ctx.settings.nats_configured
    _run(run_stack(ctx.settings, functions, use_embedded, port, announce=not ctx.json))


@cli.command()
@click.argument("function")
@command
def run(ctx: Ctx, function: str) -> None:
    """Run one function (or `tracker` / `deadletter`) until SIGTERM, as a container does."""

    async def main() -> None:
        bus = BusHandle()
        registry = registry_for(ctx.settings, bus)
        builtin = function in (TRACKER, DEADLETTER)
        selected = [] if builtin else registry.select([function])
        async with session(ctx.settings) as s:
            store = await s.store()
            bus.bind(s.js, s.naming, store)
            runtime = Runtime(
                s.js,
                s.naming,
                selected,
                store if function == TRACKER else None,
                tracker=function == TRACKER,
                deadletter=function == DEADLETTER,
            )
            runtime.install_signal_handlers()
            log.warning("running %s (prefix %s)", function, s.naming.prefix)
            await runtime.run()

    try:
        _run(main())
    except KeyError as exc:
        raise FerryError(str(exc.args[0]), "see `vmferry up --help` for the function list") from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.option("-f", "--function", "functions", multiple=True, help="Also handle these functions' events.")
@command
def serve(ctx: Ctx, host: str, port: int, functions: tuple[str, ...]) -> None:
    """HTTP CloudEvents endpoint: migration requests into NATS; hosted functions' events handled."""
    from aiohttp import web  # noqa: PLC0415 - only this command needs the web server

    from vmferry.bus.http import HttpReceiver  # noqa: PLC0415

    async def main() -> None:
        bus = BusHandle()
        hosted = registry_for(ctx.settings, bus).select(functions) if functions else []
        async with session(ctx.settings) as s:
            if hosted:
                bus.bind(s.js, s.naming, await s.store())
            runner = web.AppRunner(HttpReceiver(s.nc, s.naming, hosted).app())
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            log.warning("serving CloudEvents on http://%s:%d/ (prefix %s)", host, port, s.naming.prefix)
            await stop.wait()
            await runner.cleanup()

    _run(main())


@cli.command("provision")
@command
def provision_cmd(ctx: Ctx) -> None:
    """Declare streams, the state bucket and all durable consumers (idempotent)."""

    async def main() -> None:
        async with session(ctx.settings) as s:
            changes = await provision(s.js, s.naming, registry_for(ctx.settings), ctx.settings.limits)
        if ctx.json:
            output.emit_json([{"kind": c.kind, "name": c.name, "action": c.action} for c in changes])
            return
        for change in changes:
            output.console.print(f"{change.kind:9} {change.name:40} {change.action}")

    _run(main())


# -------------------------------------------------------------------------------------------------
# Submitting and observing migrations


@cli.command()
@click.option("-f", "--file", "request_file", type=click.Path(path_type=Path), help="Request YAML/JSON.")
@click.option("--request-id", help="Id of the request (default: random); resubmitting dedupes.")
@click.option("--source", help="Configured vSphere source name.")
@click.option("--destination", help="Configured OpenStack destination name.")
@click.option("--vm", "vm_names", multiple=True, help="VM by name (repeatable).")
@click.option("--vm-uuid", "vm_uuids", multiple=True, help="VM by instanceUuid (repeatable).")
@click.option("--vm-moref", "vm_morefs", multiple=True, help="VM by moref, e.g. vm-42 (repeatable).")
@click.option("--folder", "folders", multiple=True, help="All VMs of a folder (repeatable).")
@click.option("--mode", type=click.Choice(["cold", "warm"]), help="cold (default) or warm (CBT).")
@click.option("--cutover", type=click.Choice(["immediate", "manual", "scheduled"]))
@click.option("--network", "networks", multiple=True, help="PORTGROUP=NETWORK (repeatable).")
@click.option("--flavor", "flavors", multiple=True, help="VMNAME=FLAVOR (repeatable).")
@click.option("--volume-type", "volume_types", multiple=True, help="DATASTORE=TYPE (repeatable).")
@click.option("--wait", is_flag=True, help="Follow the request until it settles.")
@click.option("--timeout", type=float, default=600.0, help="Seconds --wait waits at most.")
@command
def migrate(ctx: Ctx, request_file: Path | None, wait: bool, timeout: float, **flags: Any) -> None:
    """Publish a MigrationRequest and print its id."""
    document = load_request_file(request_file) if request_file else {}
    request = build_request(document, **flags)

    async def main() -> None:
        async with session(ctx.settings) as s:
            duplicate = await submit(Publisher(s.js, s.naming), s.naming, request)
            key = f"req-{request.request_id}"
            if ctx.json and not wait:
                output.emit_json({"request_id": request.request_id, "key": key, "duplicate": duplicate})
                return
            if not ctx.json:
                note = " (already submitted earlier)" if duplicate else ""
                output.console.print(f"request {request.request_id} submitted{note}; key {key}")
            if wait:
                from vmferry.cli.follow import follow  # noqa: PLC0415

                states = await follow(await s.store(), key, timeout, quiet=ctx.json)
                if ctx.json:
                    output.emit_json(states)

    _run(main())


@cli.command()
@click.option("-f", "--file", "request_file", type=click.Path(path_type=Path), help="Request YAML/JSON.")
@click.option("--source", help="Configured vSphere source name.")
@click.option("--vm", "vm_names", multiple=True, help="VM by name (repeatable).")
@click.option("--vm-uuid", "vm_uuids", multiple=True, help="VM by instanceUuid (repeatable).")
@click.option("--vm-moref", "vm_morefs", multiple=True, help="VM by moref (repeatable).")
@click.option("--folder", "folders", multiple=True, help="All VMs of a folder (repeatable).")
@click.option("--mode", type=click.Choice(["cold", "warm"]), help="Validate for a cold or warm migration.")
@command
def validate(ctx: Ctx, request_file: Path | None, **flags: Any) -> None:
    """Dry run: read the VMs from vSphere and print every finding with its fix; changes nothing.

    Exits 1 when a blocker is found, so scripts can gate on it.
    """
    from vmferry.cli.vsphere import validate as run_validation  # noqa: PLC0415 - loads pyvmomi

    document = load_request_file(request_file) if request_file else {}
    document.setdefault("destination", {"cloud": "validation-only"})
    request = build_request(document, **flags)
    sys.exit(_run(run_validation(ctx.settings, request, ctx.json)))


@cli.command()
@click.option("--source", required=True, help="Configured vSphere source name.")
@click.option("--request-id", help="Only this request's snapshots.")
@click.option("--sweep", "remove", is_flag=True, help="Remove them (default: only list).")
@click.option("--older-than", "older_than_hours", type=float, help="With --sweep: only older than N hours.")
@command
def snapshots(
    ctx: Ctx, source: str, request_id: str | None, remove: bool, older_than_hours: float | None
) -> None:
    """List vmferry's snapshots on a vSphere source, or sweep stale ones away."""
    from vmferry.cli.vsphere import snapshots as run_snapshots  # noqa: PLC0415 - loads pyvmomi

    _run(
        run_snapshots(
            ctx.settings,
            source,
            request_id=request_id,
            older_than_hours=older_than_hours,
            remove=remove,
            as_json=ctx.json,
        )
    )


@cli.command()
@click.argument("key", required=False)
@click.option("--watch", is_flag=True, help="Keep showing changes until interrupted.")
@command
def status(ctx: Ctx, key: str | None, watch: bool) -> None:
    """Show the state of every VM and request, or of one (by key or VM name)."""

    async def main() -> None:
        async with session(ctx.settings) as s:
            store = await s.store()
            if watch:
                from vmferry.cli.follow import watch_all  # noqa: PLC0415

                await watch_all(store, key)
                return
            keys = await store.keys()
            states = [st for k in keys if (st := (await store.get(k))[0]) is not None]
            if key:
                states = [st for st in states if key in (st.key, st.name, st.request_id)]
                if not states:
                    raise FerryError(f"no VM or request matches {key!r}", "list them with `vmferry status`")
            if ctx.json:
                output.emit_json(states)
            elif key and len(states) == 1:
                output.state_detail(states[0])
            else:
                output.console.print(output.state_table(states))

    _run(main())


@cli.command()
@click.argument("key")
@command
def events(ctx: Ctx, key: str) -> None:
    """List the stored events of a VM (vm-...) or request (req-...), oldest first."""

    async def main() -> None:
        async with session(ctx.settings) as s:
            found = await history(s.js, s.naming, await _resolve_key(s, key))
        if ctx.json:
            output.emit_json(output.history_json(found))
        else:
            output.console.print(output.history_table(key, found))

    _run(main())


@cli.command("sync")
@click.argument("key")
@command
def sync_cmd(ctx: Ctx, key: str) -> None:
    """Ask for another precopy pass of a warm migration (changed blocks only)."""
    from vmferry.cli.operate import request_pass  # noqa: PLC0415

    async def main() -> None:
        async with session(ctx.settings) as s:
            asked = await request_pass(s, await _resolve_key(s, key))
        _asked(ctx, asked)

    _run(main())


@cli.command("cutover")
@click.argument("key")
@command
def cutover_cmd(ctx: Ctx, key: str) -> None:
    """Cut a warm migration over: stop the source, final pass, convert, launch."""
    from vmferry.cli.operate import request_cutover  # noqa: PLC0415

    async def main() -> None:
        async with session(ctx.settings) as s:
            asked = await request_cutover(s, await _resolve_key(s, key), os.environ.get("USER"))
        _asked(ctx, asked)

    _run(main())


@cli.command("cancel")
@click.argument("key")
@click.option(
    "--teardown", is_flag=True, help="Also remove the replicas and instance made on the destination."
)
@command
def cancel_cmd(ctx: Ctx, key: str, teardown: bool) -> None:
    """Cancel a VM's migration: remove its snapshots, power the source back on if vmferry stopped it."""
    from vmferry.cli.operate import cancel  # noqa: PLC0415

    async def main() -> None:
        async with session(ctx.settings) as s:
            done = await cancel(s, ctx.settings, await _resolve_key(s, key), os.environ.get("USER"), teardown)
        if ctx.json:
            output.emit_json(done.__dict__)
            return
        output.console.print(
            f"{done.key}: cancelled (request {done.request_id}); snapshots removed:"
            f" {', '.join(done.snapshots_removed) or 'none'}"
            + (
                f"; removed on the destination: {', '.join(done.destination_removed) or 'nothing'}"
                if teardown
                else ""
            )
        )

    _run(main())


def _asked(ctx: Ctx, asked: Any) -> None:
    if ctx.json:
        output.emit_json(asked.__dict__)
        return
    note = " (already asked: deduplicated)" if asked.duplicate else ""
    output.console.print(f"{asked.key}: published {asked.event_type} (pass {asked.pass_no}){note}")


@cli.command("replay")
@click.argument("key")
@click.option("--force", is_flag=True, help="Replay even if a replay seems to be in progress.")
@command
def replay_cmd(ctx: Ctx, key: str, force: bool) -> None:
    """Re-drive a VM's migration from its last successful step."""

    async def main() -> None:
        async with session(ctx.settings) as s:
            result = await replay(s.js, s.naming, await s.store(), await _resolve_key(s, key), force=force)
        if ctx.json:
            output.emit_json(result.__dict__)
        else:
            note = " (already published: deduplicated)" if result.duplicate else ""
            output.console.print(
                f"replayed {result.key} (generation {result.generation}): re-published {result.subject}{note}"
            )

    _run(main())


async def _resolve_key(s: Session, key: str) -> str:
    """Accept a vm-/req- key as is; otherwise look the VM up by name in the state bucket."""
    if key.startswith(("vm-", "req-")):
        return key
    store = await s.store()
    matches = [k for k in await store.keys() if (st := (await store.get(k))[0]) and st.name == key]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FerryError(f"no VM named {key!r} is known", "use its key (vm-...) from `vmferry status`")
    raise FerryError(f"several VMs are named {key!r}: {', '.join(matches)}", "use the key instead")


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo's state folder afterwards.")
@command
def demo(ctx: Ctx, keep: bool) -> None:
    """Run a self-contained migration demo on an embedded NATS server (the README's first command)."""
    from vmferry.cli.demo import run_demo  # noqa: PLC0415

    _run(run_demo(as_json=ctx.json, keep=keep))


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="vmferry")


if __name__ == "__main__":
    main()
