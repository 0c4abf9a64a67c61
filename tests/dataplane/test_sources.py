"""Disk sources: argument lists, validation, local VMDK layouts, and the nbdkit server's life cycle."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.dataplane.conftest import DISK_SIZE, Images
from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.errors import SourceStartError
from vmferry.adapters.dataplane.nbdkit import NbdkitCommand, NbdkitFilter, NbdkitServer, SecretPassing
from vmferry.adapters.dataplane.sources import (
    HttpsSource,
    LocalSource,
    SourceConfigError,
    SshSource,
    VddkSource,
    datastore_folder_url,
    inspect_local_disk,
)
from vmferry.bus.connection import Secret

THUMBPRINT = ":".join(["AB"] * 20)
PASSWORD = "vddk-Pa55word-do-not-leak"


def vddk_source(**changes: object) -> VddkSource:
    settings: dict[str, object] = {
        "libdir": Path("/opt/vmware-vix-disklib-distrib"),
        "server": "vcenter.example.test",
        "user": "migrator@vsphere.local",
        "password": Secret(PASSWORD),
        "thumbprint": THUMBPRINT,
        "vm_moref": "vm-1042",
        "snapshot_moref": "snapshot-7",
        "file": "[datastore1] web01/web01.vmdk",
    }
    settings.update(changes)
    return VddkSource(**settings)  # type: ignore[arg-type]


def test_vddk_command_has_every_production_setting_and_no_password() -> None:
    command = vddk_source(port=8443).nbdkit_command()
    assert command.plugin == "vddk"
    assert dict(command.params) == {
        "libdir": "/opt/vmware-vix-disklib-distrib",
        "server": "vcenter.example.test",
        "user": "migrator@vsphere.local",
        "thumbprint": THUMBPRINT,
        "vm": "moref=vm-1042",
        "snapshot": "snapshot-7",
        "transports": "file:nbdssl:nbd",
        "compression": "fastlz",
        "port": "8443",
        "file": "[datastore1] web01/web01.vmdk",
    }
    assert [name for name, _ in command.secrets] == ["password"]
    assert [f.name for f in command.filters] == ["cacheextents", "retry"]
    assert PASSWORD not in repr(command)
    assert command.readonly


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"thumbprint": "not-a-thumbprint"}, "fingerprint"),
        ({"vm_moref": "web 01"}, "moref"),
        ({"snapshot_moref": ""}, "moref"),
        ({"file": "/vmfs/volumes/ds/x.vmdk"}, "datastore path"),
        ({"transports": ("nbd", "carrier-pigeon")}, "transports"),
        ({"compression": "brotli"}, "compression"),
        ({"libdir": Path("relative/dir")}, "absolute"),
    ],
)
def test_vddk_settings_are_validated_before_anything_runs(change: dict[str, object], words: str) -> None:
    with pytest.raises(SourceConfigError) as caught:
        vddk_source(**change).nbdkit_command()
    assert words in caught.value.cause
    assert caught.value.fix


def test_missing_vddk_plugin_gives_a_clear_start_up_error(dataplane_tools: None) -> None:
    server = NbdkitServer(vddk_source().nbdkit_command(), startup_timeout=20)
    with pytest.raises(SourceStartError) as caught:
        server.start()
    assert "plugin 'vddk' is not installed" in caught.value.cause
    assert "VDDK" in caught.value.fix
    assert PASSWORD not in str(caught.value)
    assert not server.running()


def test_missing_filter_and_missing_nbdkit_give_clear_errors(images: Images, dataplane_tools: None) -> None:
    command = LocalSource(images.dense).nbdkit_command().with_filters(NbdkitFilter("no-such"))
    with pytest.raises(SourceStartError, match="filter 'no-such' is not installed"):
        NbdkitServer(command).start()
    with pytest.raises(SourceStartError, match="nbdkit is not installed") as caught:
        NbdkitServer(LocalSource(images.dense).nbdkit_command(), nbdkit="/nonexistent/nbdkit").start()
    assert "setup-dataplane" in caught.value.fix


def test_start_up_failure_reports_the_log(tmp_path: Path, dataplane_tools: None) -> None:
    command = NbdkitCommand(plugin="file", params=(("file", str(tmp_path / "absent.img")),), description="x")
    with pytest.raises(SourceStartError) as caught:
        NbdkitServer(command).start()
    assert "absent.img" in caught.value.cause


def test_datastore_folder_url_quotes_path_and_names() -> None:
    url = datastore_folder_url("vc.example.test", "DC 1", "ds&1", "/web 01/web 01-flat.vmdk")
    assert url == "https://vc.example.test/folder/web%2001/web%2001-flat.vmdk?dcPath=DC+1&dsName=ds%261"


def test_https_source_insists_on_tls_and_keeps_secrets_out_of_params() -> None:
    source = HttpsSource(
        url="https://esx.example.test/folder/a-flat.vmdk?dcPath=ha-datacenter&dsName=ds1",
        cookie=Secret('vmware_soap_session="abc"'),
        user="root",
        password=Secret("pw"),
        cainfo=Path("/etc/ssl/ca.pem"),
        timeout=30,
    )
    command = source.nbdkit_command()
    params = dict(command.params)
    assert params["protocols"] == "https"
    assert params["cainfo"] == "/etc/ssl/ca.pem"
    assert "sslverify" not in params
    assert sorted(name for name, _ in command.secrets) == ["cookie", "password"]
    with pytest.raises(SourceConfigError, match="not an https"):
        HttpsSource(url="http://esx.example.test/folder/a").nbdkit_command()
    with pytest.raises(SourceConfigError, match="credentials"):
        HttpsSource(url="https://root:pw@esx.example.test/folder/a").nbdkit_command()


def test_ssh_source_requires_host_key_verification_unless_waived(tmp_path: Path) -> None:
    with pytest.raises(SourceConfigError, match="known_hosts"):
        SshSource(host="esx1", path="/vmfs/volumes/ds1/a-flat.vmdk").nbdkit_command()
    command = SshSource(
        host="esx1",
        path="/vmfs/volumes/ds1/a-flat.vmdk",
        known_hosts=tmp_path / "kh",
        identity=tmp_path / "id",
    ).nbdkit_command()
    params = dict(command.params)
    assert params["known-hosts"] == str(tmp_path / "kh")
    assert params["config"] == ""  # the operator's ~/.ssh/config does not change behaviour
    assert "verify-remote-host" not in params
    waived = SshSource(host="esx1", path="/vmfs/a-flat.vmdk", verify_host=False).nbdkit_command()
    assert dict(waived.params)["verify-remote-host"] == "false"


def _read_all(uri: str) -> bytes:
    handle = nbdlib.connect(uri)
    try:
        size = handle.get_size()
        return b"".join(
            handle.pread(min(4 << 20, size - offset), offset) for offset in range(0, size, 4 << 20)
        )
    finally:
        nbdlib.shutdown_quietly(handle)


@pytest.mark.parametrize(
    "subformat", ["monolithicFlat", "monolithicSparse", "streamOptimized", "twoGbMaxExtentFlat"]
)
def test_local_vmdk_layouts_are_served_with_the_right_reader(
    images: Images, tmp_path: Path, subformat: str, dataplane_tools: None
) -> None:
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            f"subformat={subformat}",
            str(images.sparse),
            str(vmdk),
        ],
        check=True,
    )
    layout = inspect_local_disk(vmdk)
    assert layout.via_qemu == (subformat in ("monolithicSparse", "streamOptimized"))
    with NbdkitServer(LocalSource(vmdk).nbdkit_command()) as server:
        assert _read_all(server.uri) == images.sparse.read_bytes()


def test_local_multi_extent_flat_vmdk_goes_through_qemu(
    images: Images, tmp_path: Path, dataplane_tools: None
) -> None:
    data = images.sparse.read_bytes()
    half = len(data) // 2
    (tmp_path / "d-f001.vmdk").write_bytes(data[:half])
    (tmp_path / "d-f002.vmdk").write_bytes(data[half:])
    sectors = half // 512
    descriptor = tmp_path / "d.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="twoGbMaxExtentFlat"\n\n# Extent description\n'
        f'RW {sectors} FLAT "d-f001.vmdk" 0\nRW {sectors} FLAT "d-f002.vmdk" 0\n\n'
        '# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n'
    )
    assert inspect_local_disk(descriptor).via_qemu
    with NbdkitServer(LocalSource(descriptor).nbdkit_command()) as server:
        assert _read_all(server.uri) == data


def test_local_raw_image_is_served_directly(images: Images, dataplane_tools: None) -> None:
    command = LocalSource(images.dense).nbdkit_command()
    assert command.plugin == "file"
    assert dict(command.params)["file"] == str(images.dense.resolve())
    with pytest.raises(SourceConfigError, match="not a VMDK"):
        LocalSource(images.dense, format="vmdk").nbdkit_command()
    with pytest.raises(SourceConfigError, match="does not exist"):
        LocalSource(images.dense.with_name("missing.img")).nbdkit_command()


@pytest.mark.parametrize("passing", [SecretPassing.FILE, SecretPassing.FD])
def test_server_folder_is_private_secrets_are_gone_once_ready_and_cleanup_is_complete(
    images: Images, passing: SecretPassing, dataplane_tools: None
) -> None:
    # The curl plugin reads password=+FILE / password=-FD while parsing its configuration (a bad file or
    # descriptor stops it there); a file:// URL lets it serve a local image without any server.
    command = NbdkitCommand(
        plugin="curl",
        params=(("url", f"file://{images.dense}"), ("protocols", "file")),
        secrets=(("password", Secret(PASSWORD)),),
        description="dense",
    )
    server = NbdkitServer(command, secret_passing=passing).start()
    try:
        assert stat.S_IMODE(server.folder.stat().st_mode) == 0o700
        assert server.socket_path.is_socket()
        assert server.running()
        assert len(_read_all(server.uri)) == DISK_SIZE
        assert "--exit-with-parent" in server.argv
        assert PASSWORD not in " ".join(server.argv)
        expected = (
            "password=-" if passing is SecretPassing.FD else f"password=+{server.folder}/password.secret"
        )
        assert any(argument.startswith(expected) for argument in server.argv)
        assert not list(server.folder.glob("*.secret"))
        assert (server.folder / "owner.pid").read_text() == str(os.getpid())
        folder, pid = server.folder, server.pid
    finally:
        server.stop()
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not server.running()
