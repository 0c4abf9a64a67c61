"""Nova: attach/detach to the conversion host, boot-from-volume servers found by identity, ACTIVE waits."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmferry.adapters.openstack.client import OpenStackAdapter, wait_until
from vmferry.adapters.openstack.devices import device_path
from vmferry.adapters.openstack.model import MANAGED_KEY, VM_KEY
from vmferry.adapters.openstack.volumes import wait_for_volume
from vmferry.bus.errors import PermanentError, RetryableError

SERVER_TIMEOUT = 900.0
DEVICE_TIMEOUT = 60.0


async def attach(adapter: OpenStackAdapter, server_id: str, volume_id: str, root: Path = Path("/")) -> Path:
    """Attach a volume to the conversion host (idempotent) and return its device once it shows."""
    volume = await adapter.call("reading a volume", adapter.conn.block_storage.get_volume, volume_id)
    attached_to = [a.get("server_id") for a in volume.attachments or []]
    if server_id not in attached_to:
        if attached_to:
            raise PermanentError(
                f"volume {volume_id} is attached to {', '.join(map(str, attached_to))},"
                " not to the conversion host",
                "detach it there first (multi-attach is not used)",
            )
        compute = adapter.conn.compute
        await adapter.call(
            "attaching a volume to the conversion host",
            compute.create_volume_attachment,
            server_id,
            volume=volume_id,
        )
        await wait_for_volume(adapter, volume_id, {"in-use"})
    path = device_path(volume_id, root)

    async def shown() -> Path | None:
        return path if await asyncio.to_thread(path.exists) else None

    return await wait_until(f"device {path}", shown, DEVICE_TIMEOUT, first=0.2, cap=2.0)


async def detach(adapter: OpenStackAdapter, server_id: str, volume_id: str) -> None:
    """Detach a volume from the conversion host (idempotent) and wait until it is available."""
    compute = adapter.conn.compute
    volume = await adapter.call("reading a volume", adapter.conn.block_storage.get_volume, volume_id)
    if any(a.get("server_id") == server_id for a in volume.attachments or []):
        await adapter.call(
            "detaching a volume from the conversion host",
            compute.delete_volume_attachment,
            server_id,
            volume_id,
        )
    await wait_for_volume(adapter, volume_id, {"available"})


async def find_server(adapter: OpenStackAdapter, vm_key: str, name: str) -> Any | None:
    """The server vmferry made for a VM: listed by exact name, recognised by its identity metadata."""
    compute = adapter.conn.compute
    pattern = f"^{re.escape(name)}$"
    found = await adapter.call(
        "looking up the server by identity metadata",
        lambda: [
            s for s in compute.servers(details=True, name=pattern) if (s.metadata or {}).get(VM_KEY) == vm_key
        ],
    )
    if len(found) > 1:
        raise PermanentError(
            f"{len(found)} servers carry the identity of {vm_key}: {', '.join(s.id for s in found)}",
            "delete the extra servers and retry",
        )
    return found[0] if found else None


async def check_keypair(adapter: OpenStackAdapter, name: str) -> None:
    """Fail before anything is made when the plan's key pair is missing (Nova only says "invalid")."""
    found = await adapter.call(
        f"finding key pair {name!r}", adapter.conn.compute.find_keypair, name, ignore_missing=True
    )
    if found is None:
        raise PermanentError(
            f"key pair {name!r} does not exist for the user vmferry authenticates as in cloud"
            f" {adapter.auth.cloud!r}",
            "key pairs belong to users, not projects: import the public key as that user"
            " (openstack keypair create --public-key FILE NAME), or drop options.key_name",
        )


async def create_server(
    adapter: OpenStackAdapter,
    *,
    vm_key: str,
    name: str,
    flavor_id: str,
    volume_ids: Sequence[str],
    port_ids: Sequence[str],
    key_name: str | None = None,
    availability_zone: str | None = None,
) -> Any:
    """Boot from volume: the first volume is the root, the rest in order; ports in NIC order."""
    bdm = [
        {
            "boot_index": index if index == 0 else -1,
            "uuid": volume_id,
            "source_type": "volume",
            "destination_type": "volume",
            "delete_on_termination": False,
        }
        for index, volume_id in enumerate(volume_ids)
    ]
    attrs: dict[str, Any] = {
        "name": name,
        "flavor_id": flavor_id,
        "block_device_mapping": bdm,
        "networks": [{"port": p} for p in port_ids] or "none",
        "metadata": {VM_KEY: vm_key, MANAGED_KEY: "true"},
    }
    if key_name:
        attrs["key_name"] = key_name
    if availability_zone:
        attrs["availability_zone"] = availability_zone
    return await adapter.call("creating the server", adapter.conn.compute.create_server, **attrs)


async def wait_active(adapter: OpenStackAdapter, server_id: str, timeout: float = SERVER_TIMEOUT) -> Any:
    """Wait (with backoff) for ACTIVE; ERROR becomes a permanent error with Nova's fault."""
    compute = adapter.conn.compute

    async def probe() -> Any | None:
        server = await adapter.call("reading the server", compute.get_server, server_id)
        if server.status == "ERROR":
            fault = server.fault or {}
            raise PermanentError(
                f"server {server_id} went to ERROR: {fault.get('message', 'no fault recorded')}"
                f" (code {fault.get('code', '?')})",
                "fix the cause Nova reports, run teardown for the VM's server (volumes are kept) and retry",
            )
        return server if server.status == "ACTIVE" else None

    try:
        return await wait_until(f"server {server_id} to become ACTIVE", probe, timeout, first=1.0, cap=15.0)
    except RetryableError as exc:
        raise RetryableError(
            exc.cause, "check nova-compute and nova-conductor logs; the server is reused on retry"
        ) from exc
