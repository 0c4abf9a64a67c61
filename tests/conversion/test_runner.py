"""The tool runner: progress from --machine-readable JSON and from human log lines, the kept log, and the
deadline / cancellation paths. A real virt-v2v cannot be made to hang or be cancelled on cue, so these
error paths use a small stand-in program that writes what virt-v2v writes."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from vmferry.adapters.conversion.errors import ConversionError, FailureKind
from vmferry.adapters.conversion.model import Progress
from vmferry.adapters.conversion.runner import ProgressTracker, run_tool

STAND_IN = r"""
import json, sys, time
out = sys.argv[1]
sleep = float(sys.argv[2])
messages = ["Setting up the source: -i libvirtxml d.xml", "Opening the source", "Inspecting the source",
            "Checking for sufficient free disk space in the guest", "Converting 12.15 to run on KVM",
            "This guest has virtio drivers installed.", "Finishing off"]
with open(out, "a") as handle:
    for index, message in enumerate(messages):
        print(f"[{index:6.1f}] {message}", flush=True)
        handle.write(json.dumps({"message": message, "timestamp": "t", "type": "message"}) + "\n")
        handle.flush()
        if index == 3:
            handle.write('{ "message": "could not determine a way to update the configuration of Grub2",'
                         ' "timestamp": "t", "type": "warning" }\n')
            handle.flush()
            time.sleep(sleep)
print("done", file=sys.stderr)
sys.exit(int(sys.argv[3]))
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    path = tmp_path / "fake-v2v.py"
    path.write_text(STAND_IN)
    return path


def test_progress_from_machine_readable_and_log_kept(tmp_path: Path, stand_in: Path) -> None:
    seen: list[Progress] = []
    jsonl = tmp_path / "p.jsonl"
    run = run_tool(
        [sys.executable, str(stand_in), str(jsonl), "0", "3"],
        dict(os.environ),
        tmp_path / "logs" / "convert.log",
        machine_readable=jsonl,
        progress=ProgressTracker(seen.append, 0.2, 1.0),
    )
    assert run.returncode == 3
    assert run.peak_rss_kib > 0
    assert [p.stage for p in seen if p.kind == "message"] == [
        "open", "open", "inspect", "check-space", "convert", "drivers-installed", "finish",
    ]  # fmt: skip
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert 0.2 <= fractions[0] < fractions[-1] <= 1.0
    assert any(p.kind == "warning" and "Grub2" in p.message for p in seen)
    log = run.log_bytes().decode()
    assert log.startswith("# vmferry: ")
    assert "Finishing off" in log
    assert "done" in log  # stderr goes to the same log


def test_progress_from_human_lines_without_machine_readable(tmp_path: Path, stand_in: Path) -> None:
    seen: list[Progress] = []
    run_tool(
        [sys.executable, str(stand_in), str(tmp_path / "ignored.jsonl"), "0", "0"],
        dict(os.environ),
        tmp_path / "customize.log",
        progress=ProgressTracker(seen.append),
    )
    assert [p.message for p in seen][-1] == "Finishing off"
    assert seen[-1].fraction == 0.97


def test_timeout_kills_the_process_group(tmp_path: Path, stand_in: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConversionError) as caught:
        run_tool(
            [sys.executable, str(stand_in), str(tmp_path / "p.jsonl"), "60", "0"],
            dict(os.environ),
            tmp_path / "convert.log",
            timeout_s=1.5,
        )
    assert caught.value.kind is FailureKind.TIMEOUT
    assert caught.value.retryable
    assert caught.value.log_path == tmp_path / "convert.log"
    assert time.monotonic() - started < 20


def test_cancel_from_another_thread(tmp_path: Path, stand_in: Path) -> None:
    cancel = threading.Event()
    timer = threading.Timer(1.0, cancel.set)
    timer.start()
    try:
        with pytest.raises(ConversionError) as caught:
            run_tool(
                [sys.executable, str(stand_in), str(tmp_path / "p.jsonl"), "60", "0"],
                dict(os.environ),
                tmp_path / "convert.log",
                cancel=cancel,
            )
    finally:
        timer.cancel()
    assert caught.value.kind is FailureKind.CANCELLED


def test_a_failing_progress_callback_stops_the_tool(tmp_path: Path, stand_in: Path) -> None:
    def explode(progress: Progress) -> None:
        raise RuntimeError("consumer broke")

    jsonl = tmp_path / "p.jsonl"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="consumer broke"):
        run_tool(
            [sys.executable, str(stand_in), str(jsonl), "60", "0"],
            dict(os.environ),
            tmp_path / "convert.log",
            machine_readable=jsonl,
            progress=ProgressTracker(explode),
        )
    assert time.monotonic() - started < 20  # not the stand-in's 60 s: it was killed
