"""Failure classification: decisive lines and hints from real virt-v2v-in-place 2.2.0 / virt-customize
1.48 logs captured on this project's test guests (tests/conversion/logs: no OS, host temp space on a
40 MB tmpfs, a guest with a full root filesystem, a failing guest script), and from the message texts the
installed 2.2.0 binary carries for failures no image here can produce (Windows, LUKS, odd filesystems)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.adapters.conversion.errors import FailureKind, classify, decisive_lines, machine_readable_errors

LOGS = Path(__file__).parent / "logs"


def captured(name: str) -> tuple[str, str]:
    return (LOGS / f"{name}.log").read_text(), (LOGS / f"{name}.jsonl").read_text()


def test_no_root_device_from_machine_readable_error() -> None:
    log, jsonl = captured("no-root-device")
    diagnosis = classify(log, jsonl)
    assert diagnosis.kind is FailureKind.NO_ROOT_DEVICE
    assert not diagnosis.retryable
    assert "No root device found in this operating system image." in diagnosis.decisive_lines
    assert diagnosis.decisive_lines[0].startswith("inspection could not detect the source guest")
    assert "every disk" in diagnosis.hint


def test_no_root_device_from_the_human_log_alone() -> None:
    log, _ = captured("no-root-device")
    diagnosis = classify(log)
    assert diagnosis.kind is FailureKind.NO_ROOT_DEVICE
    # the paragraph ends where the next log line follows directly (no --wrap, -v output)
    assert diagnosis.decisive_lines == (
        "virt-v2v-in-place: error: inspection could not detect the source guest (or physical machine).",
        "Assuming that you are running virt-v2v/virt-p2v on a source which is supported (and not, for "
        "example, a blank disk), then this should not happen.",
        "No root device found in this operating system image.",
    )


def test_host_out_of_space() -> None:
    log, jsonl = captured("host-out-of-space")
    diagnosis = classify(log, jsonl)
    assert diagnosis.kind is FailureKind.HOST_OUT_OF_SPACE
    assert diagnosis.retryable
    assert "LIBGUESTFS_CACHEDIR" in diagnosis.hint
    assert diagnosis.decisive_lines[0].startswith("insufficient free space in the conversion server")
    assert classify(log).kind is FailureKind.HOST_OUT_OF_SPACE


def test_guest_out_of_space() -> None:
    # a copy of the test guest with its root filesystem filled to 31 MB free (debugfs fallocate)
    log, jsonl = captured("guest-out-of-space")
    for diagnosis in (classify(log, jsonl), classify(log)):
        assert diagnosis.kind is FailureKind.GUEST_OUT_OF_SPACE
        assert not diagnosis.retryable
        assert "31.6 MB free < 50 MB needed" in diagnosis.decisive_lines[0]


def test_failed_guest_script_in_the_customize_pass() -> None:
    diagnosis = classify((LOGS / "customize-script-failed.log").read_text())
    assert diagnosis.kind is FailureKind.GUEST_SCRIPT_FAILED
    assert diagnosis.decisive_lines[0].endswith("vmferry-keep-nic-names.sh: command exited with an error")


def test_machine_readable_errors_ignore_other_lines() -> None:
    jsonl = (
        '{ "message": "Opening the source", "timestamp": "t", "type": "message" }\n'
        "not json\n"
        '{ "message": "boom\\n\\ndetail", "timestamp": "t", "type": "error" }\n'
    )
    assert machine_readable_errors(jsonl) == ["boom\n\ndetail"]


# Message texts as they appear in the installed virt-v2v 2.2.0 / libguestfs 1.48 (strings of the binary),
# laid out the way the tool prints them; no image of these kinds can be built here.
@pytest.mark.parametrize(
    ("log", "kind", "retryable"),
    [
        (
            "virt-v2v-in-place: error: could not find key to open LUKS encrypted /dev/sda2.\n\n"
            "Try using --key on the command line.\n",
            FailureKind.ENCRYPTED_DISK,
            False,
        ),
        (
            "virt-v2v-in-place: error: One of rhsrvany.exe or pvvxsvc.exe is missing in "
            "/usr/share/virt-tools.  One of them is required in order to install Windows firstboot scripts.  "
            "You can get one by building rhsrvany (https://github.com/rwmjones/rhsrvany)\n",
            FailureKind.MISSING_WINDOWS_FIRSTBOOT_TOOL,
            False,
        ),
        (
            "virt-v2v-in-place: error: /srv/missing/virtio-win.iso: cannot open virtio-win ISO file: "
            "No such file or directory\n",
            FailureKind.MISSING_VIRTIO_WIN,
            False,
        ),
        (
            "virt-v2v-in-place: error: multi-boot operating systems are not supported by virt-v2v. "
            "Use the --root option to change how virt-v2v handles this.\n",
            FailureKind.MULTI_BOOT,
            False,
        ),
        (
            "virt-v2v-in-place: error: libguestfs error: mount_ro: /dev/sda1 on / (options: 'ro'): "
            "mount: /sysroot: unknown filesystem type 'zfs_member'.\n",
            FailureKind.UNSUPPORTED_FILESYSTEM,
            False,
        ),
        (
            "virt-v2v-in-place: error: libguestfs error: guestfs_launch failed.\n"
            "This usually means the libguestfs appliance failed to start or crashed.\n",
            FailureKind.APPLIANCE_FAILED,
            True,
        ),
    ],
)
def test_known_messages(log: str, kind: FailureKind, retryable: bool) -> None:
    diagnosis = classify("libguestfs: trace: v2v: something\n" + log + "rm -rf -- '/tmp/v2v.XXXX'\n")
    assert diagnosis.kind is kind
    assert diagnosis.retryable is retryable
    assert diagnosis.hint
    assert diagnosis.decisive_lines[0].startswith("virt-v2v-in-place: error:")
    assert not any(line.startswith("rm -rf") for line in diagnosis.decisive_lines)


def test_no_root_device_behind_luks_is_reported_as_encryption() -> None:
    log, jsonl = captured("no-root-device")
    trace = 'libguestfs: trace: v2v: list_filesystems = ["/dev/sda1", "ext4", "/dev/sda2", "crypto_LUKS"]\n'
    diagnosis = classify(trace + log, jsonl)
    assert diagnosis.kind is FailureKind.ENCRYPTED_DISK
    assert "--key" in diagnosis.hint


def test_unknown_failure_keeps_the_tail() -> None:
    log = "line 1\nline 2\nqemu-system-x86_64: something odd\n"
    diagnosis = classify(log)
    assert diagnosis.kind is FailureKind.UNKNOWN
    assert diagnosis.decisive_lines[-1] == "qemu-system-x86_64: something odd"


def test_library_errors_count_only_without_a_tool_error() -> None:
    log = (
        "libguestfs: error: mount: /dev/sda5: wrong fs type (probing swap)\n"
        "virt-v2v-in-place: error: insufficient free space in the conversion server temporary directory "
        "/tmp (40.0M).\n"
    )
    assert decisive_lines(log)[0].startswith("virt-v2v-in-place: error: insufficient")
    assert classify(log).kind is FailureKind.HOST_OUT_OF_SPACE
