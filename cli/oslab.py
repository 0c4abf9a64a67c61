"""The project's OpenStack lab (lab/openstack) as the demo and the tests see it: the facts its start
script writes to lab.json, connections to its clouds, and a server standing for the conversion host.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.bus.errors import FerryError

REPO = Path(__file__).resolve().parents[1]
LAB_SCRIPTS = REPO / "lab" / "openstack"


@dataclass(frozen=True)
class OpenStackLab:
    """What tests need to know about the running lab (from its lab.json)."""

    clouds_yaml: Path
    admin_cloud: str
    member_cloud: str
    project: str
    network: str
    volume_type: str
    flavors: list[str]
    compute_host: str
    volumes_dir: Path
    instances_dir: Path

    def connect(self, cloud: str) -> Any:
        """An openstacksdk connection to one of the lab's clouds (ignores OS_* variables)."""
        from openstack import connection  # noqa: PLC0415
        from openstack.config import loader  # noqa: PLC0415

        config = loader.OpenStackConfig(config_files=[str(self.clouds_yaml)], load_envvars=False)
        region = config.get_one(cloud=cloud)
        return connection.Connection(config=region)

    def backing_file(self, volume_id: str) -> Path:
        """The file behind a Cinder volume."""
        return self.volumes_dir / f"volume-{volume_id}"

    def device_path(self, server_id: str, volume_id: str) -> Path:
        """Where a server (e.g. the conversion host) sees an attached volume: its /dev/disk/by-id name."""
        return self.instances_dir / server_id / "dev" / "disk" / "by-id" / f"virtio-{volume_id[:20]}"


def load_lab(facts_file: Path) -> OpenStackLab:
    """The lab described by a lab.json."""
    facts = json.loads(facts_file.read_text())
    return OpenStackLab(
        clouds_yaml=Path(facts["clouds_yaml"]),
        admin_cloud=facts["admin_cloud"],
        member_cloud=facts["member_cloud"],
        project=facts["project"],
        network=facts["network"],
        volume_type=facts["volume_type"],
        flavors=facts["flavors"],
        compute_host=facts["compute_host"],
        volumes_dir=Path(facts["volumes_dir"]),
        instances_dir=Path(facts["instances_dir"]),
    )


def running_lab() -> OpenStackLab:
    """The running lab, found through its own status script."""
    status = subprocess.run(
        [str(LAB_SCRIPTS / "status")], capture_output=True, text=True, timeout=60, check=False
    )
    if status.returncode != 0 or not status.stdout.split():
        raise FerryError("the OpenStack lab is not running", "start it with lab/openstack/start")
    # The status script ends its output with the clouds.yaml path; lab.json sits beside it.
    return load_lab(Path(status.stdout.split()[-1]).parent / "lab.json")


def ensure_conversion_host(lab: OpenStackLab, name: str) -> str:
    """The id of a server named ``name`` standing for the conversion host, created if missing.

    Volumes attached to it appear under its device root, as on a real conversion host.
    """
    conn = lab.connect(lab.admin_cloud)
    try:
        existing = [s for s in conn.compute.servers(name=f"^{name}$") if s.status == "ACTIVE"]
        if existing:
            return str(existing[0].id)
        flavor = conn.compute.find_flavor(lab.flavors[0], ignore_missing=False)
        blank_root = {
            "boot_index": 0,
            "source_type": "blank",
            "destination_type": "volume",
            "volume_size": 1,
            "delete_on_termination": True,
        }
        server = conn.compute.create_server(
            name=name, flavor_id=flavor.id, networks="none", block_device_mapping=[blank_root]
        )
        return str(conn.compute.wait_for_server(server, wait=300).id)
    finally:
        conn.close()
