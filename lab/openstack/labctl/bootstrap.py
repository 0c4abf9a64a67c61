"""Fill a fresh lab with what tests expect: catalog, users, project, flavors, network, volume type.

Every step finds before it creates, so running it again (a restart, a new port base) converges
instead of duplicating. Runs inside the lab's venv (openstacksdk).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import openstack
import yaml  # type: ignore[import-untyped,unused-ignore]
from openstack.connection import Connection

from labctl import infra, processes, services
from labctl.configs import Context
from labctl.layout import (
    COMPUTE_HOST,
    FLAVORS,
    MEMBER_USER,
    NETWORK,
    PROJECT,
    REGION,
    SUBNET,
    SUBNET_CIDR,
    VOLUME_BACKEND,
    VOLUME_TYPE,
    Lab,
    write_private,
)

ADMIN_CLOUD = "vmferry-admin"
MEMBER_CLOUD = "vmferry-member"
SERVICE_USERS = ("glance", "placement", "cinder", "neutron", "nova")


def catalog(lab: Lab) -> list[tuple[str, str, str]]:
    """(service name, service type, endpoint URL) of every API the lab registers."""
    volume = lab.url("cinder", "/v3/%(project_id)s")
    return [
        ("glance", "image", lab.url("glance")),
        ("placement", "placement", lab.url("placement")),
        ("cinderv3", "volumev3", volume),
        ("cinder", "block-storage", volume),
        ("neutron", "network", lab.url("neutron")),
        ("nova", "compute", lab.url("nova", "/v2.1")),
    ]


def keystone_bootstrap(ctx: Context) -> None:
    """Admin user, admin project, default roles and the identity endpoint (keystone-manage bootstrap)."""
    url = ctx.auth_url
    argv = services.tool(
        ctx,
        "keystone",
        "keystone-manage",
        "bootstrap",
        "--bootstrap-username",
        "admin",
        "--bootstrap-project-name",
        "admin",
        "--bootstrap-role-name",
        "admin",
        "--bootstrap-service-name",
        "keystone",
        "--bootstrap-region-id",
        REGION,
        "--bootstrap-admin-url",
        url,
        "--bootstrap-internal-url",
        url,
        "--bootstrap-public-url",
        url,
    )
    # The password travels in the environment keystone-manage reads it from, not in argv.
    password = {"OS_BOOTSTRAP_PASSWORD": ctx.secrets["admin"]}
    processes.run_step(ctx.lab, "keystone-bootstrap", argv, {**services.env(ctx, "keystone"), **password})


def connect(ctx: Context, username: str, password: str, project: str) -> Connection:
    """An openstacksdk connection that reads no clouds.yaml and no OS_* variables."""
    return openstack.connect(
        load_yaml_config=False,
        load_envvars=False,
        auth_type="password",
        region_name=REGION,
        auth={
            "auth_url": ctx.auth_url,
            "username": username,
            "password": password,
            "project_name": project,
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        },
    )


def admin(ctx: Context) -> Connection:
    """The lab's admin."""
    return connect(ctx, "admin", ctx.secrets["admin"], "admin")


# openstacksdk types `conn.identity` as a v2 | v3 union; the lab only speaks v3, so the helpers
# take the proxy untyped.
def _role(keystone: Any, name: str) -> Any:
    return keystone.find_role(name) or keystone.create_role(name=name)


def _project(keystone: Any, name: str) -> Any:
    found = keystone.find_project(name, domain_id="default")
    return found or keystone.create_project(name=name, domain_id="default", description="vmferry lab")


def _user(keystone: Any, name: str, password: str, project: Any, roles: list[Any]) -> None:
    user = keystone.find_user(name, domain_id="default")
    if user is None:
        user = keystone.create_user(
            name=name, password=password, domain_id="default", default_project_id=project.id
        )
    else:
        keystone.update_user(user, password=password)
    for role in roles:
        keystone.assign_project_role_to_user(project, user, role)


def _endpoints(keystone: Any, name: str, kind: str, url: str) -> None:
    service = next(iter(keystone.services(type=kind)), None) or keystone.create_service(name=name, type=kind)
    for interface in ("public", "internal"):
        found = list(keystone.endpoints(service_id=service.id, interface=interface, region_id=REGION))
        if not found:
            keystone.create_endpoint(service_id=service.id, interface=interface, url=url, region_id=REGION)
        elif found[0].url != url:
            keystone.update_endpoint(found[0], url=url)


def identity(ctx: Context) -> None:
    """Service users (admin + service roles in `service`), the tenant project and its member, the catalog."""
    conn = admin(ctx)
    keystone: Any = conn.identity
    admin_role, service_role, member_role = (_role(keystone, name) for name in ("admin", "service", "member"))
    service_project = _project(keystone, "service")
    for user in SERVICE_USERS:
        _user(keystone, user, ctx.secrets["service"], service_project, [admin_role, service_role])
    _user(keystone, MEMBER_USER, ctx.secrets["member"], _project(keystone, PROJECT), [member_role])
    for name, kind, url in catalog(ctx.lab):
        _endpoints(keystone, name, kind, url)
    conn.close()


def flavors(ctx: Context) -> None:
    """m1.small, m1.medium and m1.large (disk 0: servers boot from volumes)."""
    conn = admin(ctx)
    for name, (vcpus, ram) in FLAVORS.items():
        if conn.compute.find_flavor(name) is None:
            conn.compute.create_flavor(name=name, vcpus=vcpus, ram=ram, disk=0, is_public=True)
    conn.close()


def network(ctx: Context) -> None:
    """A shared VLAN network with an IPv4 subnet (no DHCP: there is no agent)."""
    conn = admin(ctx)
    found = conn.network.find_network(NETWORK) or conn.network.create_network(
        name=NETWORK,
        shared=True,
        provider_network_type="vlan",
        provider_physical_network="physnet1",
        provider_segmentation_id=100,
    )
    if conn.network.find_subnet(SUBNET) is None:
        conn.network.create_subnet(
            name=SUBNET,
            network_id=found.id,
            ip_version=4,
            cidr=SUBNET_CIDR,
            gateway_ip="192.0.2.1",
            enable_dhcp=False,
        )
    conn.close()


def volume_type(ctx: Context) -> None:
    """The volume type of the file backend (also Cinder's default type in the lab)."""
    conn = admin(ctx)
    if conn.block_storage.find_type(VOLUME_TYPE) is None:
        conn.block_storage.create_type(
            name=VOLUME_TYPE, is_public=True, extra_specs={"volume_backend_name": VOLUME_BACKEND}
        )
    conn.close()


# What to create once a service's API is up (and the catalog is registered).
RESOURCES = {"nova": flavors, "neutron": network, "cinder": volume_type}


def _count(lab: Lab, query: str) -> int:
    try:
        return int(infra.sql(lab, query).strip() or 0)
    except (processes.LabError, ValueError):
        return 0


def sql_now() -> str:
    """Now, as MariaDB compares the services' (naive UTC) timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _reported_since(binary: str, since: str) -> str:
    # A service row is created when the service first starts and its updated_at moves when the
    # service reports in (5 s after it has fully started); rows left from before a restart do not
    # count. (Every query here is built from the lab's constants and its own clock, never input.)
    return (
        f"SELECT COUNT(*) FROM nova.services WHERE `binary`='{binary}' AND deleted=0 "  # noqa: S608
        f"AND (created_at >= '{since}' OR updated_at >= '{since}');"
    )


def start_compute(ctx: Context, conductor_started: str) -> None:
    """Start nova-compute once nova-conductor serves, map its host into the cell, wait until it reports.

    nova-compute blocks for 10 s per attempt while no conductor answers, so it starts only after
    the conductor (launched at ``conductor_started``) is up; the host mapping is made by
    `discover_hosts` as soon as the compute node exists instead of by the scheduler's periodic
    discovery, which can take half a minute to come round.
    """
    lab = ctx.lab
    processes.wait_until(
        "nova-conductor",
        lambda: _count(lab, _reported_since("nova-conductor", conductor_started)) > 0,
        120,
        lab.log / "nova-conductor.log",
        "nova-conductor",
        lab,
    )
    compute_started = sql_now()
    services.launch_worker(ctx, "nova-compute")
    mapped = f"SELECT COUNT(*) FROM nova_api.host_mappings WHERE host='{COMPUTE_HOST}';"  # noqa: S608
    if _count(lab, mapped) == 0:
        node = f"SELECT COUNT(*) FROM nova.compute_nodes WHERE host='{COMPUTE_HOST}' AND deleted=0;"  # noqa: S608
        processes.wait_until(
            "nova-compute node record",
            lambda: _count(lab, node) > 0,
            180,
            lab.log / "nova-compute.log",
            "nova-compute",
            lab,
        )
        processes.run_step(
            lab,
            "nova-discover-hosts",
            services.tool(ctx, "nova", "nova-manage", "cell_v2", "discover_hosts"),
            services.env(ctx, "nova"),
        )
    provider = f"SELECT COUNT(*) FROM placement.resource_providers WHERE name='{COMPUTE_HOST}';"  # noqa: S608
    processes.wait_until(
        "nova-compute registration",
        lambda: _count(lab, _reported_since("nova-compute", compute_started)) * _count(lab, provider) > 0,
        180,
        lab.log / "nova-compute.log",
        "nova-compute",
        lab,
    )


def write_clouds(ctx: Context) -> None:
    """clouds.yaml (0600) with the admin and member clouds."""

    def cloud(username: str, password: str, project: str) -> dict[str, Any]:
        return {
            "auth": {
                "auth_url": ctx.auth_url,
                "username": username,
                "password": password,
                "project_name": project,
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            "region_name": REGION,
            "identity_api_version": 3,
            "interface": "public",
        }

    clouds = {
        "clouds": {
            ADMIN_CLOUD: cloud("admin", ctx.secrets["admin"], "admin"),
            MEMBER_CLOUD: cloud(MEMBER_USER, ctx.secrets["member"], PROJECT),
        }
    }
    write_private(ctx.lab.clouds_yaml, yaml.safe_dump(clouds, sort_keys=False))
