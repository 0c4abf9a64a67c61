"""Configuration files of the six OpenStack services, generated for one lab.

Only settings the lab depends on are written; everything else keeps the services' defaults. Files
are 0600 (they hold the lab's generated passwords).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from labctl import infra
from labctl.layout import COMPUTE_HOST, REGION, VOLUME_BACKEND, VOLUME_TYPE, Lab, write_private

Sections = dict[str, dict[str, str]]


@dataclass(frozen=True)
class Context:
    """What every config needs: the lab, its passwords and the venv the services run from."""

    lab: Lab
    secrets: dict[str, str]
    venv: Path

    def db(self, name: str) -> str:
        """URL of one of the lab's databases."""
        return infra.database_url(self.lab, self.secrets["database"], name)

    @property
    def transport(self) -> str:
        """URL of the lab's broker."""
        return infra.transport_url(self.lab, self.secrets["rabbit"])

    @property
    def auth_url(self) -> str:
        """Keystone v3."""
        return self.lab.url("keystone", "/v3")

    def service_auth(self, user: str) -> dict[str, str]:
        """keystoneauth password options for a service user in the `service` project."""
        return {
            "auth_type": "password",
            "auth_url": self.auth_url,
            "username": user,
            "password": self.secrets["service"],
            "project_name": "service",
            "user_domain_name": "Default",
            "project_domain_name": "Default",
            "region_name": REGION,
        }

    def authtoken(self, user: str) -> dict[str, str]:
        """keystonemiddleware settings of a service's API."""
        return {
            "www_authenticate_uri": self.auth_url,
            "service_token_roles_required": "true",
            **self.service_auth(user),
        }

    def common(self, service: str) -> Sections:
        """Sections every service shares: locks, notifications off, quick shutdown."""
        return {
            "DEFAULT": {"debug": "false", "graceful_shutdown_timeout": "5"},
            "oslo_concurrency": {"lock_path": str(self.lab.lock / service)},
            "oslo_messaging_notifications": {"driver": "noop"},
        }


def render(sections: Sections) -> str:
    """INI text in oslo.config's format."""
    lines = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in options.items()]
        lines.append("")
    return "\n".join(lines)


def merge(*parts: Sections) -> Sections:
    """Merge section dicts, later options winning."""
    merged: Sections = {}
    for part in parts:
        for section, options in part.items():
            merged.setdefault(section, {}).update(options)
    return merged


def keystone(ctx: Context) -> Sections:
    """Keystone with fernet tokens and no cache server."""
    keys = ctx.lab.data / "keystone"
    return merge(
        ctx.common("keystone"),
        {
            "database": {"connection": ctx.db("keystone")},
            "token": {"provider": "fernet"},
            "fernet_tokens": {"key_repository": str(keys / "fernet-keys")},
            "credential": {"key_repository": str(keys / "credential-keys")},
            # An in-process cache (one keystone process) cuts token validation from ~0.5 s to ~10 ms.
            "cache": {"enabled": "true", "backend": "dogpile.cache.memory"},
            # Every service authenticates with a password; bcrypt's default cost (12) makes each
            # check take ~0.3 s of CPU, which a throwaway lab on 2 cores cannot afford.
            "identity": {"password_hash_rounds": "4"},
        },
    )


def glance(ctx: Context) -> Sections:
    """Glance with a file store in the lab dir."""
    data = ctx.lab.data / "glance"
    return merge(
        ctx.common("glance"),
        {
            "DEFAULT": {"enabled_backends": "file:file", "workers": "1"},
            "database": {"connection": ctx.db("glance")},
            "keystone_authtoken": ctx.authtoken("glance"),
            "paste_deploy": {
                "flavor": "keystone",
                "config_file": str(ctx.lab.etc / "glance" / "glance-api-paste.ini"),
            },
            "glance_store": {"default_backend": "file"},
            "file": {"filesystem_store_datadir": str(data / "images")},
            "os_glance_staging_store": {"filesystem_store_datadir": str(data / "staging")},
            "os_glance_tasks_store": {"filesystem_store_datadir": str(data / "tasks")},
        },
    )


def placement(ctx: Context) -> Sections:
    """Placement."""
    return merge(
        ctx.common("placement"),
        {
            "placement_database": {"connection": ctx.db("placement")},
            "api": {"auth_strategy": "keystone"},
            "keystone_authtoken": ctx.authtoken("placement"),
        },
    )


def cinder(ctx: Context) -> Sections:
    """Cinder with the lab's file-backed driver as its only backend."""
    lab = ctx.lab
    privsep_helper = f"{ctx.venv / 'bin' / 'privsep-helper'} --config-file {config_file(lab, 'cinder')}"
    return merge(
        ctx.common("cinder"),
        {
            "DEFAULT": {
                "transport_url": ctx.transport,
                "auth_strategy": "keystone",
                "host": "vmferry-storage",
                "my_ip": "127.0.0.1",
                "state_path": str(lab.data / "cinder"),
                "api_paste_config": str(lab.etc / "cinder" / "api-paste.ini"),
                "enabled_backends": VOLUME_BACKEND,
                "default_volume_type": VOLUME_TYPE,
                "glance_api_servers": lab.url("glance"),
                "rootwrap_config": str(ctx.venv / "etc" / "cinder" / "rootwrap.conf"),
                # Without it Cinder rejects every list filter (e.g. ?name=) with 400.
                "resource_query_filters_file": str(lab.etc / "cinder" / "resource_filters.json"),
                # Tests run side by side and each VM has replicas and clones: 10 volumes (the
                # default) run out; gigabytes keep their default so quota errors stay testable.
                "quota_volumes": "200",
                "quota_snapshots": "200",
            },
            "database": {"connection": ctx.db("cinder")},
            "keystone_authtoken": ctx.authtoken("cinder"),
            "nova": ctx.service_auth("cinder"),
            "service_user": {"send_service_user_token": "true", **ctx.service_auth("cinder")},
            "coordination": {"backend_url": f"file://{lab.lock / 'cinder'}"},
            # Image code inspects images through privsep, whose default helper runs `sudo`: the lab
            # runs as root, so each privsep context's helper is started directly from the venv.
            **{
                section: {"helper_command": privsep_helper}
                for section in ("cinder_sys_admin", "privsep_osbrick")
            },
            VOLUME_BACKEND: {
                "volume_driver": "vmferry_lab_plugins.cinder_file_driver.FileVolumeDriver",
                "volume_backend_name": VOLUME_BACKEND,
                "vmferry_volumes_dir": str(lab.volumes_dir),
                "vmferry_instances_dir": str(lab.instances_dir),
            },
        },
    )


def neutron(ctx: Context) -> Sections:
    """Neutron ML2 (VLAN tenant networks) with the lab's bind-everything mechanism driver, no agents."""
    return merge(
        ctx.common("neutron"),
        {
            "DEFAULT": {
                "core_plugin": "ml2",
                "service_plugins": "",
                "auth_strategy": "keystone",
                "transport_url": ctx.transport,
                "host": "vmferry-network",
                "state_path": str(ctx.lab.data / "neutron"),
                "api_paste_config": str(ctx.lab.etc / "neutron" / "api-paste.ini"),
                "notify_nova_on_port_status_changes": "true",
                "notify_nova_on_port_data_changes": "true",
                "api_workers": "1",
                "rpc_workers": "1",
                "rpc_state_report_workers": "0",
                "dhcp_agent_notification": "false",
            },
            "database": {"connection": ctx.db("neutron")},
            "keystone_authtoken": ctx.authtoken("neutron"),
            "nova": ctx.service_auth("neutron"),
            "ml2": {
                "type_drivers": "flat,vlan",
                "tenant_network_types": "vlan",
                "mechanism_drivers": "vmferry_bind_all",
                "extension_drivers": "port_security",
            },
            "ml2_type_vlan": {"network_vlan_ranges": "physnet1:100:199"},
            "ml2_type_flat": {"flat_networks": "public"},
        },
    )


def nova(ctx: Context) -> Sections:
    """Nova with the fake hypervisor on one compute host and cells v2 (cell0 + the main cell)."""
    lab = ctx.lab
    return merge(
        ctx.common("nova"),
        {
            "DEFAULT": {
                "transport_url": ctx.transport,
                "compute_driver": "fake.FakeDriverWithoutFakeNodes",
                "host": COMPUTE_HOST,
                "my_ip": "127.0.0.1",
                "state_path": str(lab.data / "nova"),
                "use_rootwrap_daemon": "false",
                "instances_path": str(lab.data / "nova" / "instances"),
                "update_resources_interval": "10",
            },
            "api": {"auth_strategy": "keystone"},
            "wsgi": {"api_paste_config": str(lab.etc / "nova" / "api-paste.ini")},
            "api_database": {"connection": ctx.db("nova_api")},
            "database": {"connection": ctx.db("nova")},
            "keystone_authtoken": ctx.authtoken("nova"),
            "placement": ctx.service_auth("nova"),
            "neutron": ctx.service_auth("nova"),
            "cinder": {"os_region_name": REGION, **ctx.service_auth("nova")},
            "service_user": {"send_service_user_token": "true", **ctx.service_auth("nova")},
            "scheduler": {"discover_hosts_in_cells_interval": "5", "workers": "1"},
            "conductor": {"workers": "1"},
            "vnc": {"enabled": "false"},
            "compute": {"live_migration_wait_for_vif_plug": "false"},
        },
    )


# Files the services need beside their own config, copied from the venv (the Python packages ship them).
SHIPPED_FILES = {
    "glance": ["glance/glance-api-paste.ini"],
    "cinder": ["cinder/api-paste.ini", "cinder/resource_filters.json"],
    "neutron": ["neutron/api-paste.ini"],
    "nova": ["nova/api-paste.ini"],
}
CONFIG_NAMES = {
    "keystone": "keystone.conf",
    "glance": "glance-api.conf",
    "placement": "placement.conf",
    "cinder": "cinder.conf",
    "neutron": "neutron.conf",
    "nova": "nova.conf",
}
BUILDERS = {
    "keystone": keystone,
    "glance": glance,
    "placement": placement,
    "cinder": cinder,
    "neutron": neutron,
    "nova": nova,
}


def config_file(lab: Lab, service: str) -> Path:
    """Path of a service's main configuration file."""
    return lab.etc / service / CONFIG_NAMES[service]


def write_all(ctx: Context) -> None:
    """Write every service's config and the files it ships (paste pipelines, filters); register plugins."""
    for service, build in BUILDERS.items():
        # The state path must exist: nova-compute keeps its node identity there and refuses to
        # start again without it.
        (ctx.lab.data / service).mkdir(exist_ok=True)
        folder = ctx.lab.etc / service
        folder.mkdir(exist_ok=True)
        folder.chmod(0o700)
        write_private(config_file(ctx.lab, service), render(build(ctx)))
        for shipped in SHIPPED_FILES.get(service, []):
            shutil.copyfile(ctx.venv / "etc" / shipped, folder / Path(shipped).name)
    write_plugin_metadata(ctx.lab)


def write_plugin_metadata(lab: Lab) -> None:
    """Register the ML2 driver's entry point: Neutron loads mechanism drivers only by entry-point name.

    The code stays in lab/openstack/plugins (on the services' PYTHONPATH); only this small dist-info,
    which importlib.metadata finds on the same path, is generated. Nothing is installed into the
    shared, cached venv, so checkouts with different plugin code never interfere.
    """
    dist_info = lab.python / "vmferry_lab_plugins-1.0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vmferry-lab-plugins\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[neutron.ml2.mechanism_drivers]\n"
        "vmferry_bind_all = vmferry_lab_plugins.ml2_bind_all:BindAllMechanismDriver\n"
    )
    (dist_info / "top_level.txt").write_text("vmferry_lab_plugins\n")
