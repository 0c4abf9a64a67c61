"""The OpenStack lab as a session fixture: started once (or reused if already running), stopped at the end.

The lab is the project's own (lab/openstack/start): real Keystone, Glance, Placement, Cinder, Neutron
and Nova with Nova's fake hypervisor and file-backed volumes. A lab that was running before the
session is left running; one the session started is stopped unless VMFERRY_LAB_KEEP=1.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_component
from vmferry.cli.oslab import LAB_SCRIPTS, OpenStackLab, load_lab

__all__ = ["OpenStackLab", "openstack_lab", "wait_for"]
# A start on a fresh machine installs packages and builds the lab's venv (~2 min) before starting
# the lab (~1.5-2 min); it must finish inside the tests' 900 s pytest timeout.
START_TIMEOUT = 840
HOW = "run lab/openstack/start (needs root or sudo for apt, and PyPI access for the first venv build)"


def _run(script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAB_SCRIPTS / script)], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def openstack_lab() -> Iterator[OpenStackLab]:
    """The running lab; started for this session unless one is already up."""
    try:
        import openstack  # noqa: F401, PLC0415
    except ImportError:
        missing_component("openstacksdk", "pip install openstacksdk into the project venv")
    status = _run("status", 60)
    was_running = status.returncode == 0
    if not was_running:
        try:
            status = _run("start", START_TIMEOUT)
        except subprocess.TimeoutExpired:
            missing_component("the OpenStack lab", f"{HOW}; it did not start within {START_TIMEOUT} s")
        if status.returncode != 0:
            tail = "\n".join(status.stderr.strip().splitlines()[-20:])
            missing_component("the OpenStack lab", f"{HOW}; it failed:\n{tail}")
    # Both scripts end their output with the clouds.yaml path; lab.json sits beside it.
    clouds_yaml = Path(status.stdout.split()[-1])
    lab = load_lab(clouds_yaml.parent / "lab.json")
    try:
        yield lab
    finally:
        if not was_running and os.environ.get("VMFERRY_LAB_KEEP") != "1":
            _run("stop", 120)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 120, interval: float = 0.5) -> Any:
    """Poll until ``probe`` returns something truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
