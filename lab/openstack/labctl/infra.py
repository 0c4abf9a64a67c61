"""The lab's own MariaDB and RabbitMQ (Debian packages), run as private instances on lab ports.

Neither touches the system-wide instance, its configuration or its default ports: data, configs,
sockets, Erlang cookie and port mapper all live in the lab directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from labctl import processes
from labctl.layout import Lab, write_private

MARIADBD = "/usr/sbin/mariadbd"
MARIADB_CLIENT = "/usr/bin/mariadb"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = "/usr/bin/epmd"
DATABASES = ("keystone", "glance", "placement", "cinder", "neutron", "nova_api", "nova", "nova_cell0")
DB_USER = "lab"


def base_env() -> dict[str, str]:
    """A minimal environment for system binaries (no venv, no OpenStack variables)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
    }


# --- MariaDB -------------------------------------------------------------------------------------


def start_mariadb(lab: Lab) -> None:
    """Initialise the data directory once, start mariadbd on the lab port and wait for it."""
    if not (lab.mysql_dir / "mysql").is_dir():
        shutil.rmtree(lab.mysql_dir, ignore_errors=True)
        lab.mysql_dir.mkdir(parents=True)
        processes.run_step(
            lab,
            "mariadb-install-db",
            [
                MARIADB_INSTALL_DB,
                "--no-defaults",
                "--user=root",
                f"--datadir={lab.mysql_dir}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            base_env(),
        )
    # Runs as the invoking user (root in CI): the files stay in the lab dir, owned like the rest.
    processes.launch(
        lab,
        "mariadb",
        [
            MARIADBD,
            "--no-defaults",
            "--user=root",
            f"--datadir={lab.mysql_dir}",
            f"--socket={lab.mysql_socket}",
            f"--pid-file={lab.run / 'mariadbd.pid-internal'}",
            "--bind-address=127.0.0.1",
            f"--port={lab.ports.mariadb}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-buffer-pool-size=64M",
            "--skip-log-bin",
            "--max-connections=500",
            "--log-error=" + str(lab.log / "mariadb-error.log"),
        ],
        base_env(),
    )
    processes.wait_until("mariadb", lambda: _sql_ok(lab), 60, lab.log / "mariadb-error.log", "mariadb", lab)


def _sql_ok(lab: Lab) -> bool:
    if not lab.mysql_socket.exists():
        return False
    try:
        sql(lab, "SELECT 1;")
    except processes.LabError:
        return False
    return True


def sql(lab: Lab, statements: str) -> str:
    """Run SQL as MariaDB's root over the lab's socket; statements go on stdin, never argv."""
    return processes.run_step(
        lab,
        "mariadb-sql",
        [
            MARIADB_CLIENT,
            "--no-defaults",
            f"--socket={lab.mysql_socket}",
            "-uroot",
            "--batch",
            "--skip-column-names",
        ],
        base_env(),
        stdin=statements,
        timeout=60,
    )


def create_databases(lab: Lab, password: str) -> None:
    """Create the services' databases and the lab's SQL user (idempotent; resets the password)."""
    statements = [f"CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4;" for db in DATABASES]
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    for host in ("127.0.0.1", "localhost"):
        statements += [
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{quoted}';",
            f"ALTER USER '{DB_USER}'@'{host}' IDENTIFIED BY '{quoted}';",
            f"GRANT ALL PRIVILEGES ON *.* TO '{DB_USER}'@'{host}';",
        ]
    sql(lab, "\n".join([*statements, "FLUSH PRIVILEGES;"]))


def database_url(lab: Lab, password: str, database: str) -> str:
    """SQLAlchemy URL of one of the lab's databases."""
    return f"mysql+pymysql://{DB_USER}:{password}@127.0.0.1:{lab.ports.mariadb}/{database}?charset=utf8mb4"


# --- RabbitMQ ------------------------------------------------------------------------------------


def rabbit_dir(lab: Lab) -> Path:
    """RabbitMQ's home: Mnesia data, logs, Erlang cookie."""
    return lab.data / "rabbitmq"


def start_rabbitmq(lab: Lab, password: str) -> None:
    """Start a private epmd and a RabbitMQ node that both listen on loopback lab ports only."""
    home = rabbit_dir(lab)
    home.mkdir(parents=True, exist_ok=True)
    etc = lab.etc / "rabbitmq"
    etc.mkdir(exist_ok=True)
    write_private(
        etc / "rabbitmq.conf",
        "\n".join(
            [
                f"listeners.tcp.default = 127.0.0.1:{lab.ports.amqp}",
                "default_user = lab",
                f"default_pass = {password}",
                "default_vhost = /",
                "disk_free_limit.absolute = 50MB",
                "log.console = true",
                "log.file = false",
                "",
            ]
        ),
    )
    (etc / "enabled_plugins").write_text("[].\n")
    (etc / "rabbitmq-env.conf").write_text("# the lab sets everything through the environment\n")
    env = {
        **base_env(),
        "HOME": str(home),
        "ERL_EPMD_PORT": str(lab.ports.epmd),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    processes.launch(lab, "epmd", [EPMD, "-port", str(lab.ports.epmd)], env)
    processes.wait_until(
        "epmd", lambda: processes.port_open(lab.ports.epmd), 20, lab.log / "epmd.log", "epmd", lab
    )
    env.update(
        {
            "RABBITMQ_CONF_ENV_FILE": str(etc / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(etc / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(etc / "enabled_plugins"),
            "RABBITMQ_NODENAME": "vmferry-lab@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(lab.ports.amqp),
            "RABBITMQ_DIST_PORT": str(lab.ports.erlang_dist),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(lab.log),
            "RABBITMQ_PID_FILE": str(lab.run / "rabbitmq.pid-internal"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
    )
    processes.launch(lab, "rabbitmq", [RABBITMQ_SERVER], env)


def wait_rabbitmq(lab: Lab) -> None:
    """Wait until the broker's AMQP listener accepts connections."""
    processes.wait_until(
        "rabbitmq",
        lambda: processes.port_open(lab.ports.amqp),
        120,
        lab.log / "rabbitmq.log",
        "rabbitmq",
        lab,
    )


def transport_url(lab: Lab, password: str) -> str:
    """oslo.messaging URL of the lab's broker."""
    return f"rabbit://lab:{password}@127.0.0.1:{lab.ports.amqp}/"
