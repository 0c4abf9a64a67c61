"""Inventory against vcsim-ferry: the full read of a VM, and selector resolution by name (with
awkward characters), folder, moref and instanceUuid, including the errors that list candidates."""

from __future__ import annotations

import threading

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.vsphere.lab import MIB, Lab, Nic, VmSpec, request
from vmferry.adapters.vsphere.aio import AsyncVsphere, VsphereClients
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import VmEntry, discover, load_index, resolve, unescape_name
from vmferry.bus.errors import PermanentError
from vmferry.schemas.base import vm_key_for
from vmferry.schemas.request import VmSelector


def names(entries: list[VmEntry]) -> list[str]:
    return sorted(e.name for e in entries)


def test_a_three_disk_two_nic_vm_is_discovered_fully(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(
        VmSpec(
            name="web-01",
            folder="prod",
            disks=(4 * MIB, 8 * MIB, 2 * MIB),
            nics=(
                Nic(mac="00:50:56:AA:00:01"),
                Nic(mac="00:50:56:aa:00:02", distributed=True, adapter="e1000e"),
            ),
            guest_id="rhel8_64Guest",
            firmware="efi",
            cpus=4,
            memory_mb=2048,
            cbt=True,
        )
    )
    WaitForTask(vm.CreateSnapshot_Task(name="before upgrade", memory=False, quiesce=False))
    WaitForTask(vm.PowerOnVM_Task())
    config = vm.config

    [found] = discover(client, request({"name": "web-01"}))

    event, facts = found.vm, found.facts
    assert event.request_id == "req-1"
    assert event.vm_key == vm_key_for(config.instanceUuid)
    assert event.identity.instance_uuid == config.instanceUuid
    assert event.identity.bios_uuid == config.uuid
    assert event.identity.moref == vm._moId
    assert event.identity.name == "web-01"
    assert (event.cpus, event.memory_mib, event.firmware) == (4, 2048, "efi")
    assert event.guest_id == "rhel8_64Guest"
    assert event.power_state == "poweredOn"
    assert event.tools_status == "guestToolsNotRunning"
    assert (event.host, event.cluster) == (lab.host.name, lab.host.parent.name)
    assert [(d.controller, d.bus_number, d.unit_number, d.capacity_bytes) for d in event.disks] == [
        ("pvscsi", 0, 0, 4 * MIB),
        ("pvscsi", 0, 1, 8 * MIB),
        ("pvscsi", 0, 2, 2 * MIB),
    ]
    vm_disks = [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    vm_disks.sort(key=lambda d: d.unitNumber)
    for disk, source in zip(event.disks, vm_disks, strict=True):
        assert disk.key == source.key
        assert disk.backing_file == source.backing.fileName
        assert disk.datastore == "ferry"
        assert (disk.thin, disk.disk_mode, disk.rdm, disk.sharing) == (
            True,
            "persistent",
            False,
            "sharingNone",
        )
        assert disk.cbt_enabled
    assert [(n.mac, n.adapter_type, n.network, n.distributed) for n in event.nics] == [
        ("00:50:56:aa:00:01", "vmxnet3", "VM Network", False),
        ("00:50:56:aa:00:02", "e1000e", lab.dvpg.name, True),
    ]
    assert event.snapshots == ["before upgrade"]
    assert facts.folder == "/DC0/vm/prod" and facts.datacenter == "DC0"
    assert facts.cbt_enabled and not facts.template and not facts.consolidation_needed
    assert [s.name for s in facts.snapshots] == ["before upgrade"]
    assert facts.datastores  # the disks' datastore, for the privilege check


AWKWARD = ['db "primary"', "with space", "Zürich-ß-日本", "it's"]


def test_selectors_match_names_with_quotes_spaces_non_ascii_and_slashes(
    lab: Lab, client: VsphereClient
) -> None:
    for i, name in enumerate(AWKWARD):
        lab.create_vm(VmSpec(name=name, nics=(Nic(mac=f"00:50:56:bb:00:{i:02x}"),)))
    # vCenter stores "a/b" as "a%2fb"; vcsim keeps what it is given, so make both forms
    lab.create_vm(VmSpec(name="a%2fb"))
    lab.create_vm(VmSpec(name="x/y"))
    lab.create_vm(VmSpec(name="100%25 done"))
    index = load_index(client)

    for name in AWKWARD:
        assert names(resolve(index, [VmSelector(name=name)])) == [name]
    assert names(resolve(index, [VmSelector(name="a/b")])) == ["a/b"]
    assert names(resolve(index, [VmSelector(name="a%2fb")])) == ["a/b"]  # the escaped form works too
    assert names(resolve(index, [VmSelector(name="x/y")])) == ["x/y"]
    assert names(resolve(index, [VmSelector(name="100% done")])) == ["100% done"]
    assert unescape_name("a%2Fb%5Cc%25d") == "a/b\\c%d"
    all_of_them = resolve(index, [VmSelector(name=n) for n in [*AWKWARD, "a/b", AWKWARD[0]]])
    assert len(all_of_them) == len(AWKWARD) + 1  # each VM once


def test_two_vms_with_one_name_are_an_error_listing_both(lab: Lab, client: VsphereClient) -> None:
    first = lab.create_vm(VmSpec(name="twin", folder="team-a"))
    second = lab.create_vm(VmSpec(name="twin", folder="team-b/inner"))

    with pytest.raises(PermanentError) as error:
        discover(client, request({"name": "twin"}))

    cause = error.value.cause
    assert "2 VMs are named 'twin'" in cause
    assert f"{first._moId} at /DC0/vm/team-a" in cause
    assert f"{second._moId} at /DC0/vm/team-b/inner" in cause
    assert "moref" in error.value.fix
    [picked] = discover(client, request({"moref": second._moId}))
    assert picked.facts.folder == "/DC0/vm/team-b/inner"


def test_an_unknown_name_lists_close_names(lab: Lab, client: VsphereClient) -> None:
    lab.create_vm(VmSpec(name="web-01"))
    lab.create_vm(VmSpec(name="database"))
    with pytest.raises(PermanentError) as error:
        discover(client, request({"name": "web-O1"}))
    assert "no VM is named 'web-O1'" in error.value.cause
    assert "'web-01'" in error.value.cause and "database" not in error.value.cause


def test_every_unresolvable_selector_is_reported_at_once(lab: Lab, client: VsphereClient) -> None:
    lab.create_vm(VmSpec(name="known"))
    with pytest.raises(PermanentError) as error:
        discover(client, request({"name": "ghost"}, {"name": "known"}, {"moref": "vm-99999"}))
    assert "selector 1: no VM is named 'ghost'" in error.value.cause
    assert "selector 2: no VM has the managed object reference 'vm-99999'" in error.value.cause


def test_folders_select_every_vm_below_them(lab: Lab, client: VsphereClient) -> None:
    lab.create_vm(VmSpec(name="web-1", folder="prod/web"))
    lab.create_vm(VmSpec(name="web-2", folder="prod/web"))
    lab.create_vm(VmSpec(name="db-1", folder="prod/db"))
    lab.create_vm(VmSpec(name="test-1", folder="test"))
    template = lab.create_vm(VmSpec(name="golden", folder="prod"))
    template.MarkAsTemplate()
    index = load_index(client)

    assert names(resolve(index, [VmSelector(folder="prod")])) == ["db-1", "web-1", "web-2"]  # no template
    assert names(resolve(index, [VmSelector(folder="/DC0/vm/prod/web/")])) == ["web-1", "web-2"]
    assert names(resolve(index, [VmSelector(folder="prod/db")], datacenter="DC0")) == ["db-1"]
    with pytest.raises(PermanentError, match=r"no VM folder 'prod/wbe'.*close folders: /DC0/vm/prod/web"):
        resolve(index, [VmSelector(folder="prod/wbe")])


def test_moref_instance_uuid_and_datacenter_scoping(lab: Lab, client: VsphereClient) -> None:
    vm = lab.create_vm(VmSpec(name="one"))
    index = load_index(client)
    uuid = vm.config.instanceUuid
    assert names(resolve(index, [VmSelector(moref=vm._moId)])) == ["one"]
    assert names(resolve(index, [VmSelector(instance_uuid=uuid.upper())])) == ["one"]
    assert names(resolve(index, [VmSelector(instance_uuid=uuid.replace("-", ""))])) == ["one"]
    with pytest.raises(PermanentError, match="no VM is named 'one' in datacenter 'DC9'"):
        resolve(index, [VmSelector(name="one")], datacenter="DC9")
    with pytest.raises(PermanentError, match="instance UUID"):
        resolve(index, [VmSelector(instance_uuid="00000000-0000-0000-0000-000000000000")])


async def test_the_async_facade_runs_calls_in_worker_threads(lab: Lab) -> None:
    lab.create_vm(VmSpec(name="async-vm"))
    clients = VsphereClients({"lab": lab.settings()})
    try:
        client = await clients("lab")
        assert await clients("lab") is client  # connected once, then reused
        loop_thread = threading.get_ident()
        ran_in = await client.run(lambda _client: threading.get_ident())
        assert ran_in != loop_thread
        found = await client.discover(request({"name": "async-vm"}))
        assert [f.vm.identity.name for f in found] == ["async-vm"]
        with pytest.raises(PermanentError, match="not configured"):
            await clients("elsewhere")
    finally:
        await clients.close()


async def test_connect_through_the_facade(lab: Lab) -> None:
    client = await AsyncVsphere.connect(lab.settings())
    try:
        assert client.sync.login_generation == 1
    finally:
        await client.close()
