"""Shell scripts vmferry runs inside a Linux guest during conversion (via ``--run``, in the guest's root):

* keep NIC names: on VMware a vmxnet3 NIC is e.g. ``ens192``; on KVM the virtio NIC gets another name
  (``ens3``) and the guest's static configuration (ifupdown, NetworkManager, netplan: all bind to the
  name) would no longer apply. A systemd ``.link`` file and a udev rule pin each source MAC -- which the
  destination port keeps -- to its old name, so static addresses survive. Names not given are looked
  up in the guest's own configuration (ifcfg HWADDR, NetworkManager mac-address, or the only
  configured interface when the VM has a single NIC).
* stable fstab: ``/dev/sdXN`` entries become ``UUID=...`` so the guest boots on virtio-scsi (sdX) and
  virtio-blk (vdX) alike. The UUIDs are read on the host beforehand (``fsuuids``) and written into the
  script: inside the appliance, device names do not say which of the guest's disks is which.

The scripts are POSIX sh (the guest may have no bash) and idempotent."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

from .model import SourceNic

_INTERFACE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_GUEST_DEVICE = re.compile(r"sd[a-z]+[0-9]*")
_UUID = re.compile(r"[A-Za-z0-9-]{1,64}")  # ext/xfs/btrfs/swap, vfat (ABCD-1234), NTFS (hex)

_KEEP_NAMES_BODY = r"""
R=${VMFERRY_ROOT:-}  # empty in the guest; a directory when the script is tested on a tree
rules="$R/etc/udev/rules.d/70-vmferry-persistent-net.rules"
links="$R/etc/systemd/network"
mkdir -p "$R/etc/udev/rules.d" "$links"
: > "$rules.new"

configured_names() {  # interface names the guest's own configuration mentions (not lo)
  {
    sed -n 's/^[[:space:]]*\(allow-hotplug\|auto\|iface\)[[:space:]]\+\([^[:space:]]\+\).*/\2/p' \
      "$R"/etc/network/interfaces "$R"/etc/network/interfaces.d/* 2>/dev/null || true
    sed -n 's/^DEVICE=["]\{0,1\}\([^"]*\)["]\{0,1\}$/\1/p' "$R"/etc/sysconfig/network-scripts/ifcfg-* \
      "$R"/etc/sysconfig/network/ifcfg-* 2>/dev/null || true
    sed -n 's/^interface-name=\(.*\)$/\1/p' "$R"/etc/NetworkManager/system-connections/* 2>/dev/null || true
    sed -n 's/^[[:space:]]\{4\}\([A-Za-z0-9_.-]\+\):[[:space:]]*$/\1/p' \
      "$R"/etc/netplan/*.yaml 2>/dev/null || true
  } | grep -v -e '^lo$' -e '^inet' | sort -u
}

name_for_mac() {  # the name the guest's configuration ties to this MAC, if any
  mac=$1
  for file in "$R"/etc/sysconfig/network-scripts/ifcfg-* "$R"/etc/sysconfig/network/ifcfg-*; do
    [ -f "$file" ] || continue
    if grep -qi "^HWADDR=[\"']\{0,1\}$mac" "$file"; then
      sed -n 's/^DEVICE=["]\{0,1\}\([^"]*\)["]\{0,1\}$/\1/p' "$file" | head -n 1
      return
    fi
  done
  for file in "$R"/etc/NetworkManager/system-connections/*; do
    [ -f "$file" ] || continue
    if grep -qi "^mac-address=$mac" "$file"; then
      sed -n 's/^interface-name=\(.*\)$/\1/p' "$file" | head -n 1
      return
    fi
  done
}

keep() {  # keep MAC NAME
  mac=$1 name=$2
  if [ -z "$name" ]; then
    echo "vmferry: no interface name known for $mac; its name may change" >&2
    return 0
  fi
  cat > "$links/10-vmferry-$name.link" <<EOF
# Written by vmferry: this NIC was $name on VMware; keep the name so its configuration still applies.
[Match]
MACAddress=$mac
Type=ether

[Link]
Name=$name
EOF
  echo "SUBSYSTEM==\"net\", ACTION==\"add\", DRIVERS==\"?*\", ATTR{address}==\"$mac\", NAME=\"$name\"" \
    >> "$rules.new"
  echo "vmferry: $mac keeps the name $name"
}
"""

_STABLE_FSTAB_HEAD = r"""#!/bin/sh
# vmferry: replace /dev/sdXN, /dev/vdXN, /dev/hdXN and /dev/xvdXN in /etc/fstab by UUID=, so the guest
# finds its filesystems whichever disk bus the destination uses. The UUIDs were read on the conversion
# host from each disk alone, keyed by the guest's name for it (disk N of the VM is the N-th sdX, on any
# bus): no device name is looked up here, because the appliance's kernel names its disks in no fixed order.
# Before changing anything, each entry that this pass has mounted is checked against its UUID, so a pass
# that mounted the guest's disks in the wrong places stops here instead of writing into them.
set -eu
R=${VMFERRY_ROOT:-}  # VMFERRY_ROOT / VMFERRY_MOUNTS / VMFERRY_BLKID: only set when tested on a tree
fstab=$R/etc/fstab
mounts=${VMFERRY_MOUNTS:-/proc/self/mounts}
blkid=${VMFERRY_BLKID:-blkid}
[ -f "$fstab" ] || exit 0
"""

_STABLE_FSTAB_BODY = r"""
guest_name() {  # /dev/vdb1, /dev/hdb1, /dev/xvdb1, /dev/sdb1 -> sdb1; fails for other specs
  case "$1" in
    /dev/sd[a-z]*|/dev/vd[a-z]*|/dev/hd[a-z]*|/dev/xvd[a-z]*) echo "sd${1#/dev/*d}" ;;
    *) return 1 ;;
  esac
}

mounted_from() {  # the device this pass mounted at $1 (the last mount there wins), if any
  found=""
  while read -r device point rest; do
    [ "$point" = "$1" ] && found=$device
  done < "$mounts"
  [ -n "$found" ] && echo "$found"
}

check_mounted() {  # SPEC MOUNTPOINT UUID: stop when MOUNTPOINT holds another filesystem
  device=$(mounted_from "$2") || return 0
  actual=$($blkid -c /dev/null -s UUID -o value "$device" 2>/dev/null) || actual=""
  if [ -z "$actual" ]; then
    echo "vmferry: fstab $1: cannot read the UUID of $device mounted at $2; not checked" >&2
  elif [ "$actual" != "$3" ]; then
    echo "vmferry: fstab $1 is UUID=$3, but $2 is mounted from UUID=$actual: the disks are" \
      "attached in another order than the guest's; /etc/fstab left unchanged" >&2
    exit 1
  else
    echo "vmferry: fstab $1: $2 is mounted from it, as it should be"
  fi
}

tmp="$fstab.vmferry-new"
trap 'rm -f "$tmp"' EXIT
: > "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
  spec=${line%%[[:space:]]*}
  if name=$(guest_name "$spec"); then
    if uuid=$(uuid_of "$name"); then
      set -f; set -- $line; set +f  # fields: spec, mount point, ...
      check_mounted "$spec" "${2:-}" "$uuid"
      printf 'UUID=%s%s\n' "$uuid" "${line#"$spec"}" >> "$tmp"
      echo "vmferry: fstab $spec -> UUID=$uuid"
      continue
    fi
    echo "vmferry: fstab $spec: no UUID known for the guest's $name, left as is" >&2
  fi
  printf '%s\n' "$line" >> "$tmp"
done < "$fstab"
[ -e "$fstab.vmferry-orig" ] || cp -p "$fstab" "$fstab.vmferry-orig"
cat "$tmp" > "$fstab"
"""


def keep_interface_names_script(nics: Sequence[SourceNic]) -> str:
    """The in-guest script pinning each NIC's MAC to its VMware-era interface name."""
    lines = [
        "#!/bin/sh",
        "# vmferry: keep NIC names across the move to virtio-net",
        "set -eu",
        _KEEP_NAMES_BODY,
    ]
    unnamed = [nic for nic in nics if nic.interface is None]
    if len(nics) == 1 and unnamed:
        # One NIC: if the guest configures exactly one interface, that is the one.
        lines.append('only=$(configured_names); [ "$(printf "%s\\n" "$only" | grep -c .)" = 1 ] || only=""')
    for nic in nics:
        if nic.interface is not None:
            if not _INTERFACE_NAME.match(nic.interface):
                raise ValueError(f"not an interface name: {nic.interface!r}")
            name = shlex.quote(nic.interface)
        elif len(nics) == 1:
            name = f'"$(name_for_mac {nic.mac})"; [ -n "$name" ] || name=$only'
        else:
            name = f'"$(name_for_mac {nic.mac})"'
        lines.append(f"name={name}")
        lines.append(f'keep {nic.mac} "$name"')
    lines.append('mv "$rules.new" "$rules"')
    return "\n".join(lines) + "\n"


def stable_fstab_script(uuids: Mapping[str, str]) -> str:
    """The in-guest script turning device-name fstab entries into UUID= entries, with ``uuids`` (the
    guest's device name, e.g. ``sdb1``, to its filesystem UUID; see ``fsuuids``) written into it."""
    cases = []
    for name, uuid in sorted(uuids.items()):
        if not _GUEST_DEVICE.fullmatch(name) or not _UUID.fullmatch(uuid):
            raise ValueError(f"not a guest device and filesystem UUID: {name!r} {uuid!r}")
        cases.append(f"    {name}) echo {uuid} ;;")
    lookup = [
        "uuid_of() {  # the guest's device name -> filesystem UUID, read on the conversion host",
        '  case "$1" in',
        *cases,
        "    *) return 1 ;;",
        "  esac",
        "}",
    ]
    return _STABLE_FSTAB_HEAD + "\n".join(lookup) + "\n" + _STABLE_FSTAB_BODY
