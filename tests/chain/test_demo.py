"""`vmferry demo`, the README's first command, run as a user runs it: a warm migration end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.cli.oslab import OpenStackLab

MIB = 1024 * 1024


@pytest.mark.timeout(660)
def test_the_demo_migrates_a_vm_with_two_changed_block_passes(
    openstack_lab: OpenStackLab, vcsim_binary: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFERRY_")}
    env |= {"VMFERRY_STATE_DIR": str(tmp_path), "VMFERRY_VCSIM": str(vcsim_binary)}
    done = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "--json", "demo"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)

    assert summary["migrated"] == "completed"
    assert [v["equal"] for v in summary["volumes"]] == [True, True], "every volume equals its source disk"
    passes = summary["passes"]
    assert [p["pass"] for p in passes] == [1, 2, 3], "a full pass, a manual sync and the final pass"
    # the guest rewrites 4 x 128 KiB per disk between passes: CBT passes copy only those blocks
    assert all(p["bytes_copied"] <= 2 * MIB for p in passes[1:])
    types = [e["type"].removeprefix("io.vmferry.").removesuffix(".v1") for e in summary["events"]]
    assert types[:2] == ["vm.discovered", "disk.snapshot.ready"] and types[-2:] == [
        "instance.created",
        "migration.completed",
    ]
    assert types.count("vm.synced") == 3 and types.count("cutover.requested") == 1
    assert summary["snapshots_left"] == [], "every pass snapshot was released"
    assert summary["rejected"] == "failed" and "no-such-vcenter" in summary["rejection"]

    conn = openstack_lab.connect(openstack_lab.admin_cloud)
    try:
        assert conn.compute.find_server(summary["server_id"]) is None, "the demo removes what it made"
        left = [v.id for v in conn.block_storage.volumes(details=True) if
                (v.metadata or {}).get("vmferry_vm") == summary["vm_key"]]  # fmt: skip
        assert left == []
    finally:
        conn.close()
