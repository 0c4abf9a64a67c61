"""Checkpoint sinks: the JSON file sink round-trips, replaces atomically and forgets on clear."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from vmferry.adapters.dataplane.checkpoints import Checkpoint, JsonFileCheckpointSink, MemoryCheckpointSink


def checkpoint(done: list[tuple[int, int]], complete: bool = False) -> Checkpoint:
    return Checkpoint(
        job="vm-4207aa/2000/pass-3",
        kind="cbt",
        disk_size=1 << 30,
        plan="ab" * 32,
        done=done,
        bytes_done=sum(end - start for start, end in done),
        complete=complete,
    )


def test_json_sink_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    sink = JsonFileCheckpointSink(tmp_path / "state" / "disk-2000.json")
    assert sink.load() is None
    sink.save(checkpoint([(0, 4096)]))
    sink.save(checkpoint([(0, 8192), (65536, 131072)], complete=True))
    loaded = sink.load()
    assert loaded == checkpoint([(0, 8192), (65536, 131072)], complete=True)
    assert loaded is not None
    assert loaded.done_ranges().total() == 8192 + 65536
    assert [path.name for path in sink.path.parent.iterdir()] == ["disk-2000.json"]  # no temp files left
    sink.clear()
    assert sink.load() is None
    sink.clear()  # clearing twice is fine


def test_json_sink_rejects_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "ck.json"
    path.write_text('{"job": "x"}')
    with pytest.raises(msgspec.ValidationError):
        JsonFileCheckpointSink(path).load()


def test_memory_sink_counts_saves() -> None:
    sink = MemoryCheckpointSink()
    sink.save(checkpoint([(0, 1)]))
    sink.save(checkpoint([(0, 2)]))
    assert sink.saves == 2
    assert sink.load() == checkpoint([(0, 2)])
    sink.clear()
    assert sink.load() is None
