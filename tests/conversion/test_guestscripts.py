"""The in-guest scripts, run by /bin/sh on a directory tree laid out like a guest (VMFERRY_ROOT), for the
network-configuration styles the real test guest does not have (NetworkManager, ifcfg, netplan)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmferry.adapters.conversion.guestscripts import keep_interface_names_script, stable_fstab_script
from vmferry.adapters.conversion.model import SourceNic


def run_script(script: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = root.parent / "script.sh"
    path.write_text(script)
    return subprocess.run(
        ["/bin/sh", str(path)],
        env={**os.environ, "VMFERRY_ROOT": str(root), **env},
        capture_output=True,
        text=True,
        check=True,
    )


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link_file(root: Path, name: str) -> str:
    return (root / "etc/systemd/network" / f"10-vmferry-{name}.link").read_text()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "guest"
    tree.mkdir()
    return tree


def test_explicit_names_for_several_nics(root: Path) -> None:
    nics = [
        SourceNic("00:50:56:00:00:01", interface="ens192"),
        SourceNic("00:50:56:00:00:02", interface="ens224"),
    ]
    done = run_script(keep_interface_names_script(nics), root)
    assert "00:50:56:00:00:01 keeps the name ens192" in done.stdout
    assert "MACAddress=00:50:56:00:00:01" in link_file(root, "ens192")
    assert "Name=ens224" in link_file(root, "ens224")
    assert "Type=ether" in link_file(root, "ens224")  # VLANs and bonds sharing the MAC keep their names
    rules = (root / "etc/udev/rules.d/70-vmferry-persistent-net.rules").read_text().splitlines()
    assert rules == [
        'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="00:50:56:00:00:01", NAME="ens192"',
        'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="00:50:56:00:00:02", NAME="ens224"',
    ]


def test_idempotent(root: Path) -> None:
    script = keep_interface_names_script([SourceNic("00:50:56:00:00:01", interface="ens192")])
    run_script(script, root)
    run_script(script, root)
    rules = (root / "etc/udev/rules.d/70-vmferry-persistent-net.rules").read_text().splitlines()
    assert len(rules) == 1


def test_single_nic_name_from_ifupdown(root: Path) -> None:
    write(root, "etc/network/interfaces", "auto lo\niface lo inet loopback\n\nallow-hotplug ens192\n"
          "iface ens192 inet static\n    address 192.0.2.10/24\n")  # fmt: skip
    run_script(keep_interface_names_script([SourceNic("00:0c:29:12:34:56")]), root)
    assert "MACAddress=00:0c:29:12:34:56" in link_file(root, "ens192")


def test_name_from_networkmanager_mac_binding(root: Path) -> None:
    write(root, "etc/NetworkManager/system-connections/a.nmconnection",
          "[connection]\nid=a\ninterface-name=eth0\n[ethernet]\nmac-address=00:50:56:00:00:01\n")  # fmt: skip
    write(root, "etc/NetworkManager/system-connections/b.nmconnection",
          "[connection]\nid=b\ninterface-name=eth1\n[ethernet]\nmac-address=00:50:56:00:00:02\n")  # fmt: skip
    nics = [SourceNic("00:50:56:00:00:02"), SourceNic("00:50:56:00:00:01")]
    run_script(keep_interface_names_script(nics), root)
    assert "MACAddress=00:50:56:00:00:02" in link_file(root, "eth1")
    assert "MACAddress=00:50:56:00:00:01" in link_file(root, "eth0")


def test_name_from_ifcfg_hwaddr(root: Path) -> None:
    write(root, "etc/sysconfig/network-scripts/ifcfg-ens160",
          'DEVICE=ens160\nHWADDR="00:50:56:AA:00:01"\nBOOTPROTO=none\nIPADDR=10.1.1.5\n')  # fmt: skip
    write(root, "etc/sysconfig/network-scripts/ifcfg-ens192", "DEVICE=ens192\nHWADDR=00:50:56:aa:00:02\n")
    nics = [SourceNic("00:50:56:aa:00:01"), SourceNic("00:50:56:aa:00:02")]
    run_script(keep_interface_names_script(nics), root)
    assert "MACAddress=00:50:56:aa:00:01" in link_file(root, "ens160")
    assert "MACAddress=00:50:56:aa:00:02" in link_file(root, "ens192")


def test_single_nic_name_from_netplan(root: Path) -> None:
    write(root, "etc/netplan/50-cloud.yaml",
          "network:\n  version: 2\n  ethernets:\n    ens192:\n      addresses: [192.0.2.5/24]\n")  # fmt: skip
    run_script(keep_interface_names_script([SourceNic("00:50:56:00:00:09")]), root)
    assert "Name=ens192" in link_file(root, "ens192")


def test_unknown_name_is_reported_not_guessed(root: Path) -> None:
    write(
        root, "etc/network/interfaces", "auto eth0\niface eth0 inet dhcp\nauto eth1\niface eth1 inet dhcp\n"
    )
    nics = [SourceNic("00:50:56:00:00:01"), SourceNic("00:50:56:00:00:02")]
    done = run_script(keep_interface_names_script(nics), root)
    assert "no interface name known for 00:50:56:00:00:01" in done.stderr
    assert list((root / "etc/systemd/network").glob("*.link")) == []


def test_bad_interface_name_is_refused() -> None:
    with pytest.raises(ValueError, match="interface name"):
        keep_interface_names_script([SourceNic("00:50:56:00:00:01", interface="eth0; rm -rf /")])


FSTAB = [
    "# comment",
    "/dev/sda1\t/\text4\terrors=remount-ro\t0\t1",
    "/dev/vdb1 /var ext4 defaults 0 2",
    "UUID=1234 /home ext4 defaults 0 2",
    "/dev/sdc1 /data xfs defaults 0 2",
    "/dev/sda5 none swap sw 0 0",
    "proc /proc proc defaults 0 0",
]
UUIDS = {"sda1": "aaaa-1", "sdb1": "bbbb-2", "sda5": "cccc-5"}


def appliance_view(tmp_path: Path, mounted: dict[str, str], uuids: dict[str, str]) -> dict[str, str]:
    """What the script sees in the appliance: ``mounted`` (mount point -> kernel device, in no particular
    order of disks) and a blkid that knows ``uuids`` (kernel device -> UUID)."""
    mounts = tmp_path / "mounts"
    mounts.write_text("".join(f"{device} {point} ext4 rw 0 0\n" for point, device in mounted.items()))
    blkid = tmp_path / "blkid"
    cases = "".join(f"{device}) echo {uuid};; " for device, uuid in uuids.items())
    blkid.write_text(f'#!/bin/sh\nfor last; do :; done\ncase "$last" in {cases}*) exit 2;; esac\n')
    blkid.chmod(0o755)
    return {"VMFERRY_MOUNTS": str(mounts), "VMFERRY_BLKID": str(blkid)}


def test_stable_fstab_uses_the_uuids_read_before_the_pass(root: Path, tmp_path: Path) -> None:
    write(root, "etc/fstab", "\n".join(FSTAB) + "\n")
    # the appliance's kernel called the guest's first disk sdc and its second sda: no matter
    view = appliance_view(tmp_path, {"/": "/dev/sdc1", "/var": "/dev/sda1"},
                          {"/dev/sdc1": "aaaa-1", "/dev/sda1": "bbbb-2"})  # fmt: skip
    done = run_script(stable_fstab_script(UUIDS), root, **view)
    assert (root / "etc/fstab").read_text().splitlines() == [
        "# comment",
        "UUID=aaaa-1\t/\text4\terrors=remount-ro\t0\t1",
        "UUID=bbbb-2 /var ext4 defaults 0 2",  # vdb is the guest's second disk too
        "UUID=1234 /home ext4 defaults 0 2",
        "/dev/sdc1 /data xfs defaults 0 2",  # no UUID known: left alone, and said so
        "UUID=cccc-5 none swap sw 0 0",
        "proc /proc proc defaults 0 0",
    ]
    assert "/dev/sdc1: no UUID known for the guest's sdc1" in done.stderr
    assert "fstab /dev/vdb1: /var is mounted from it, as it should be" in done.stdout
    assert (root / "etc/fstab.vmferry-orig").read_text().splitlines() == FSTAB
    assert sorted(path.name for path in (root / "etc").iterdir()) == ["fstab", "fstab.vmferry-orig"]

    again = run_script(stable_fstab_script(UUIDS), root, **view)  # idempotent, original kept
    assert "->" not in again.stdout
    assert (root / "etc/fstab.vmferry-orig").read_text().splitlines() == FSTAB


def test_stable_fstab_stops_when_the_pass_mounted_the_disks_elsewhere(root: Path, tmp_path: Path) -> None:
    write(root, "etc/fstab", "\n".join(FSTAB) + "\n")
    view = appliance_view(tmp_path, {"/": "/dev/sda1", "/var": "/dev/sdb1"},
                          {"/dev/sda1": "bbbb-2", "/dev/sdb1": "aaaa-1"})  # fmt: skip
    path = root.parent / "script.sh"
    path.write_text(stable_fstab_script(UUIDS))
    done = subprocess.run(
        ["/bin/sh", str(path)],
        env={**os.environ, "VMFERRY_ROOT": str(root), **view},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "fstab /dev/sda1 is UUID=aaaa-1, but / is mounted from UUID=bbbb-2" in done.stderr
    assert (root / "etc/fstab").read_text().splitlines() == FSTAB  # unchanged, no leftovers
    assert sorted(path.name for path in (root / "etc").iterdir()) == ["fstab"]


def test_stable_fstab_without_blkid_in_the_guest_still_rewrites(root: Path, tmp_path: Path) -> None:
    write(root, "etc/fstab", "/dev/sda1 / ext4 defaults 0 1\n")
    view = appliance_view(tmp_path, {"/": "/dev/sdc1"}, {})
    view["VMFERRY_BLKID"] = str(tmp_path / "no-such-blkid")
    done = run_script(stable_fstab_script({"sda1": "aaaa-1"}), root, **view)
    assert (root / "etc/fstab").read_text() == "UUID=aaaa-1 / ext4 defaults 0 1\n"
    assert "cannot read the UUID of /dev/sdc1 mounted at /; not checked" in done.stderr


@pytest.mark.parametrize(
    ("name", "uuid"), [("sda1", "x; rm -rf /"), ("vda1", "aaaa"), ("sda1\n", "aaaa"), ("sd1", "aaaa")]
)
def test_stable_fstab_refuses_what_is_not_a_device_and_uuid(name: str, uuid: str) -> None:
    with pytest.raises(ValueError, match="not a guest device"):
        stable_fstab_script({name: uuid})
