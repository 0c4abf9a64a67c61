"""Auth of the OpenStack adapter against the lab's Keystone: OS_* environment, application
credentials, a revoked token (re-authentication) and Nova's fault for a server that cannot boot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.openstack.conftest import OpenStackLab
from tests.openstack.test_adapter import (
    Step,
    conversion_done,
    create_volumes,
    handler,
    plan_for,
    vm_spec,
)
from vmferry.adapters.openstack import teardown
from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.bus.errors import PermanentError

pytestmark = [pytest.mark.timeout(900)]


def member_cloud(lab: OpenStackLab) -> dict[str, Any]:
    clouds: dict[str, Any] = yaml.safe_load(lab.clouds_yaml.read_text())
    cloud: dict[str, Any] = clouds["clouds"][lab.member_cloud]
    return cloud


async def test_os_environment_authenticates(
    openstack_lab: OpenStackLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud = member_cloud(openstack_lab)
    for key, value in cloud["auth"].items():
        monkeypatch.setenv(f"OS_{key.upper()}", str(value))
    monkeypatch.setenv("OS_REGION_NAME", cloud["region_name"])
    monkeypatch.setenv("OS_INTERFACE", cloud["interface"])
    monkeypatch.setenv("OS_IDENTITY_API_VERSION", "3")
    adapter = OpenStackAdapter(CloudAuth(cloud="envvars"))
    try:
        project = await adapter.check_auth()
        identity: Any = adapter.conn.identity
        assert identity.get_project(project).name == openstack_lab.project
    finally:
        adapter.close()


@pytest.fixture
async def member(openstack_lab: OpenStackLab) -> AsyncIterator[OpenStackAdapter]:
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.member_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    yield adapter
    adapter.close()


async def test_application_credential_from_a_secret_file(
    openstack_lab: OpenStackLab, member: OpenStackAdapter, tmp_path: Path
) -> None:
    identity: Any = member.conn.identity
    user = member.conn.current_user_id
    credential = identity.create_application_credential(user, name=f"vmferry-test-{tmp_path.name}")
    secret_file = tmp_path / "secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(credential.secret)
    auth = CloudAuth(
        cloud="app-credential",
        auth_url=member_cloud(openstack_lab)["auth"]["auth_url"],
        application_credential_id=credential.id,
        application_credential_secret_file=secret_file,
        region=member_cloud(openstack_lab)["region_name"],
    )
    adapter = OpenStackAdapter(auth)
    try:
        assert await adapter.check_auth() == member.conn.current_project_id
        identity.delete_application_credential(user, credential)
        fresh = OpenStackAdapter(auth)
        with pytest.raises(PermanentError, match="refused the credentials of cloud 'app-credential'"):
            await fresh.check_auth()
        fresh.close()
    finally:
        identity.delete_application_credential(user, credential, ignore_missing=True)
        adapter.close()


async def test_a_revoked_token_is_replaced_transparently(
    openstack_lab: OpenStackLab, member: OpenStackAdapter
) -> None:
    await member.check_auth()
    token = member.conn.session.get_token()
    admin = openstack_lab.connect(openstack_lab.admin_cloud)
    try:
        admin.session.delete(
            "/auth/tokens", headers={"X-Subject-Token": token}, endpoint_filter={"service_type": "identity"}
        )
    finally:
        admin.close()
    flavors = await member.call("listing flavors", lambda: list(member.conn.compute.flavors()))
    assert {f.name for f in flavors} >= set(openstack_lab.flavors)
    assert member.conn.session.get_token() != token


async def test_a_server_that_cannot_boot_reports_novas_fault(openstack_lab: OpenStackLab) -> None:
    adapter = OpenStackAdapter(
        CloudAuth(cloud=openstack_lab.admin_cloud, clouds_yaml=openstack_lab.clouds_yaml)
    )
    spec = vm_spec(disks=1, nics=0)
    try:
        plan = plan_for(openstack_lab, openstack_lab.admin_cloud, flavor_policy="create")
        volume_ids = await create_volumes(adapter, spec, plan)
        # No compute node has this trait: the scheduler finds no host and Nova records the fault.
        impossible = dataclasses.replace(
            handler(adapter, spec),
            required_extra_specs={"trait:CUSTOM_VMFERRY_NOWHERE": "required"},
            active_timeout=120,
        )
        with pytest.raises(PermanentError, match="went to ERROR: No valid host was found"):
            await impossible(conversion_done(spec, plan, volume_ids), Step())
    finally:
        await teardown.teardown(adapter, spec)
        adapter.close()
