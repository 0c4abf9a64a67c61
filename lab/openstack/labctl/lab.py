"""Bring the whole lab up in dependency order (in parallel where possible), report on it, take it down.

Order: MariaDB and RabbitMQ; every service's database steps at once; each API as soon as its schema
is there (and the broker for services that need it); Keystone bootstrap and catalog; workers once
the catalog is there; flavors, network and volume type as soon as their API answers; nova-compute
once nova-conductor and Placement are up. A start against an existing lab directory skips the
one-time steps and only starts processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from labctl import infra, processes, services
from labctl.layout import (
    COMPUTE_HOST,
    FLAVORS,
    HERE,
    MEMBER_USER,
    NETWORK,
    PLUGINS_DIR,
    PROJECT,
    SUBNET,
    VOLUME_TYPE,
    Lab,
)

OPENSTACK = ("keystone", "glance", "placement", "cinder", "neutron", "nova")


def say(message: str) -> None:
    """Progress on stderr (stdout carries only the clouds.yaml path)."""
    print(f"lab: {message}", file=sys.stderr, flush=True)


class Timer:
    """Seconds since the start, for progress lines."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def __str__(self) -> str:
        return f"{time.monotonic() - self.began:6.1f}s"


def running(lab: Lab) -> tuple[list[str], list[str]]:
    """(alive, missing) process names of the lab."""
    alive = {p.name for p in processes.recorded(lab) if p.alive()}
    names = services.expected()
    return [n for n in names if n in alive], [n for n in names if n not in alive]


def code_fingerprint() -> str:
    """Hash of the lab's own code (controller and plugins): a running lab built from other code is stale."""
    digest = hashlib.sha256()
    for path in sorted([*HERE.glob("labctl/*.py"), *PLUGINS_DIR.glob("*/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def facts_match(lab: Lab, venv: Path) -> bool:
    """True if the running lab finished bootstrapping with these ports, this venv and this code."""
    try:
        facts = json.loads(lab.facts.read_text())
    except (OSError, ValueError):
        return False
    wanted = {"ports": lab.ports.all(), "venv": str(venv), "code": code_fingerprint()}
    return all(facts.get(key) == value for key, value in wanted.items()) and lab.clouds_yaml.exists()


@contextlib.contextmanager
def exclusive(lab: Lab) -> Iterator[None]:
    """Serialise starts and stops of one lab (two test sessions may start it at once)."""
    with (lab.root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def start(venv: Path) -> int:
    """Start the lab (or reuse a running one) and print the clouds.yaml path."""
    lab = Lab.from_env()
    lab.make_dirs()
    with exclusive(lab):
        return _start(lab, venv)


def _start(lab: Lab, venv: Path) -> int:
    alive, missing = running(lab)
    if not missing and facts_match(lab, venv):
        say(f"already running ({len(alive)} processes)")
        print(lab.clouds_yaml)
        return 0
    if alive:
        say(f"restarting a partial or changed lab ({len(missing)} of {len(alive) + len(missing)} missing)")
        processes.stop(lab)
    busy = [f"{name}={port}" for name, port in lab.ports.all().items() if processes.port_open(port)]
    if busy:
        say(f"ports already in use: {', '.join(busy)}; choose another VMFERRY_LAB_PORT_BASE")
        return 1
    try:
        Startup(lab, venv).run()
    except BaseException as error:
        say(f"start failed: {error}")
        say("stopping what was started; logs stay in " + str(lab.log))
        processes.stop(lab, grace=5)
        return 1
    print(lab.clouds_yaml)
    return 0


class Startup:
    """One bring-up: a thread per service, coordinated by events, aborted as a whole on any failure."""

    def __init__(self, lab: Lab, venv: Path) -> None:
        from labctl import configs  # noqa: PLC0415 (the stop/status paths run without the venv)

        self.lab = lab
        self.venv = venv
        self.timer = Timer()
        self.ctx = configs.Context(lab=lab, secrets=lab.secrets(), venv=venv)
        self.rabbit_ready = threading.Event()
        self.catalog_ready = threading.Event()
        self.placement_ready = threading.Event()
        self.failed = threading.Event()

    def run(self) -> None:
        """Bring everything up; raise the first failure."""
        from labctl import bootstrap, configs  # noqa: PLC0415

        self.lab.facts.unlink(missing_ok=True)
        configs.write_all(self.ctx)
        infra.start_rabbitmq(self.lab, self.ctx.secrets["rabbit"])
        infra.start_mariadb(self.lab)
        infra.create_databases(self.lab, self.ctx.secrets["database"])
        say(f"{self.timer} mariadb up")
        pool = ThreadPoolExecutor(max_workers=len(OPENSTACK) + 1)
        futures = [pool.submit(self._rabbit)] + [pool.submit(self._service, name) for name in OPENSTACK]
        try:
            self._raise_first(futures)
        finally:
            # Threads still waiting notice `failed` (or their process being stopped) and end.
            pool.shutdown(wait=False, cancel_futures=True)
        bootstrap.write_clouds(self.ctx)
        _write_facts(self.lab, self.venv)
        say(f"{self.timer} lab ready: {self.lab.clouds_yaml}")

    def _rabbit(self) -> None:
        infra.wait_rabbitmq(self.lab)
        self.rabbit_ready.set()
        say(f"{self.timer} rabbitmq up")

    def _service(self, service: str) -> None:
        from labctl import bootstrap  # noqa: PLC0415

        services.sync_database(self.ctx, service)
        say(f"{self.timer} {service} database ready")
        if service not in ("keystone", "glance", "placement"):
            self._wait(self.rabbit_ready, "rabbitmq")
        apis = [n for n, (s, _, _) in services.APIS.items() if s == service]
        workers = [n for n, (s, _) in services.WORKERS.items() if s == service and n != "nova-compute"]
        for name in apis:
            services.launch_api(self.ctx, name)
        if workers:
            # Workers authenticate as their service user when they start (nova-conductor exits
            # if it cannot), so they wait for the catalog and users.
            self._wait(self.catalog_ready, "keystone catalog")
        workers_started = bootstrap.sql_now()
        for name in workers:
            services.launch_worker(self.ctx, name)
        for name in apis:
            services.wait_api(self.ctx, name)
        say(f"{self.timer} {service} API up")
        if service == "keystone":
            self._register_identity()
        elif service == "placement":
            self.placement_ready.set()
        if service in bootstrap.RESOURCES and not self.lab.marker(f"{service}-resources").exists():
            self._wait(self.catalog_ready, "keystone catalog")
            bootstrap.RESOURCES[service](self.ctx)
            self.lab.marker(f"{service}-resources").touch()
        if service == "nova":
            self._wait(self.placement_ready, "placement")
            bootstrap.start_compute(self.ctx, workers_started)
            say(f"{self.timer} nova-compute registered")

    def _register_identity(self) -> None:
        from labctl import bootstrap  # noqa: PLC0415

        if not self.lab.marker("keystone-bootstrap").exists():
            bootstrap.keystone_bootstrap(self.ctx)
            self.lab.marker("keystone-bootstrap").touch()
        # The catalog holds the ports, so a lab restarted on other ports registers it again.
        registered = self.lab.marker(f"identity-{self.lab.ports.base}")
        if not registered.exists():
            bootstrap.identity(self.ctx)
            registered.touch()
        self.catalog_ready.set()
        say(f"{self.timer} catalog, users and projects registered")

    def _wait(self, event: threading.Event, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not event.wait(0.5):
            if self.failed.is_set():
                raise processes.LabError(f"abandoned waiting for {what}: another step failed")
            if time.monotonic() > deadline:
                raise processes.LabError(f"gave up waiting for {what}")

    def _raise_first(self, futures: list[Future[None]]) -> None:
        while not all(f.done() for f in futures):
            for future in futures:
                error = future.exception() if future.done() else None
                if error is not None:
                    self.failed.set()
                    raise error
            time.sleep(0.2)
        for future in futures:
            future.result()


def _write_facts(lab: Lab, venv: Path) -> None:
    from labctl import bootstrap  # noqa: PLC0415

    facts = {
        "clouds_yaml": str(lab.clouds_yaml),
        "admin_cloud": bootstrap.ADMIN_CLOUD,
        "member_cloud": bootstrap.MEMBER_CLOUD,
        "project": PROJECT,
        "member_user": MEMBER_USER,
        "network": NETWORK,
        "subnet": SUBNET,
        "volume_type": VOLUME_TYPE,
        "flavors": list(FLAVORS),
        "compute_host": COMPUTE_HOST,
        "volumes_dir": str(lab.volumes_dir),
        "instances_dir": str(lab.instances_dir),
        "ports": lab.ports.all(),
        "venv": str(venv),
        "code": code_fingerprint(),
        "log_dir": str(lab.log),
    }
    lab.facts.write_text(json.dumps(facts, indent=2) + "\n")


def stop() -> int:
    """Stop exactly the processes this lab recorded."""
    lab = Lab.from_env()
    if not lab.run.is_dir():
        say(f"no lab at {lab.root}")
        return 0
    with exclusive(lab):
        stopped = processes.stop(lab)
        lab.facts.unlink(missing_ok=True)
    say(f"stopped {len(stopped)} processes" + (f": {', '.join(stopped)}" if stopped else ""))
    return 0


def status() -> int:
    """Print each process (with its memory) and API; exit 0 if the lab is up, 3 if stopped, 1 otherwise."""
    lab = Lab.from_env()
    pids = {p.name: p.pid for p in processes.recorded(lab) if p.alive()} if lab.run.is_dir() else {}
    total = 0
    for name in services.expected():
        if name not in pids:
            print(f"{name:18} stopped")
            continue
        memory = processes.group_memory(pids[name])
        total += memory
        api = services.API_PORT_NAMES.get(name)
        answering = api is None or processes.http_answers(lab.url(api, "/"))
        print(
            f"{name:18} running  pid {pids[name]:<7} {memory / 2**20:6.0f} MiB"
            + ("" if answering else "  API NOT ANSWERING")
        )
    if not pids:
        return 3
    print(f"{'total':18} {len(pids)} processes, {total / 2**20:.0f} MiB (proportional set size)")
    if len(pids) < len(services.expected()) or not lab.facts.exists():
        return 1  # partly up, or still starting (lab.json is written last)
    print(f"clouds.yaml        {lab.clouds_yaml}")
    return 0
