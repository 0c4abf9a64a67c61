"""The command line end to end, as an operator uses it: `up` in one process, the rest in others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.cli.config import ConfigError, load

VMFERRY = [sys.executable, "-m", "vmferry.cli.main"]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "sources:\n  vc: {host: 127.0.0.1, user: migrator}\ndestinations:\n  lab: {cloud: vmferry-admin}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFERRY_")}
    return env | {
        "VMFERRY_CONFIG": str(config),
        "VMFERRY_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }


def vmferry(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*VMFERRY, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"vmferry {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def as_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(vmferry(env, "--json", *args).stdout)


@pytest.fixture
def up(cli_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([*VMFERRY, "up", "-f", "intake"], env=cli_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    record = tmp_path / "state" / "embedded.json"
    deadline = time.monotonic() + 30
    while not record.exists() or vmferry(cli_env, "status", check=False).returncode != 0:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "vmferry up did not come up"
        time.sleep(0.2)
    yield process
    if process.poll() is None:
        process.terminate()  # graceful: `up` stops its embedded server
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()


def wait_for_phase(env: dict[str, str], key: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = as_json(env, "status", key) if _known(env, key) else []
        if states and states[0]["phase"] == phase:
            return dict(states[0])
        time.sleep(0.2)
    raise AssertionError(f"{key} never reached {phase}")


def _known(env: dict[str, str], key: str) -> bool:
    return any(s["key"] == key for s in as_json(env, "status"))


def test_up_migrate_status_events_replay(cli_env: dict[str, str], up: subprocess.Popen[str],
                                         tmp_path: Path) -> None:  # fmt: skip
    submitted = as_json(cli_env, "migrate", "--source", "vc", "--destination", "lab", "--vm", "web 01",
                        "--network", "VM Network=private", "--request-id", "cli1")  # fmt: skip
    assert submitted == {"request_id": "cli1", "key": "req-cli1", "duplicate": False}
    again = as_json(cli_env, "migrate", "--source", "vc", "--destination", "lab", "--vm", "web 01",
                    "--network", "VM Network=private", "--request-id", "cli1")  # fmt: skip
    assert again["duplicate"] is True

    state = wait_for_phase(cli_env, "req-cli1", "accepted")
    assert state["steps"]["intake"]["status"] == "done"
    history = as_json(cli_env, "events", "req-cli1")
    assert [e["type"] for e in history] == [
        "io.vmferry.migration.requested.v1",
        "io.vmferry.migration.accepted.v1",
    ]
    assert history[0]["data"]["request"]["vms"] == [{"name": "web 01"}]
    human = vmferry(cli_env, "events", "req-cli1").stdout
    assert "migration.accepted" in human and "intake" in human

    as_json(
        cli_env, "migrate", "--source", "vc-typo", "--destination", "lab", "--vm", "x", "--request-id", "cli2"
    )
    failed = wait_for_phase(cli_env, "req-cli2", "failed")
    assert "'vc-typo'" in failed["failure"]["cause"] and failed["failure"]["fix"]
    detail = vmferry(cli_env, "status", "req-cli2").stdout
    assert "fix:" in detail and "vmferry replay req-cli2" in detail
    replayed = as_json(cli_env, "replay", "req-cli2")
    assert replayed["generation"] == 1 and replayed["key"] == "req-cli2"
    wait_for_phase(cli_env, "req-cli2", "failed")
    types = [e["type"] for e in as_json(cli_env, "events", "req-cli2")]
    assert types.count("io.vmferry.migration.requested.v1") == 2  # the original and the replayed copy

    waited = as_json(cli_env, "migrate", "--wait", "--timeout", "20", "--source", "nope",
                     "--destination", "lab", "--vm", "y", "--request-id", "cli3")  # fmt: skip
    assert waited[0]["key"] == "req-cli3" and waited[0]["phase"] == "failed"

    up.send_signal(signal.SIGTERM)
    assert up.wait(30) == 0
    assert not (tmp_path / "state" / "embedded.json").exists()


def test_errors_are_one_line_with_a_fix(cli_env: dict[str, str]) -> None:
    bad_request = vmferry(cli_env, "migrate", "--vm", "x", "--destination", "lab", check=False)
    assert bad_request.returncode == 2
    assert "invalid migration request" in bad_request.stderr and "`source`" in bad_request.stderr
    no_server = vmferry(cli_env | {"VMFERRY_NATS_URL": "nats://127.0.0.1:9"}, "status", check=False)
    assert no_server.returncode == 2
    assert "cannot reach NATS at nats://127.0.0.1:9" in no_server.stderr and "fix:" in no_server.stderr
    not_up = vmferry(cli_env, "--json", "status", check=False)
    assert not_up.returncode == 2 and "vmferry up" in json.loads(not_up.stdout)["fix"]
    bad_pair = vmferry(cli_env, "migrate", "--source", "vc", "--destination", "lab", "--vm", "x",
                       "--network", "novalue", check=False)  # fmt: skip
    assert bad_pair.returncode == 2 and "SOURCE=TARGET" in bad_pair.stderr


def test_request_file_and_secret_refusal(cli_env: dict[str, str], tmp_path: Path) -> None:
    request = tmp_path / "request.yaml"
    request.write_text("request_id: f1\nsource: {name: vc, password: hunter2}\ndestination: {cloud: lab}\n"
                       "vms: [{name: a}]\n")  # fmt: skip
    refused = vmferry(cli_env, "migrate", "-f", str(request), check=False)
    assert refused.returncode == 2
    assert "secrets never travel" in refused.stderr and "hunter2" not in refused.stderr


def test_stream_limits_come_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("streams: {replicas: 3, duplicate_window_s: 600, event_max_age_days: 7}\n")
    limits = load(config, env={}).limits
    assert (limits.replicas, limits.duplicate_window_s, limits.event_max_age_s) == (3, 600, 7 * 24 * 3600)
    config.write_text("streams: {replicas: 9}\n")
    with pytest.raises(ConfigError, match=r"replicas"):
        load(config, env={})


def test_source_transports_and_conversion_hosts_come_from_the_config_file(tmp_path: Path) -> None:
    from vmferry.bus.handles import BusHandle  # noqa: PLC0415
    from vmferry.cli.wiring import dependencies_for  # noqa: PLC0415

    config = tmp_path / "config.yaml"
    config.write_text(
        "sources:\n"
        "  vc: {host: vc.example, vddk: {libdir: /opt/vddk, transports: [nbdssl]},"
        " ssh: {host: esxi1.example, identity_file: /etc/vmferry/id_ed25519}}\n"
        "destinations:\n  cloud: {conversion_host_id: 5a3e, device_root: /host}\n"
        "conversion: {work_dir: /var/lib/vmferry/work, virtio_win: /srv/virtio-win.iso}\n"
    )
    deps = dependencies_for(load(config, env={}), BusHandle())
    transport = deps.transports["vc"]
    assert transport.vddk is not None and transport.vddk.transports == ("nbdssl",)
    assert transport.ssh is not None and str(transport.ssh.identity) == "/etc/vmferry/id_ed25519"
    assert deps.device_root("5a3e") == Path("/host") and deps.work_dir == Path("/var/lib/vmferry/work")
    assert deps.conversion.virtio_win == Path("/srv/virtio-win.iso")
    config.write_text("sources:\n  vc: {host: vc.example, vddk: {transports: [nbd]}}\n")
    with pytest.raises(ConfigError, match=r"libdir"):
        load(config, env={})
