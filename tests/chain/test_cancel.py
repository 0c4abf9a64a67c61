"""`vmferry cancel` with a pass in flight: its snapshot is removed, no later step does any work for the
request, and the VM's state says who cancelled it."""

from __future__ import annotations

import asyncio

import pytest

from tests.chain.conftest import running_chain
from tests.chain.teardown import removed_from_lab
from vmferry.bus.history import history
from vmferry.bus.publisher import Publisher
from vmferry.cli.config import Settings
from vmferry.cli.operate import cancel
from vmferry.cli.oslab import OpenStackLab
from vmferry.cli.requests import build_request, submit
from vmferry.cli.simlab import MIB, Lab, VcsimServer, VmSpec
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.events import VolumeSynced

EVERYTHING_BUT_TRANSFER = ["intake", "discover", "snapshot", "snapshot-pass", "settle", "cutover", "restore"]


@pytest.mark.timeout(300)
async def test_cancel_removes_the_pass_snapshot_and_stops_every_later_step(
    openstack_lab: OpenStackLab, vcsim: VcsimServer, settings: Settings
) -> None:
    lab = Lab(vcsim)
    made = lab.create_vm(VmSpec(name="to cancel", disks=(4 * MIB, 4 * MIB)))
    key = vm_key_for(made.config.instanceUuid)
    try:
        request = build_request(
            {"options": {"transport": "https", "conversion": "skip"}},
            request_id="cancel-1", source="demo-vcenter", destination="demo-cloud",
            vm_names=("to cancel",), mode="warm",
        )  # fmt: skip
        # without transfer, the pass-1 snapshot stays taken: a pass in flight
        async with running_chain(settings, EVERYTHING_BUT_TRANSFER) as chain:
            session = chain.session
            await submit(Publisher(session.js, session.naming), session.naming, request)
            await chain.until(key, lambda st: st.pass_no == 1)
            assert len(lab.vmferry_snapshots()) == 1
            done = await cancel(session, settings, key, "ops-team", destination=True)
            state = await chain.until(key, lambda st: st.phase == "failed")
        assert done.snapshots_removed == ["vmferry-cancel-1-pass1"]
        assert lab.vmferry_snapshots() == []
        assert state.cancelled is not None and state.cancelled.by == "ops-team"
        assert (
            state.failure is not None and state.failure.step == "cancel" and "ops-team" in state.failure.cause
        )

        # transfer comes up late and finds the cancelled pass's events: it copies nothing
        async with running_chain(settings, ["transfer"]) as chain:
            naming = chain.session.naming
            for _ in range(150):
                info = await chain.session.js.consumer_info(naming.stream, naming.durable("transfer"))
                if info.delivered.consumer_seq >= 2 and not info.num_pending and not info.num_ack_pending:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"transfer did not take both disk events: {info}")
            events = await history(chain.session.js, naming, key)
        assert not [e for e in events if e.event and isinstance(e.event.data, VolumeSynced)]
        assert await removed_from_lab(openstack_lab, key, "to cancel") == [], "no volume was created"
    finally:
        lab.close()
