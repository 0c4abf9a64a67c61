"""`vmferry validate` and `vmferry snapshots` against the simulator, as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.vsphere.conftest import VcsimServer
from tests.vsphere.lab import Lab, VmSpec
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.snapshots import take_pass_snapshot


def _env(vcsim: VcsimServer, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "sources:\n"
        f"  lab: {{host: {vcsim.host}, port: {vcsim.port}, user: {vcsim.user},"
        f" password_file: {vcsim.password_file}, ca_file: {vcsim.ca_file}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFERRY_")}
    return env | {"VMFERRY_CONFIG": str(config), "COLUMNS": "200"}


def _vmferry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_validate_prints_findings_and_gates_on_blockers(lab: Lab, vcsim: VcsimServer, tmp_path: Path) -> None:
    lab.create_vm(VmSpec(name="fine one", folder="wave1"))
    lab.create_vm(VmSpec(name="indep", folder="wave1", disk_mode="independent_persistent"))
    env = _env(vcsim, tmp_path)

    done = _vmferry(env, "--json", "validate", "--source", "lab", "--folder", "wave1", "--mode", "warm")
    assert done.returncode == 1, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    by_vm = {row["vm"]: row for row in rows}
    assert set(by_vm) == {"fine one", "indep"}
    codes = {f["code"] for f in by_vm["indep"]["findings"] if f["severity"] == "blocker"}
    assert "independent-disk" in codes
    assert all(f["severity"] != "blocker" for f in by_vm["fine one"]["findings"])
    assert all(f["fix"] for row in rows for f in row["findings"])

    human = _vmferry(env, "validate", "--source", "lab", "--vm", "fine one")
    assert human.returncode == 0 and "fine one" in human.stdout
    missing = _vmferry(env, "validate", "--source", "lab", "--vm", "no such vm")
    assert missing.returncode == 2 and "no such vm" in missing.stderr and "fix:" in missing.stderr


def test_snapshots_list_and_sweep(
    lab: Lab, vcsim: VcsimServer, client: VsphereClient, tmp_path: Path
) -> None:
    vm = lab.create_vm(VmSpec(name="left over", disks=(1 << 20,)))
    take_pass_snapshot(client, vm._moId, request_id="old-req", vm_key="vm-0", pass_no=1)
    env = _env(vcsim, tmp_path)

    listed = json.loads(_vmferry(env, "--json", "snapshots", "--source", "lab").stdout)
    assert [s["snapshot"] for s in listed["found"]] == ["vmferry-old-req-pass1"]
    swept = json.loads(_vmferry(env, "--json", "snapshots", "--source", "lab", "--sweep").stdout)
    assert [s["vm"] for s in swept["removed"]] == ["left over"]
    assert lab.vmferry_snapshots() == []
