"""A cold migration through every function, failing after cutover: the source is powered back on,
no snapshot is left, the copied replica stays, and the failure names the cause and the fix."""

from __future__ import annotations

import pytest

from tests.chain.conftest import running_chain
from tests.chain.teardown import removed_from_lab
from vmferry.bus.publisher import Publisher
from vmferry.cli.config import Settings
from vmferry.cli.oslab import OpenStackLab
from vmferry.cli.requests import build_request, submit
from vmferry.cli.simlab import MIB, Lab, Nic, VcsimServer, VmSpec, write
from vmferry.schemas.base import vm_key_for


@pytest.mark.timeout(400)
async def test_a_failure_after_cutover_powers_the_source_back_on_and_leaves_no_snapshot(
    openstack_lab: OpenStackLab, vcsim: VcsimServer, settings: Settings
) -> None:
    lab = Lab(vcsim)
    made = lab.create_vm(VmSpec(name="cold db", disks=(8 * MIB,), nics=(Nic(mac="00:50:56:00:c0:1d"),)))
    key = vm_key_for(made.config.instanceUuid)
    try:
        made.PowerOnVM_Task()
        write(lab.flat_file(made.config.hardware.device[-2].backing.fileName), 3 * MIB, b"cold" * 1000)
        async with running_chain(settings) as chain:
            request = build_request(
                {"options": {"transport": "https", "conversion": "skip"}},
                request_id="cold-1", source="demo-vcenter", destination="demo-cloud",
                vm_names=("cold db",), networks=("VM Network=no-such-network",),
            )  # fmt: skip
            await submit(Publisher(chain.session.js, chain.session.naming), chain.session.naming, request)
            failed = await chain.until(key, lambda st: st.phase == "failed")
            restored = await chain.until(
                key, lambda st: st.source_power is not None and st.source_power.restored_at is not None
            )
        assert failed.failure is not None and failed.failure.step == "launch"
        assert "no-such-network" in failed.failure.cause and failed.failure.fix
        assert failed.passes_synced == 1
        assert lab.vm(made._moId).runtime.powerState == "poweredOn", "restore powered the source on"
        assert restored.sync is not None and len(restored.sync.volumes) == 1, "the replica is kept"
        assert lab.vmferry_snapshots() == []
    finally:
        await removed_from_lab(openstack_lab, key, "cold db")
        lab.close()
