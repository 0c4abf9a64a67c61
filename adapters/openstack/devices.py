"""Where an attached volume appears on the conversion host: one resolver for production and the lab."""

from __future__ import annotations

from pathlib import Path


def device_path(volume_id: str, root: Path = Path("/")) -> Path:
    """``<root>/dev/disk/by-id/virtio-<volume id[:20]>``: virtio-blk serials are the id cut to 20."""
    return root / "dev" / "disk" / "by-id" / f"virtio-{volume_id[:20]}"
