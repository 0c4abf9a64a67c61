"""Clones of the replica and the converted-disk ledger."""

from __future__ import annotations

import os
import random
from pathlib import Path

from vmferry.adapters.conversion.model import Firmware, Inspection
from vmferry.adapters.conversion.storage import CloneMethod, FileLedger, clone_disk, new_record

MiB = 1 << 20


def sparse_image(path: Path) -> bytes:
    generator = random.Random(7)
    with path.open("wb") as handle:
        handle.truncate(64 * MiB)
        for offset in (0, 10 * MiB, 63 * MiB):
            handle.seek(offset)
            handle.write(generator.randbytes(MiB))
    return path.read_bytes()


def test_clone_is_identical_independent_and_sparse(tmp_path: Path) -> None:
    source = tmp_path / "replica.raw"
    content = sparse_image(source)
    target = tmp_path / "work" / "clone.raw"
    method = clone_disk(source, target)
    assert method in (CloneMethod.REFLINK, CloneMethod.COPY)
    assert target.read_bytes() == content
    # holes stay holes: a 64 MiB image with 3 MiB of data must not become 64 MiB on disk
    assert os.stat(target).st_blocks * 512 < 16 * MiB
    with target.open("r+b") as handle:
        handle.write(b"converted")
    assert source.read_bytes() == content  # the replica is never touched
    assert not (tmp_path / "work" / "clone.raw.partial").exists()


def test_clone_replaces_a_stale_clone(tmp_path: Path) -> None:
    source = tmp_path / "replica.raw"
    content = sparse_image(source)
    target = tmp_path / "clone.raw"
    target.write_bytes(b"half-converted leftovers")
    clone_disk(source, target)
    assert target.read_bytes() == content


def inspection() -> Inspection:
    return Inspection("linux", "debian", 12, 15, "12.15", "x86_64", Firmware.BIOS, "/dev/sda1")


def test_ledger_round_trip_for_every_disk(tmp_path: Path) -> None:
    ledger = FileLedger(tmp_path / "ledger")
    assert ledger.get("/d/a") is None
    record = new_record(
        "/d/a+/d/b", ["/d/a", "/d/b"], inspection(), "virtio-blk", "2.2.0", ["/l/convert.log"]
    )
    ledger.put(record)
    for key in ("/d/a", "/d/b", "/d/a+/d/b"):
        found = ledger.get(key)
        assert found == record
    assert found is not None
    assert found.inspection.to_inspection() == inspection()
    assert ledger.get("/d/c") is None
    assert not list((tmp_path / "ledger").glob("*.partial"))
