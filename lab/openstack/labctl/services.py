"""The OpenStack services: their one-time database steps and their long-running processes.

APIs run under gunicorn (threads, no keep-alive: keystoneauth trips over reused connections to
some WSGI servers); agents and workers run from the services' own console scripts.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence

from labctl import configs, processes
from labctl.configs import Context
from labctl.layout import PLUGINS_DIR

# name -> (service, WSGI module, program name oslo.config should see)
APIS = {
    "keystone-api": ("keystone", "keystone.wsgi.api", "keystone"),
    "glance-api": ("glance", "glance.wsgi.api", "glance-api"),
    "placement-api": ("placement", "placement.wsgi.api", "placement-api"),
    "cinder-api": ("cinder", "cinder.wsgi.api", "cinder-api"),
    "neutron-api": ("neutron", "neutron.wsgi.api", "neutron-api"),
    "nova-api": ("nova", "nova.wsgi.osapi_compute", "nova-api"),
}
# name -> (service, console script)
WORKERS = {
    "cinder-scheduler": ("cinder", "cinder-scheduler"),
    "cinder-volume": ("cinder", "cinder-volume"),
    "neutron-rpc": ("neutron", "neutron-rpc-server"),
    "nova-conductor": ("nova", "nova-conductor"),
    "nova-scheduler": ("nova", "nova-scheduler"),
    "nova-compute": ("nova", "nova-compute"),
}
API_PORT_NAMES = {
    "keystone-api": "keystone",
    "glance-api": "glance",
    "placement-api": "placement",
    "cinder-api": "cinder",
    "neutron-api": "neutron",
    "nova-api": "nova",
}


def env(ctx: Context, service: str) -> dict[str, str]:
    """Environment of a service process: the venv first on PATH, the lab's plugins importable."""
    lab = ctx.lab
    config_dir = str(lab.etc / service)
    return {
        "PATH": f"{ctx.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": f"{PLUGINS_DIR}:{lab.python}",
        "VMFERRY_LAB_CONFIG_FILES": str(configs.config_file(lab, service)),
        f"OS_{service.upper()}_CONFIG_DIR": config_dir,
        # The services' own deprecation warnings are noise here, not the lab's to fix.
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }


def tool(ctx: Context, service: str, *argv: str) -> list[str]:
    """A service's management command with its config file."""
    return [
        str(ctx.venv / "bin" / argv[0]),
        "--config-file",
        str(configs.config_file(ctx.lab, service)),
        *argv[1:],
    ]


def once(ctx: Context, step: str, argv: Sequence[str], service: str) -> None:
    """Run a one-time step unless its marker says it is done (restarts skip migrations)."""
    marker = ctx.lab.marker(step)
    if marker.exists():
        return
    processes.run_step(ctx.lab, step, argv, env(ctx, service))
    marker.touch()


def sync_database(ctx: Context, service: str) -> None:
    """Create or upgrade a service's schema (and keystone's key repositories)."""
    if service == "keystone":
        owner = [
            "--keystone-user",
            pwd.getpwuid(os.getuid()).pw_name,
            "--keystone-group",
            grp.getgrgid(os.getgid()).gr_name,
        ]
        once(ctx, "keystone-db", tool(ctx, service, "keystone-manage", "db_sync"), service)
        once(ctx, "keystone-fernet", tool(ctx, service, "keystone-manage", "fernet_setup", *owner), service)
        once(
            ctx,
            "keystone-credential",
            tool(ctx, service, "keystone-manage", "credential_setup", *owner),
            service,
        )
    elif service == "glance":
        once(ctx, "glance-db", tool(ctx, service, "glance-manage", "db_sync"), service)
    elif service == "placement":
        once(ctx, "placement-db", tool(ctx, service, "placement-manage", "db", "sync"), service)
    elif service == "cinder":
        once(ctx, "cinder-db", tool(ctx, service, "cinder-manage", "db", "sync"), service)
    elif service == "neutron":
        once(ctx, "neutron-db", tool(ctx, service, "neutron-db-manage", "upgrade", "heads"), service)
    elif service == "nova":
        once(ctx, "nova-api-db", tool(ctx, service, "nova-manage", "api_db", "sync"), service)
        # Without --database_connection, cell0's URL is the main one with `_cell0` appended:
        # the password never reaches argv.
        once(ctx, "nova-cell0", tool(ctx, service, "nova-manage", "cell_v2", "map_cell0"), service)
        if not ctx.lab.marker("nova-cell1").exists():
            _create_cell(ctx)
        once(ctx, "nova-db", tool(ctx, service, "nova-manage", "db", "sync"), service)


def _create_cell(ctx: Context) -> None:
    # Exit 2 means the cell already exists (an earlier start died after creating it): that is fine.
    argv = tool(ctx, "nova", "nova-manage", "cell_v2", "create_cell", "--name", "cell1")
    try:
        processes.run_step(ctx.lab, "nova-cell1", argv, env(ctx, "nova"))
    except processes.LabError as error:
        if "exit 2)" not in str(error):
            raise
    ctx.lab.marker("nova-cell1").touch()


def launch_api(ctx: Context, name: str) -> None:
    """Start one API under gunicorn on its loopback port."""
    service, module, prog = APIS[name]
    port = ctx.lab.ports.all()[API_PORT_NAMES[name]]
    argv = [
        str(ctx.venv / "bin" / "gunicorn"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--keep-alive",
        "0",
        "--timeout",
        "600",
        "--graceful-timeout",
        "5",
        "--name",
        f"vmferry-lab-{name}",
        "--no-control-socket",
        f'vmferry_lab_plugins.wsgi:load("{module}", "{prog}")',
    ]
    processes.launch(ctx.lab, name, argv, env(ctx, service))


def wait_api(ctx: Context, name: str, timeout: float = 180) -> float:
    """Wait until an API answers on its port; return the seconds waited."""
    url = ctx.lab.url(API_PORT_NAMES[name], "/")
    return processes.wait_until(
        name, lambda: processes.http_answers(url), timeout, ctx.lab.log / f"{name}.log", name, ctx.lab
    )


def launch_worker(ctx: Context, name: str) -> None:
    """Start one agent or worker process."""
    service, script = WORKERS[name]
    processes.launch(ctx.lab, name, tool(ctx, service, script), env(ctx, service))


def expected() -> list[str]:
    """Names of every process a running lab has."""
    return ["mariadb", "epmd", "rabbitmq", *APIS, *WORKERS]
