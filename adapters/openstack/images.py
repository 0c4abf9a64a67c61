"""The Glance path for migrations without a conversion host: a converted disk file uploaded as an image,
then a Cinder volume made from that image.

Images and volumes are found again by identity metadata (VM, disk, ``vmferry_managed`` and the role
``converted``), never by name, so a rerun makes nothing twice. The image carries the guest's boot
metadata (firmware, machine type, disk bus, OS type), which Cinder copies to the volume. An image that
is not ``active`` (an earlier upload that died) is a leftover: it is deleted and uploaded again; so is
one of an older conversion attempt. A volume made from another image, or left in ``error``, is deleted
and made again; a volume still being made is waited for, never duplicated.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from openstack import exceptions as sdk_exceptions
from openstack.image.v2 import image as sdk_image

from vmferry.adapters.openstack.client import OpenStackAdapter, wait_until
from vmferry.adapters.openstack.clones import ATTEMPT_KEY, clone_identity, find_clones
from vmferry.adapters.openstack.model import DISK_KEY, MANAGED_KEY, VM_KEY, VmSpec, gib_for
from vmferry.adapters.openstack.volumes import VOLUME_TIMEOUT, guest_image_metadata, volume_type_for
from vmferry.bus.errors import FerryError, PermanentError, RetryableError
from vmferry.schemas.events import DiskInfo
from vmferry.schemas.request import MigrationPlan

#: the image a volume was made from (Cinder keeps it too, but only in its image metadata)
SOURCE_IMAGE_KEY = "vmferry_source_image"
#: after the upload request returns, how long the image may take to become active
IMAGE_TIMEOUT = 600.0
#: slowest image-to-volume copy assumed when sizing the wait for a volume made from an image
COPY_BYTES_PER_S = 20 * 1024**2
#: Glance's default hash (``os_hash_algo``); the upload is verified against it
HASH_ALGORITHM = "sha512"
CHUNK = 4 * 1024**2

_BUSY_IMAGE = {"queued", "saving", "uploading", "importing"}
_BUSY_VOLUME = {"creating", "downloading"}
_SETTLED = {"available", "in-use"}
_GONE_TIMEOUT = 600.0


class _IdentityImage(sdk_image.Image):
    """Glance filters images by any property, but the SDK drops query keys it does not know."""

    _query_mapping = copy.deepcopy(sdk_image.Image._query_mapping)
    _query_mapping._mapping.update({k: k for k in clone_identity("", 0)})


class _HashedFile:
    """A file streamed in chunks as a request body, hashed on the way.

    Iterating again starts over (keystoneauth re-sends a body after re-authenticating), and the
    length lets requests send a Content-Length instead of chunked encoding.
    """

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self._size = size
        self.digest = hashlib.new(HASH_ALGORITHM)
        self.sent = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        self._file.seek(0)
        self.digest = hashlib.new(HASH_ALGORITHM)
        self.sent = 0
        while chunk := self._file.read(CHUNK):
            self.digest.update(chunk)
            self.sent += len(chunk)
            yield chunk


def _described(image: Any) -> str:
    props = image.properties or {}
    return f"image {image.id} (disk {props.get(DISK_KEY, '?')} of {props.get(VM_KEY, '?')})"


async def find_images(adapter: OpenStackAdapter, vm_key: str, disk_key: int) -> list[Any]:
    """Every image vmferry uploaded for one disk (normally none or one), by identity properties."""
    return await _images(adapter, clone_identity(vm_key, disk_key))


async def vm_images(adapter: OpenStackAdapter, vm_key: str) -> list[Any]:
    """Every image vmferry uploaded for a VM (teardown removes these)."""
    return await _images(adapter, {VM_KEY: vm_key, MANAGED_KEY: "true"})


async def _images(adapter: OpenStackAdapter, wanted: dict[str, str]) -> list[Any]:
    conn = adapter.conn
    # An admin lists every project's images: stay in the project vmferry works in.
    query: dict[str, Any] = {"owner": conn.current_project_id, **wanted}
    return await adapter.call(
        "looking up images by identity properties",
        lambda: [
            image
            for image in _IdentityImage.list(conn.image, **query)
            if all((image.properties or {}).get(k) == v for k, v in wanted.items())
        ],
    )


async def upload_disk_image(
    adapter: OpenStackAdapter,
    path: Path,
    spec: VmSpec,
    disk: DiskInfo,
    plan: MigrationPlan,
    disk_format: str = "raw",
    *,
    attempt: str | None = None,
    timeout: float = IMAGE_TIMEOUT,
) -> Any:
    """The disk's image: found again by identity, or created and uploaded (streamed) from ``path``.

    ``attempt`` names the conversion that produced the file; an image of another attempt is replaced.
    The upload is checked against Glance's size and hash; the image carries the guest boot metadata.
    """
    size = await asyncio.to_thread(_file_size, path)
    found = await find_images(adapter, spec.vm_key, disk.key)
    current = [image for image in found if _current(image, size, disk_format, attempt)]
    if len(current) > 1:
        ids = ", ".join(image.id for image in current)
        raise PermanentError(
            f"{len(current)} active images carry the identity of disk {disk.key} of {spec.vm_key}: {ids}",
            "delete the stray ones (openstack image delete) and retry",
        )
    for image in found:
        if image not in current:
            await _remove_stale_image(adapter, image)
    if current:
        return current[0]
    image = await _create_image(adapter, spec, disk, plan, disk_format, size, attempt)
    try:
        sent = await adapter.call(
            f"uploading {path} ({size} bytes) to image {image.id} as {disk_format}",
            _upload,
            adapter,
            image,
            path,
            size,
        )
        ready = await wait_for_image(adapter, image.id, timeout)
        _verify(ready, size, sent)
    except FerryError:
        # Leave no half-made image behind; a rerun would replace it anyway.
        await _delete_quietly(adapter, image.id)
        raise
    return ready


def _file_size(path: Path) -> int:
    # Seeking to the end also works for block devices, whose st_size is 0.
    with path.open("rb") as file:
        return file.seek(0, os.SEEK_END)


def _current(image: Any, size: int, disk_format: str, attempt: str | None) -> bool:
    """An image this upload can reuse: complete, of this file's size and format and attempt."""
    props = image.properties or {}
    return (
        image.status == "active"
        and image.size == size
        and image.disk_format == disk_format
        and (attempt is None or props.get(ATTEMPT_KEY) == attempt)
    )


async def _remove_stale_image(adapter: OpenStackAdapter, image: Any) -> None:
    if image.status == "deactivated":
        raise PermanentError(
            f"{_described(image)} was deactivated by an administrator",
            f"reactivate it (openstack image set --activate {image.id}) or delete it, then retry",
        )
    await adapter.call(
        f"deleting the leftover {_described(image)} ({image.status})",
        adapter.conn.image.delete_image,
        image.id,
        ignore_missing=True,
    )


async def _create_image(
    adapter: OpenStackAdapter,
    spec: VmSpec,
    disk: DiskInfo,
    plan: MigrationPlan,
    disk_format: str,
    size: int,
    attempt: str | None,
) -> Any:
    properties = clone_identity(spec.vm_key, disk.key) | guest_image_metadata(spec, plan)
    if attempt is not None:
        properties[ATTEMPT_KEY] = attempt
    image = sdk_image.Image.new(
        name=f"{spec.name}-disk{disk.key}"[:255],
        disk_format=disk_format,
        container_format="bare",
        visibility="private",
        min_disk=max(gib_for(disk.capacity_bytes), gib_for(size) if disk_format == "raw" else 0),
        **properties,
    )
    return await adapter.call(f"creating the image of disk {disk.key}", image.create, adapter.conn.image)


def _upload(adapter: OpenStackAdapter, image: Any, path: Path, size: int) -> tuple[int, str]:
    """PUT the file as the image's data (runs in a worker thread); bytes sent and their hash."""
    with path.open("rb") as file:
        body = _HashedFile(file, size)
        image.data = body
        response = image.upload(adapter.conn.image, size=size)
    try:
        sdk_exceptions.raise_from_response(response)
    except sdk_exceptions.HttpException as exc:
        if exc.status_code != 415:
            raise
        # Glance inspects the data and refuses a file that is not in the declared format; its reason
        # is the last line of a plain-text body.
        lines = [line.strip() for line in response.text.splitlines() if line.strip()]
        reason = lines[-1] if lines else exc.details
        raise PermanentError(
            f"Glance refused {path} as disk_format {image.disk_format}: {reason}",
            f"upload it with the format it really has (qemu-img info {path})",
        ) from exc
    return body.sent, body.digest.hexdigest()


async def wait_for_image(adapter: OpenStackAdapter, image_id: str, timeout: float = IMAGE_TIMEOUT) -> Any:
    """Wait (with backoff) until an uploaded image is active; stuck or killed is a clear error."""
    glance = adapter.conn.image
    last: list[str] = []

    async def probe() -> Any | None:
        image = await adapter.call("reading an image", glance.get_image, image_id)
        last[:] = [image.status]
        if image.status == "active":
            return image
        if image.status in _BUSY_IMAGE:
            return None
        raise RetryableError(
            f"{_described(image)} went to {image.status} during its upload",
            "see glance-api's log (store full or unwritable?); the image is deleted and uploaded again"
            " on retry",
        )

    try:
        return await wait_until(f"image {image_id} to become active", probe, timeout, first=0.5, cap=10.0)
    except RetryableError as exc:
        if not last or last[0] not in _BUSY_IMAGE:
            raise
        raise RetryableError(
            f"image {image_id} is still {last[0]} {timeout:.0f} s after its data was sent",
            "check glance-api and its store; the image is deleted and uploaded again on retry",
            delay=30.0,
        ) from exc


def _verify(image: Any, size: int, sent: tuple[int, str]) -> None:
    count, digest = sent
    if image.size != size or count != size:
        raise RetryableError(
            f"image {image.id} holds {image.size} bytes, {count} sent, but the file has {size}",
            "was the file still being written? the image is uploaded again on retry",
        )
    if image.hash_algo == HASH_ALGORITHM and image.hash_value != digest:
        raise RetryableError(
            f"the {HASH_ALGORITHM} of image {image.id} does not match the data sent (corrupted in transit)",
            "retry; the image is uploaded again",
        )


async def _delete_quietly(adapter: OpenStackAdapter, image_id: str) -> None:
    try:
        await adapter.call(
            "deleting a failed upload", adapter.conn.image.delete_image, image_id, ignore_missing=True
        )
    except FerryError:
        return  # the rerun deletes it as a leftover


async def volume_from_image(
    adapter: OpenStackAdapter,
    image: Any,
    spec: VmSpec,
    disk: DiskInfo,
    plan: MigrationPlan,
    *,
    attempt: str | None = None,
    timeout: float | None = None,
) -> Any:
    """The disk's volume made from its image (type and AZ from the plan), waited for ``available``.

    Found again by identity (role ``converted``); one made from another image, or in ``error``, is
    deleted and made again. ``timeout`` defaults to a base plus the image size at a slow copy rate.
    """
    wait = timeout if timeout is not None else VOLUME_TIMEOUT + (image.size or 0) / COPY_BYTES_PER_S
    found = await find_clones(adapter, spec.vm_key, disk.key)
    mine = [v for v in found if _made_from(v, image.id) and not v.status.startswith("error")]
    if len(mine) > 1:
        ids = ", ".join(v.id for v in mine)
        raise PermanentError(
            f"{len(mine)} volumes were made from image {image.id} for disk {disk.key} of {spec.vm_key}:"
            f" {ids}",
            "delete the stray ones and retry",
        )
    for volume in found:
        if volume not in mine:
            await _remove_stale_volume(adapter, volume, image.id)
    volume = mine[0] if mine else await _create_volume(adapter, image, spec, disk, plan, attempt)
    return await wait_for_new_volume(adapter, volume.id, wait, f"disk {disk.key} of {spec.vm_key}")


def _made_from(volume: Any, image_id: str) -> bool:
    return (volume.metadata or {}).get(SOURCE_IMAGE_KEY) == image_id


async def _create_volume(
    adapter: OpenStackAdapter,
    image: Any,
    spec: VmSpec,
    disk: DiskInfo,
    plan: MigrationPlan,
    attempt: str | None,
) -> Any:
    metadata = clone_identity(spec.vm_key, disk.key) | {SOURCE_IMAGE_KEY: image.id}
    if attempt is not None:
        metadata[ATTEMPT_KEY] = attempt
    # Cinder refuses a volume smaller than the image's virtual size or min_disk.
    image_gib = gib_for(int(image.virtual_size or image.size or 0))
    attrs: dict[str, Any] = {
        "size": max(gib_for(disk.capacity_bytes), image_gib, int(image.min_disk or 0)),
        "image_id": image.id,
        "name": f"{spec.name}-disk{disk.key}"[:255],
        "description": f"vmferry: disk {disk.key} of {spec.vm_key} from image {image.id}",
        "metadata": metadata,
    }
    if (vtype := volume_type_for(plan, disk)) is not None:
        attrs["volume_type"] = vtype
    if plan.mappings.availability_zone:
        attrs["availability_zone"] = plan.mappings.availability_zone
    return await adapter.call(
        f"creating the volume of disk {disk.key} from image {image.id}",
        adapter.conn.block_storage.create_volume,
        **attrs,
    )


async def _remove_stale_volume(adapter: OpenStackAdapter, volume: Any, image_id: str) -> None:
    """Delete a volume of an older image or a failed attempt; refuse one a server still uses."""
    bs = adapter.conn.block_storage
    servers = [str(a.get("server_id")) for a in volume.attachments or []]
    source = (volume.metadata or {}).get(SOURCE_IMAGE_KEY)
    if servers:
        raise PermanentError(
            f"volume {volume.id} (made from image {source}, not {image_id}) is attached to"
            f" {', '.join(servers)}",
            "it holds an older conversion: delete that server (teardown) or detach the volume, then retry",
        )
    if volume.status in _BUSY_VOLUME:
        raise RetryableError(
            f"volume {volume.id} of an older image {source} is still {volume.status}",
            "retry once Cinder has finished it; it is then deleted and made again",
            delay=30.0,
        )
    if volume.status != "deleting":
        await adapter.call(
            f"deleting the stale volume {volume.id}", bs.delete_volume, volume.id, ignore_missing=True
        )

    async def gone() -> bool | None:
        left: Any = await adapter.call("reading a volume", bs.find_volume, volume.id, ignore_missing=True)
        if left is not None and left.status == "error_deleting":
            raise RetryableError(
                f"Cinder could not delete volume {volume.id}", "see cinder-volume's log; retry"
            )
        return True if left is None else None

    await wait_until(f"volume {volume.id} to be deleted", gone, _GONE_TIMEOUT)


async def wait_for_new_volume(adapter: OpenStackAdapter, volume_id: str, timeout: float, what: str) -> Any:
    """Wait (with backoff) for a volume being made to become ``available`` (or ``in-use``).

    ``error`` is permanent (its cause is in cinder-volume's log); still ``creating`` or ``downloading``
    at the timeout is retryable: the retry finds the same volume and waits on, so nothing is duplicated.
    """
    bs = adapter.conn.block_storage
    last: list[str] = []

    async def probe() -> Any | None:
        volume = await adapter.call("reading a volume", bs.get_volume, volume_id)
        last[:] = [volume.status]
        if volume.status.startswith("error"):
            raise PermanentError(
                f"volume {volume_id} ({what}) went to {volume.status}",
                "see cinder-volume's log for the cause (no space? image larger than the volume?);"
                " fix it and retry: the failed volume is deleted and made again",
            )
        # in-use: a rerun after launch finds the volume attached to the migrated server
        return volume if volume.status in _SETTLED else None

    try:
        return await wait_until(
            f"volume {volume_id} to become available", probe, timeout, first=1.0, cap=15.0
        )
    except RetryableError as exc:
        if not last or last[0] not in _BUSY_VOLUME:
            raise
        raise RetryableError(
            f"volume {volume_id} ({what}) is still {last[0]} after {timeout:.0f} s",
            "check cinder-volume (openstack volume service list) and its log for the volume; a retry waits"
            " for the same volume. If it will never finish, set it to error (openstack volume set --state"
            f" error {volume_id}) and retry: it is then deleted and made again",
            delay=30.0,
        ) from exc
