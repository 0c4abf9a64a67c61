"""Which file of a snapshot each transport reads, and the nbdkit invocations built from it (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.adapters.dataplane import NbdkitFilter, SourceConfigError
from vmferry.adapters.dataplane.snapshot_sources import (
    DatastoreFile,
    FrozenDisk,
    HttpsAccess,
    SshSettings,
    VddkLogin,
    VddkSettings,
    colon_thumbprint,
    https_source,
    local_mount,
    local_source,
    ssh_source,
    vddk_source,
)
from vmferry.bus.connection import Secret

COOKIE = 'vmware_soap_session="5229e0c2-cookie-value"'
SHA1 = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD"


def frozen(backing: str, snapshot: str | None = "snapshot-7") -> FrozenDisk:
    return FrozenDisk("vm-42", snapshot, DatastoreFile.parse(backing), 4 << 20)


def test_backing_files_are_parsed_and_deltas_recognised() -> None:
    base = DatastoreFile.parse("[ferry] vm0001/disk0.vmdk")
    assert (base.datastore, base.path, base.is_delta) == ("ferry", "vm0001/disk0.vmdk", False)
    assert str(base.flat()) == "[ferry] vm0001/disk0-flat.vmdk"
    assert DatastoreFile.parse("[ds 1] web 01/web 01-000002.vmdk").is_delta
    assert not DatastoreFile.parse("[ds1] web/web-01.vmdk").is_delta  # a name, not a delta number
    for bad in (
        "vm/disk.vmdk",
        "[ds1] ",
        "[ds1] ../etc/passwd.vmdk",
        "[ds1] /abs/disk.vmdk",
        "[ds1] vm/x.vmx",
    ):
        with pytest.raises(SourceConfigError):
            DatastoreFile.parse(bad)


def test_https_reads_the_frozen_base_disks_flat_file_with_the_cookie_kept_out_of_argv() -> None:
    access = HttpsAccess("127.0.0.1:8989", "emea/DC1", Secret(COOKIE), Path("/etc/ca.pem"), timeout=30)
    command = https_source(frozen("[ds 1] web 01/web 01.vmdk"), access).nbdkit_command()

    params = dict(command.params)
    assert params["url"] == (
        "https://127.0.0.1:8989/folder/web%2001/web%2001-flat.vmdk?dcPath=emea%2FDC1&dsName=ds+1"
    )
    assert (params["protocols"], params["cainfo"], params["timeout"]) == ("https", "/etc/ca.pem", "30")
    assert [name for name, _ in command.secrets] == ["cookie"]
    assert "cookie-value" not in repr(command.params) + command.description


def test_a_delta_is_refused_by_raw_file_transports_but_not_by_vddk_or_local(tmp_path: Path) -> None:
    delta = frozen("[ds1] web/web-000001.vmdk")
    access = HttpsAccess("vc.example", "DC1", None)
    for build in (lambda: https_source(delta, access), lambda: ssh_source(delta, SshSettings("esx1"))):
        with pytest.raises(SourceConfigError, match="a delta file") as refused:
            build()
        assert "vddk" in refused.value.fix
    login = VddkLogin("vc.example", "migrator", Secret("pw"), SHA1)
    command = vddk_source(delta, VddkSettings(Path("/opt/vddk")), login).nbdkit_command()
    assert dict(command.params)["file"] == "[ds1] web/web-000001.vmdk"
    assert dict(command.params)["snapshot"] == "snapshot-7"
    assert [name for name, _ in command.secrets] == ["password"]
    assert local_source(delta, str(tmp_path)).path == tmp_path / "web/web-000001.vmdk"


def test_local_reads_the_flat_file_when_there_is_one_else_the_descriptor(tmp_path: Path) -> None:
    (tmp_path / "ds1" / "vm").mkdir(parents=True)
    disk = frozen("[ds1] vm/vm.vmdk")
    template = str(tmp_path / "{datastore}")
    assert local_source(disk, template).path == tmp_path / "ds1/vm/vm.vmdk"  # e.g. a sparse VMDK
    (tmp_path / "ds1/vm/vm-flat.vmdk").write_bytes(b"\0" * 512)
    flat = local_source(disk, template, (NbdkitFilter("rate", (("rate", "1M"),)),))
    assert (flat.path, flat.format, flat.filters[0].name) == (tmp_path / "ds1/vm/vm-flat.vmdk", "raw", "rate")
    with pytest.raises(SourceConfigError, match="not an absolute path"):
        local_mount("mnt/ds1", "ds1")


def test_ssh_and_vddk_settings() -> None:
    command = ssh_source(
        frozen("[ds1] vm/vm.vmdk"), SshSettings("esx1", known_hosts=Path("/k"))
    ).nbdkit_command()
    assert dict(command.params)["path"] == "/vmfs/volumes/ds1/vm/vm-flat.vmdk"
    assert colon_thumbprint("aabbccddeeff00112233445566778899aabbccdd") == SHA1
    with pytest.raises(SourceConfigError, match="no snapshot"):
        vddk_source(frozen("[ds1] vm/vm.vmdk", snapshot=None), VddkSettings(Path("/opt/vddk")),
                    VddkLogin("vc", "u", Secret("p"), SHA1))  # fmt: skip
    filtered = vddk_source(
        frozen("[ds1] vm/vm.vmdk"),
        VddkSettings(Path("/opt/vddk")),
        VddkLogin("vc", "u", Secret("p"), SHA1, port=8443),
        (NbdkitFilter("rate", (("rate", "100M"),)),),
    ).nbdkit_command()
    assert [f.name for f in filtered.filters] == ["rate", "cacheextents", "retry"]
    assert dict(filtered.params)["port"] == "8443"
