"""Where the lab keeps things: state directory layout, loopback ports, per-lab secrets.

Everything a lab owns lives under one directory (``VMFERRY_LAB_DIR``, default /tmp/vmferry-lab), so
several labs never share data and removing the directory removes the lab.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PLUGINS_DIR = HERE / "plugins"
DEFAULT_LAB_DIR = "/tmp/vmferry-lab"  # noqa: S108 (a well-known, per-machine lab location)
DEFAULT_PORT_BASE = 17100
SECRET_NAMES = ("database", "rabbit", "admin", "member", "service")
REGION = "RegionOne"
PROJECT = "vmferry"
MEMBER_USER = "vmferry-member"
NETWORK = "vmferry-net"
SUBNET = "vmferry-subnet"
SUBNET_CIDR = "192.0.2.0/24"
VOLUME_TYPE = "vmferry-file"
VOLUME_BACKEND = "vmferry-file"
COMPUTE_HOST = "vmferry-compute"
FLAVORS = {"m1.small": (1, 2048), "m1.medium": (2, 4096), "m1.large": (4, 8192)}


@dataclass(frozen=True)
class Ports:
    """The ten consecutive loopback ports of one lab, none of them a service's default."""

    base: int

    @property
    def keystone(self) -> int:
        """Identity API."""
        return self.base

    @property
    def glance(self) -> int:
        """Image API."""
        return self.base + 1

    @property
    def placement(self) -> int:
        """Placement API."""
        return self.base + 2

    @property
    def cinder(self) -> int:
        """Block storage API."""
        return self.base + 3

    @property
    def neutron(self) -> int:
        """Network API."""
        return self.base + 4

    @property
    def nova(self) -> int:
        """Compute API."""
        return self.base + 5

    @property
    def mariadb(self) -> int:
        """The lab's MariaDB (TCP; it also has a unix socket in the lab dir)."""
        return self.base + 6

    @property
    def amqp(self) -> int:
        """The lab's RabbitMQ listener."""
        return self.base + 7

    @property
    def epmd(self) -> int:
        """The lab's own Erlang port mapper (RabbitMQ needs one; the system's is left alone)."""
        return self.base + 8

    @property
    def erlang_dist(self) -> int:
        """RabbitMQ's Erlang distribution port."""
        return self.base + 9

    def all(self) -> dict[str, int]:
        """Name to port, for checks and for lab.json."""
        names = (
            "keystone",
            "glance",
            "placement",
            "cinder",
            "neutron",
            "nova",
            "mariadb",
            "amqp",
            "epmd",
            "erlang_dist",
        )
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class Lab:
    """One lab: its directory and ports; every path a component uses is derived here."""

    root: Path
    ports: Ports

    @classmethod
    def from_env(cls) -> Lab:
        """The lab named by VMFERRY_LAB_DIR and VMFERRY_LAB_PORT_BASE."""
        root = Path(os.environ.get("VMFERRY_LAB_DIR") or DEFAULT_LAB_DIR).resolve()
        base = int(os.environ.get("VMFERRY_LAB_PORT_BASE") or DEFAULT_PORT_BASE)
        return cls(root=root, ports=Ports(base))

    @property
    def etc(self) -> Path:
        """Generated configuration, one folder per component (0700: files hold passwords)."""
        return self.root / "etc"

    @property
    def data(self) -> Path:
        """Databases, images, volumes."""
        return self.root / "data"

    @property
    def log(self) -> Path:
        """stdout and stderr of every process."""
        return self.root / "log"

    @property
    def run(self) -> Path:
        """One ``<name>.pid`` per process the lab started: ``<pid> <start time>``."""
        return self.root / "run"

    @property
    def state(self) -> Path:
        """Markers of one-time steps done (database syncs, bootstrap)."""
        return self.root / "state"

    @property
    def lock(self) -> Path:
        """oslo.concurrency lock files."""
        return self.root / "lock"

    @property
    def python(self) -> Path:
        """Generated metadata that registers the lab's plugins' entry points."""
        return self.root / "python"

    @property
    def volumes_dir(self) -> Path:
        """Backing files of Cinder volumes: ``volume-<id>``."""
        return self.data / "cinder" / "volumes"

    @property
    def instances_dir(self) -> Path:
        """Per-server device views written by the file volume driver."""
        return self.data / "cinder" / "instances"

    @property
    def mysql_dir(self) -> Path:
        """MariaDB's data directory."""
        return self.data / "mysql"

    @property
    def mysql_socket(self) -> Path:
        """MariaDB's unix socket (root administers the lab's database through it)."""
        return self.run / "mysqld.sock"

    @property
    def clouds_yaml(self) -> Path:
        """openstacksdk configuration with the vmferry-admin and vmferry-member clouds."""
        return self.root / "clouds.yaml"

    @property
    def facts(self) -> Path:
        """lab.json: ports, names and paths tests and tools need."""
        return self.root / "lab.json"

    @property
    def secrets_file(self) -> Path:
        """Generated passwords (0600)."""
        return self.root / "secrets.json"

    def url(self, service: str, path: str = "") -> str:
        """HTTP URL of a service's API on loopback."""
        return f"http://127.0.0.1:{self.ports.all()[service]}{path}"

    def make_dirs(self) -> None:
        """Create the directory tree; only owner access where secrets live."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        for folder in (self.etc, self.data, self.log, self.run, self.state, self.lock, self.python):
            folder.mkdir(exist_ok=True)
            folder.chmod(0o700)

    def secrets(self) -> dict[str, str]:
        """The lab's passwords, generated on first use and kept in a 0600 file."""
        if self.secrets_file.exists():
            stored: dict[str, str] = json.loads(self.secrets_file.read_text())
            if all(name in stored for name in SECRET_NAMES):
                return stored
        generated = {name: secrets.token_urlsafe(24) for name in SECRET_NAMES}
        write_private(self.secrets_file, json.dumps(generated, indent=2) + "\n")
        return generated

    def marker(self, step: str) -> Path:
        """Marker file of a one-time step."""
        return self.state / f"{step}.done"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)
