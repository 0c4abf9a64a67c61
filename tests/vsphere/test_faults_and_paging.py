"""Paths vcsim-ferry cannot produce: PropertyCollector paging (vcsim ignores maxObjects and never
returns a token) and vSphere faults it never raises. A stand-in collector and hand-made faults
exercise them; everything else is tested against the simulator."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pyVmomi import vim, vmodl

from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.faults import translate_error
from vmferry.adapters.vsphere.settings import VsphereSettings
from vmferry.bus.errors import PermanentError, RetryableError

PC = vmodl.query.PropertyCollector


def content(moref: str, name: str) -> Any:
    obj = vim.VirtualMachine(moref)
    return PC.ObjectContent(obj=obj, propSet=[vmodl.DynamicProperty(name="name", val=name)])


class PagingCollector:
    """Answers like vCenter with maxObjects=2: three pages, linked by tokens."""

    def __init__(self, fail_on_page: int | None = None) -> None:
        self.pages = [
            PC.RetrieveResult(token="t1", objects=[content("vm-1", "a"), content("vm-2", "b")]),
            PC.RetrieveResult(token="t2", objects=[content("vm-3", "c"), content("vm-4", "d")]),
            PC.RetrieveResult(objects=[content("vm-5", "e")]),
        ]
        self.fail_on_page = fail_on_page
        self.continued: list[str] = []
        self.cancelled: list[str] = []

    def RetrievePropertiesEx(self, specs: Any, options: Any) -> Any:
        assert options.maxObjects > 0
        return self.pages[0]

    def ContinueRetrievePropertiesEx(self, token: str) -> Any:
        self.continued.append(token)
        page = int(token[1:])
        if page == self.fail_on_page:
            raise vmodl.fault.SystemError(reason="vpxd restarted")
        return self.pages[page]

    def CancelRetrievePropertiesEx(self, token: str) -> None:
        self.cancelled.append(token)


def client_with(collector: PagingCollector, tmp_path: Any) -> VsphereClient:
    client = VsphereClient(VsphereSettings(host="vc.example", user="u", password_file=tmp_path / "pw"))
    client._content = SimpleNamespace(propertyCollector=collector)  # type: ignore[assignment]
    return client


def test_every_page_is_read(tmp_path: Any) -> None:
    collector = PagingCollector()
    records = client_with(collector, tmp_path).retrieve([])
    assert [r.props["name"] for r in records] == ["a", "b", "c", "d", "e"]
    assert collector.continued == ["t1", "t2"] and collector.cancelled == []


def test_a_failed_page_cancels_the_rest(tmp_path: Any) -> None:
    collector = PagingCollector(fail_on_page=2)
    with pytest.raises(RetryableError, match="reading the inventory failed: SystemError"):
        client_with(collector, tmp_path).retrieve([], doing="reading the inventory")
    assert collector.cancelled == ["t2"]


def test_fault_translation() -> None:
    denied = translate_error(
        vim.fault.NoPermission(
            privilegeId="VirtualMachine.State.CreateSnapshot", object=vim.VirtualMachine("vm-7")
        ),
        "creating a snapshot",
        "vc1",
    )
    assert isinstance(denied, PermanentError)
    assert "VirtualMachine.State.CreateSnapshot" in denied.cause and "vm-7" in denied.fix
    busy = translate_error(vim.fault.TaskInProgress(msg="another task"), "removing a snapshot", "vc1")
    assert isinstance(busy, RetryableError) and "another task" in busy.cause
    gone = translate_error(
        vmodl.fault.ManagedObjectNotFound(obj=vim.VirtualMachine("vm-9")), "reading", "vc1"
    )
    assert isinstance(gone, PermanentError)
    unknown = translate_error(vim.fault.VimFault(msg="odd"), "reading", "vc1")
    assert isinstance(unknown, RetryableError)
    already = PermanentError("x")
    assert translate_error(already, "anything", "vc1") is already
