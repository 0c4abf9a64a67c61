"""A Cinder volume driver keeping each volume as a sparse file, with attachments shown as devices.

Cinder's API, scheduler, attachment state machine and image code all run for real; only the block
backend is a file. When a volume is attached to a server, the file appears in that server's view of
``/dev/disk/by-id`` (``<instances_dir>/<server-id>/dev/disk/by-id/virtio-<volume-id[:20]>``, the name
a virtio disk gets in a guest), so the data plane can write real bytes into a real Cinder volume
exactly where a conversion host would find the disk. Detaching removes the link. Connection info
is of os-brick's ``local`` type with the file as ``device_path``. One attachment per volume is
assumed (no multi-attach).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from cinder import context as cinder_context  # type: ignore[import-untyped]
from cinder import objects
from cinder.image import image_utils  # type: ignore[import-untyped]
from cinder.volume import configuration, driver, volume_utils  # type: ignore[import-untyped]
from oslo_config import cfg
from oslo_log import log as logging

LOG = logging.getLogger(__name__)
GIB = 1024**3

file_volume_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "vmferry_volumes_dir",
        default="$state_path/vmferry-volumes",
        help="Directory holding one sparse file per volume and per snapshot.",
    ),
    cfg.StrOpt(
        "vmferry_instances_dir",
        default="$state_path/vmferry-instances",
        help="Per-server device views: <dir>/<server-id>/dev/disk/by-id/virtio-<id[:20]>.",
    ),
]
cfg.CONF.register_opts(file_volume_opts, group=configuration.SHARED_CONF_GROUP)


def virtio_name(volume_id: str) -> str:
    """The by-id name a guest gives a virtio disk: the serial (volume id) cut to 20 characters."""
    return f"virtio-{volume_id[:20]}"


class FileVolumeDriver(driver.VolumeDriver):  # type: ignore[misc]
    """Volumes, snapshots and clones as sparse files; attachments as by-id links."""

    VERSION = "1.0.0"
    CI_WIKI_NAME = "vmferry-lab"
    volumes_dir: Path
    instances_dir: Path

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(file_volume_opts)
        self.volumes_dir = Path(self.configuration.vmferry_volumes_dir)
        self.instances_dir = Path(self.configuration.vmferry_instances_dir)

    @staticmethod
    def get_driver_options() -> list[cfg.Opt]:
        """Options this driver reads from its backend section."""
        return file_volume_opts

    def do_setup(self, context: Any) -> None:
        """Create the directories the driver writes to."""
        self.volumes_dir.mkdir(parents=True, exist_ok=True)
        self.instances_dir.mkdir(parents=True, exist_ok=True)

    def check_for_setup_error(self) -> None:
        """Fail early if the volumes directory cannot be written."""
        if not os.access(self.volumes_dir, os.W_OK):
            raise OSError(f"{self.volumes_dir} is not writable")

    def local_path(self, volume: Any) -> str:
        """The volume's backing file."""
        return str(self.volumes_dir / volume.name)

    def _snapshot_path(self, snapshot: Any) -> Path:
        return Path(self.volumes_dir, str(snapshot.name))

    @staticmethod
    def _copy_sparse(source: Path, target: Path, size_gib: int) -> None:
        # cp keeps holes, so a clone of a mostly empty 100 GiB volume costs nothing.
        subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
        if target.stat().st_size < size_gib * GIB:
            os.truncate(target, size_gib * GIB)

    def create_volume(self, volume: Any) -> None:
        """A sparse file of the volume's size."""
        path = Path(self.local_path(volume))
        with path.open("wb") as backing:
            backing.truncate(volume.size * GIB)

    def delete_volume(self, volume: Any) -> None:
        """Remove the file and any device link left behind."""
        self._unexpose(volume)
        Path(self.local_path(volume)).unlink(missing_ok=True)

    def extend_volume(self, volume: Any, new_size: int) -> None:
        """Grow the file; the new tail reads as zeros."""
        os.truncate(self.local_path(volume), new_size * GIB)

    def create_cloned_volume(self, volume: Any, src_vref: Any) -> None:
        """Copy the source volume's file."""
        self._copy_sparse(Path(self.local_path(src_vref)), Path(self.local_path(volume)), volume.size)

    def create_snapshot(self, snapshot: Any) -> None:
        """A snapshot is a sparse copy of the volume's file."""
        self._copy_sparse(
            Path(self.local_path(snapshot.volume)), self._snapshot_path(snapshot), snapshot.volume_size
        )

    def delete_snapshot(self, snapshot: Any) -> None:
        """Remove the snapshot's file."""
        self._snapshot_path(snapshot).unlink(missing_ok=True)

    def create_volume_from_snapshot(self, volume: Any, snapshot: Any) -> None:
        """Copy the snapshot's file."""
        self._copy_sparse(self._snapshot_path(snapshot), Path(self.local_path(volume)), volume.size)

    def revert_to_snapshot(self, context: Any, volume: Any, snapshot: Any) -> None:
        """Copy the snapshot's file back over the volume's."""
        self._copy_sparse(self._snapshot_path(snapshot), Path(self.local_path(volume)), volume.size)

    def copy_image_to_volume(
        self, context: Any, volume: Any, image_service: Any, image_id: str, disable_sparse: bool = False
    ) -> None:
        """Write the image straight into the file (no root helper needed for a file we own)."""
        image_utils.fetch_to_raw(
            context,
            image_service,
            image_id,
            self.local_path(volume),
            self.configuration.volume_dd_blocksize,
            size=volume.size,
            run_as_root=False,
            disable_sparse=disable_sparse,
        )

    def copy_volume_to_image(
        self, context: Any, volume: Any, image_service: Any, image_meta: dict[str, Any]
    ) -> None:
        """Upload the file as an image."""
        volume_utils.upload_volume(
            context, image_service, image_meta, self.local_path(volume), volume, run_as_root=False
        )

    def ensure_export(self, context: Any, volume: Any) -> None:
        """Files need no export."""

    def create_export(self, context: Any, volume: Any, connector: dict[str, Any]) -> None:
        """Files need no export."""

    def remove_export(self, context: Any, volume: Any) -> None:
        """Files need no export."""

    def initialize_connection(self, volume: Any, connector: dict[str, Any]) -> dict[str, Any]:
        """Show the file to the server being attached and return os-brick ``local`` connection info."""
        self._expose(volume)
        return {
            "driver_volume_type": "local",
            "data": {"device_path": self.local_path(volume), "access_mode": "rw"},
        }

    def terminate_connection(self, volume: Any, connector: dict[str, Any] | None, **kwargs: Any) -> None:
        """Hide the file from the server again."""
        self._unexpose(volume)

    def _expose(self, volume: Any) -> None:
        # Read the attachments afresh: the one being connected was created after `volume` was loaded.
        admin = cinder_context.get_admin_context()
        for attachment in objects.VolumeAttachmentList.get_all_by_volume_id(admin, volume.id):
            if not attachment.instance_uuid or attachment.attach_status == "detached":
                continue
            by_id = self.instances_dir / attachment.instance_uuid / "dev" / "disk" / "by-id"
            by_id.mkdir(parents=True, exist_ok=True)
            link = by_id / virtio_name(volume.id)
            link.unlink(missing_ok=True)
            link.symlink_to(self.local_path(volume))
            LOG.info("volume %s visible to server %s as %s", volume.id, attachment.instance_uuid, link)

    def _unexpose(self, volume: Any) -> None:
        for link in self.instances_dir.glob(f"*/dev/disk/by-id/{virtio_name(volume.id)}"):
            link.unlink(missing_ok=True)
            LOG.info("volume %s no longer visible as %s", volume.id, link)

    def _update_volume_stats(self) -> None:
        usage = shutil.disk_usage(self.volumes_dir)
        provisioned = sum(path.stat().st_size for path in self.volumes_dir.glob("volume-*"))
        backend = self.configuration.safe_get("volume_backend_name") or "vmferry-file"
        self._stats = {
            "volume_backend_name": backend,
            "vendor_name": "vmferry",
            "driver_version": self.VERSION,
            "storage_protocol": "file",
            "total_capacity_gb": usage.total // GIB,
            "free_capacity_gb": usage.free // GIB,
            "provisioned_capacity_gb": provisioned // GIB,
            "reserved_percentage": 0,
            "thin_provisioning_support": True,
            "thick_provisioning_support": False,
            "max_over_subscription_ratio": 20.0,
            "QoS_support": False,
            "multiattach": False,
        }
