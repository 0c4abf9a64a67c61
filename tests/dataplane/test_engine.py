"""The copy engine against real nbdkit servers over real files: full copies of every disk shape onto
every destination kind, CBT passes, verification, checkpoints and resume, and faults injected with
nbdkit filters (errors switched on mid-copy, random errors, server-side retries, latency, a restarted
server)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import missing_component
from tests.dataplane.conftest import DISK_SIZE, Images, ServeFactory, blocks_allocated
from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.checkpoints import Checkpoint, JsonFileCheckpointSink, MemoryCheckpointSink
from vmferry.adapters.dataplane.destinations import (
    BlockDeviceDestination,
    DestinationWriter,
    FileDestination,
    NbdDestination,
    OpenDestination,
)
from vmferry.adapters.dataplane.engine import CopyEngine, EngineConfig, Progress
from vmferry.adapters.dataplane.errors import (
    CheckpointMismatchError,
    DestinationError,
    ExtentError,
    LibnbdUnavailableError,
    TransferCancelledError,
    TransferError,
    VerificationError,
)
from vmferry.adapters.dataplane.extents import RangeSet
from vmferry.adapters.dataplane.nbdkit import NbdkitFilter, NbdkitServer
from vmferry.adapters.dataplane.sources import LocalSource

pytestmark = pytest.mark.usefixtures("dataplane_tools")

FAST = EngineConfig(request_size=256 * 1024, requests=8, retry_delay=0.05, retry_max_delay=0.5)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fresh(tmp_path: Path, name: str = "dst.img") -> FileDestination:
    return FileDestination.create(tmp_path / name, DISK_SIZE)


def dirty(tmp_path: Path, name: str = "dirty.img") -> FileDestination:
    path = tmp_path / name
    path.write_bytes(random.Random(99).randbytes(DISK_SIZE))
    return FileDestination(path, reads_as_zero=False)


def delay(read: str) -> NbdkitFilter:
    return NbdkitFilter("delay", (("delay-read", read),))


# ---- full copies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["dense", "sparse", "thick"])
def test_full_copy_is_identical_and_writes_only_data(
    images: Images, serve: ServeFactory, tmp_path: Path, shape: str
) -> None:
    source = getattr(images, shape)
    server = serve(source)
    destination = fresh(tmp_path)
    result = CopyEngine().full_copy(server.uri, destination, job="t", verify=True, full_compare=True)
    assert digest(destination.path) == digest(source)
    assert result.verification is not None
    assert result.verification.full_compare
    if shape == "dense":
        assert result.bytes_written == DISK_SIZE
    else:
        assert result.bytes_written == images.data_bytes  # zero runs found to the 4 KiB page
        assert blocks_allocated(destination.path) <= images.data_bytes + 64 * 1024
    # holes are neither read nor written; a thick disk is read in full and zero-detected
    assert result.bytes_read == (images.data_bytes if shape == "sparse" else DISK_SIZE)
    assert result.bytes_read + (result.bytes_skipped if shape == "sparse" else 0) == DISK_SIZE


def test_full_copy_onto_a_dirty_destination_zeroes_what_the_source_does_not_hold(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    server = serve(images.sparse)
    destination = dirty(tmp_path)
    result = CopyEngine(FAST).full_copy(server.uri, destination, job="t")
    assert digest(destination.path) == digest(images.sparse)
    assert result.bytes_zeroed == DISK_SIZE - images.data_bytes
    assert result.bytes_skipped == 0


def test_claiming_zero_for_a_dirty_destination_is_caught_by_the_full_compare(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    server = serve(images.sparse)
    wrong = FileDestination(dirty(tmp_path).path, reads_as_zero=True)
    with pytest.raises(VerificationError) as caught:
        CopyEngine().full_copy(server.uri, wrong, job="t", full_compare=True)
    assert caught.value.offset >= 0
    assert "differs" in caught.value.cause


def test_full_copy_without_block_status_still_skips_zero_runs(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    server = serve(images.sparse, NbdkitFilter("noextents"))
    destination = fresh(tmp_path)
    result = CopyEngine().full_copy(server.uri, destination, job="t")
    assert digest(destination.path) == digest(images.sparse)
    assert result.bytes_read == DISK_SIZE
    assert result.bytes_written == images.data_bytes


def test_full_copy_onto_an_nbd_export(images: Images, serve: ServeFactory, tmp_path: Path) -> None:
    source = serve(images.thick)
    target_path = dirty(tmp_path).path
    target = serve(target_path, readonly=False)
    result = CopyEngine(FAST).full_copy(
        source.uri, NbdDestination(target.uri, reads_as_zero=False), job="t", verify=True
    )
    target.stop()
    assert digest(target_path) == digest(images.thick)
    assert result.verification is not None
    assert result.verification.bytes == DISK_SIZE  # thick: every extent is data to verify


def test_full_copy_onto_a_block_device(images: Images, serve: ServeFactory, tmp_path: Path) -> None:
    backing = dirty(tmp_path, "loop-backing.img").path
    attach = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        missing_component(
            "a loop device", f"losetup needs root and /dev/loop-control ({attach.stderr.strip()})"
        )
    device = Path(attach.stdout.strip())
    try:
        server = serve(images.sparse)
        result = CopyEngine(FAST).full_copy(
            server.uri, BlockDeviceDestination(device, reads_as_zero=False), job="t", full_compare=True
        )
        assert result.bytes_zeroed == DISK_SIZE - images.data_bytes  # through BLKZEROOUT
        with pytest.raises(DestinationError, match="not a block device"):
            CopyEngine().full_copy(server.uri, BlockDeviceDestination(backing, reads_as_zero=False), job="t")
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)
    assert digest(backing) == digest(images.sparse)


def test_unreachable_source_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(TransferError) as caught:
        CopyEngine().full_copy(f"nbd+unix:///?socket={tmp_path}/absent.sock", fresh(tmp_path), job="t")
    assert "cannot open the source disk" in caught.value.cause
    assert "NbdkitServer" in caught.value.fix


def test_destination_smaller_than_the_source_is_rejected_before_copying(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    server = serve(images.dense)
    small = FileDestination.create(tmp_path / "small.img", DISK_SIZE - 4096)
    with pytest.raises(DestinationError) as caught:
        CopyEngine().full_copy(server.uri, small, job="t")
    assert str(DISK_SIZE) in caught.value.fix
    assert blocks_allocated(small.path) == 0


# ---- CBT passes ----------------------------------------------------------------------------------------


def make_v2(images: Images, tmp_path: Path, count: int = 40) -> tuple[Path, Path, list[tuple[int, int]]]:
    """v1 = dense image (the destination's current content); v2 = v1 with changed 64 KiB extents, a few
    of which became zero. Returns (v2 source, destination holding v1, changed extents)."""
    generator = random.Random(5)
    data = bytearray(images.dense.read_bytes())
    slots = sorted(generator.sample(range(DISK_SIZE // 65536), count))
    extents = []
    for index, slot in enumerate(slots):
        offset = slot * 65536
        data[offset : offset + 65536] = bytes(65536) if index % 5 == 0 else generator.randbytes(65536)
        extents.append((offset, 65536))
    v2 = tmp_path / "v2.img"
    v2.write_bytes(bytes(data))
    destination = tmp_path / "replica.img"
    shutil.copyfile(images.dense, destination)
    return v2, destination, extents


def test_cbt_pass_copies_changed_extents_writes_zeroes_and_verifies(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    v2, replica, extents = make_v2(images, tmp_path)
    server = serve(v2)
    result = CopyEngine().copy_changed(
        server.uri, FileDestination(replica, reads_as_zero=False), reversed(extents), job="cbt"
    )
    assert digest(replica) == digest(v2)
    assert result.bytes_read == len(extents) * 65536
    assert result.bytes_zeroed == 8 * 65536  # zeroed extents written as zeroes, never skipped
    assert result.bytes_skipped == 0
    assert result.verification is not None
    assert result.verification.bytes == len(extents) * 65536
    assert len(result.verification.digest) == 64


def test_cbt_pass_never_skips_zeroes_even_on_a_destination_said_to_read_as_zero(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    v2, replica, extents = make_v2(images, tmp_path)
    server = serve(v2)
    CopyEngine().copy_changed(server.uri, FileDestination(replica, reads_as_zero=True), extents, job="cbt")
    assert digest(replica) == digest(v2)


@pytest.mark.parametrize(
    "extents",
    [[(0, 65536), (DISK_SIZE - 4096, 8192)], [(0, 65536), (32768, 65536)], [(4096, 0)]],
    ids=["outside", "overlapping", "empty"],
)
def test_bad_extents_are_rejected_before_any_copying(
    images: Images, serve: ServeFactory, tmp_path: Path, extents: list[tuple[int, int]]
) -> None:
    v2, replica, _ = make_v2(images, tmp_path)
    server = serve(v2, NbdkitFilter("stats", (("statsfile", str(tmp_path / "stats.txt")),)))
    before = digest(replica)
    sink = MemoryCheckpointSink()
    with pytest.raises(ExtentError):
        CopyEngine().copy_changed(
            server.uri, FileDestination(replica, reads_as_zero=False), extents, job="cbt", checkpoint=sink
        )
    assert digest(replica) == before
    assert sink.saves == 0
    server.stop()
    assert (tmp_path / "stats.txt").read_text().startswith("total: 0 ops")  # not one read


def test_latency_is_hidden_by_requests_in_flight(images: Images, serve: ServeFactory, tmp_path: Path) -> None:
    v2, replica, extents = make_v2(images, tmp_path, count=64)
    server = serve(v2, delay("50ms"))
    started = time.monotonic()
    result = CopyEngine().copy_changed(
        server.uri, FileDestination(replica, reads_as_zero=False), extents, job="cbt"
    )
    elapsed = time.monotonic() - started
    assert digest(replica) == digest(v2)
    assert result.verification is not None
    serial = 2 * 64 * 0.050  # every extent read twice (copy, then verification), one at a time
    assert elapsed < serial / 3, f"{elapsed:.2f} s: reads were not overlapped"


def test_verification_finds_a_corrupted_byte_and_discards_the_checkpoint(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    v2, replica, extents = make_v2(images, tmp_path)
    server = serve(v2)
    sink = JsonFileCheckpointSink(tmp_path / "ck.json")
    destination = FileDestination(replica, reads_as_zero=False)
    engine = CopyEngine()
    engine.copy_changed(server.uri, destination, extents, job="cbt", checkpoint=sink)
    saved = sink.load()
    assert saved is not None
    assert saved.complete
    damaged = extents[7][0] + 1234
    with replica.open("r+b") as handle:
        handle.seek(damaged)
        original = handle.read(1)
        handle.seek(damaged)
        handle.write(bytes([original[0] ^ 0xFF]))
    # the checkpoint says the copy is complete: the second call only verifies, and finds the damage
    with pytest.raises(VerificationError) as caught:
        engine.copy_changed(server.uri, destination, extents, job="cbt", checkpoint=sink)
    assert caught.value.offset == damaged
    assert sink.load() is None
    result = engine.copy_changed(server.uri, destination, extents, job="cbt", checkpoint=sink)
    assert result.bytes_resumed == 0
    assert digest(replica) == digest(v2)


def test_checkpoint_of_another_pass_is_refused(images: Images, serve: ServeFactory, tmp_path: Path) -> None:
    v2, replica, extents = make_v2(images, tmp_path)
    server = serve(v2)
    other = Checkpoint(
        job="cbt", kind="cbt", disk_size=DISK_SIZE, plan="0" * 64, done=[(0, 65536)], bytes_done=65536
    )
    with pytest.raises(CheckpointMismatchError):
        CopyEngine().copy_changed(
            server.uri,
            FileDestination(replica, reads_as_zero=False),
            extents,
            job="cbt",
            checkpoint=MemoryCheckpointSink(other),
        )


# ---- faults --------------------------------------------------------------------------------------------


def test_errors_switched_on_mid_copy_fail_with_offset_cause_and_fix_then_resume(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    trigger = tmp_path / "inject"
    error_filter = NbdkitFilter(
        "error", (("error-pread", "EIO"), ("error-pread-rate", "100%"), ("error-pread-file", str(trigger)))
    )
    server = serve(images.dense, error_filter, delay("20ms"))
    destination = fresh(tmp_path)

    class TriggeringSink(JsonFileCheckpointSink):
        def save(self, checkpoint: Checkpoint) -> None:
            super().save(checkpoint)
            if checkpoint.bytes_done >= DISK_SIZE // 4:
                trigger.touch()  # from now on every read fails

    sink = TriggeringSink(tmp_path / "ck.json")
    config = EngineConfig(
        request_size=256 * 1024,
        requests=4,
        retries=2,
        retry_delay=0.05,
        checkpoint_interval=0.05,
        checkpoint_save_interval=0.02,
    )
    with pytest.raises(TransferError) as caught:
        CopyEngine(config).full_copy(server.uri, destination, job="t", checkpoint=sink)
    error = caught.value
    assert error.offset is not None
    assert 0 <= error.offset < DISK_SIZE
    assert error.length == 256 * 1024
    assert "Input/output error" in error.cause
    assert f"offset {error.offset}" in error.cause
    assert "datastore" in error.fix
    assert error.retryable
    saved = sink.load()
    assert saved is not None
    assert 0 < saved.bytes_done < DISK_SIZE
    trigger.unlink()
    result = CopyEngine(config).full_copy(
        server.uri, destination, job="t", checkpoint=JsonFileCheckpointSink(tmp_path / "ck.json")
    )
    assert result.bytes_resumed == saved.bytes_done
    assert result.bytes_read <= DISK_SIZE - saved.bytes_done
    assert digest(destination.path) == digest(images.dense)


def test_random_read_errors_are_retried(images: Images, serve: ServeFactory, tmp_path: Path) -> None:
    server = serve(images.dense, NbdkitFilter("error", (("error-pread", "EIO"), ("error-pread-rate", "10%"))))
    destination = fresh(tmp_path)
    result = CopyEngine(EngineConfig(request_size=256 * 1024, retries=10, retry_delay=0.01)).full_copy(
        server.uri, destination, job="t"
    )
    assert result.retries > 0
    assert digest(destination.path) == digest(images.dense)


def test_server_side_retry_request_filter_hides_errors(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    retry = NbdkitFilter("retry-request", (("retry-request-retries", "20"), ("retry-request-delay", "1")))
    errors = NbdkitFilter("error", (("error-pread", "EIO"), ("error-pread-rate", "5%")))
    server = serve(images.dense, retry, errors)
    destination = fresh(tmp_path)
    result = CopyEngine(EngineConfig(retries=0)).full_copy(server.uri, destination, job="t")
    assert result.retries == 0
    assert digest(destination.path) == digest(images.dense)


def test_a_restarted_source_server_is_reconnected(images: Images, tmp_path: Path) -> None:
    socket = tmp_path / "src.sock"
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--readonly", "--unix", str(socket),
            "--filter=delay", "file", f"file={images.dense}", "delay-read=40ms"]  # fmt: skip
    processes = [subprocess.Popen(argv)]
    restarted = threading.Event()

    def restart() -> None:
        processes[0].kill()
        processes[0].wait()
        socket.unlink(missing_ok=True)
        time.sleep(0.3)
        processes.append(subprocess.Popen(argv))

    class RestartingSink(MemoryCheckpointSink):
        def save(self, checkpoint: Checkpoint) -> None:
            super().save(checkpoint)
            if checkpoint.bytes_done >= DISK_SIZE // 4 and not restarted.is_set():
                restarted.set()
                threading.Thread(target=restart).start()

    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        destination = fresh(tmp_path)
        config = EngineConfig(
            request_size=256 * 1024,
            requests=4,
            retries=8,
            retry_delay=0.1,
            retry_max_delay=1,
            checkpoint_interval=0.05,
            checkpoint_save_interval=0.02,
        )
        result = CopyEngine(config).full_copy(
            f"nbd+unix:///?socket={socket}", destination, job="t", checkpoint=RestartingSink()
        )
    finally:
        time.sleep(0.4)  # let a restart in progress finish before cleaning up
        for process in processes:
            process.kill()
            process.wait()
    assert restarted.is_set()
    assert result.reconnects >= 1
    assert result.retries >= 1
    assert digest(destination.path) == digest(images.dense)


# ---- checkpoints, resume, cancel, progress -------------------------------------------------------------


class _FlushSpy:
    """A real file destination that records which ranges were written and then flushed."""

    def __init__(self, inner: FileDestination) -> None:
        self._inner = inner
        self.reads_as_zero = inner.reads_as_zero
        self.description = inner.description
        self.compare_target = inner.compare_target
        self.flushed = RangeSet()
        self.lock = threading.Lock()

    def open(self) -> OpenDestination:
        spy = self
        opened = self._inner.open()

        class Writer:
            def __init__(self, inner: DestinationWriter) -> None:
                self.inner = inner
                self.written = RangeSet()

            def write(self, offset: int, data: memoryview) -> None:
                self.inner.write(offset, data)
                self.written.add(offset, offset + len(data))

            def zero(self, offset: int, length: int) -> None:
                self.inner.zero(offset, length)
                self.written.add(offset, offset + length)

            def read_into(self, offset: int, view: memoryview) -> None:
                self.inner.read_into(offset, view)

            def flush(self) -> None:
                self.inner.flush()
                with spy.lock:
                    spy.flushed.update(self.written)

            def close(self) -> None:
                self.inner.close()

        class Opened:
            size = opened.size

            def writer(self) -> DestinationWriter:
                return Writer(opened.writer())

            def close(self) -> None:
                opened.close()

        return Opened()


class _CheckingSink(MemoryCheckpointSink):
    def __init__(self, spy: _FlushSpy) -> None:
        super().__init__()
        self.spy = spy
        self.violations: list[tuple[int, int]] = []

    def save(self, checkpoint: Checkpoint) -> None:
        with self.spy.lock:
            for start, end in checkpoint.done:
                self.violations += list(self.spy.flushed.gaps(start, end))
        super().save(checkpoint)


def test_checkpoints_only_ever_hold_flushed_data(images: Images, serve: ServeFactory, tmp_path: Path) -> None:
    server = serve(images.dense, delay("30ms"))
    spy = _FlushSpy(dirty(tmp_path))  # dirty: nothing is skipped, so every done byte was written
    sink = _CheckingSink(spy)
    config = EngineConfig(
        request_size=256 * 1024, requests=4, checkpoint_interval=0.05, checkpoint_save_interval=0.02
    )
    CopyEngine(config).full_copy(server.uri, spy, job="t", checkpoint=sink)  # type: ignore[arg-type]
    assert sink.saves >= 3
    assert sink.violations == []
    assert sink.checkpoint is not None
    assert sink.checkpoint.complete
    assert sink.checkpoint.done == [(0, DISK_SIZE)]


CHILD = """
import sys
from pathlib import Path
from vmferry.adapters.dataplane import *
source, destination, checkpoint = map(Path, sys.argv[1:4])
command = LocalSource(source).nbdkit_command().with_filters(NbdkitFilter("delay", (("delay-read", "60ms"),)))
with NbdkitServer(command) as server:
    # a 32 MiB disk: checkpoint more often than the 32 MiB default so that "half done" is recorded
    config = EngineConfig(request_size=256 * 1024, requests=4, checkpoint_bytes=4 << 20)
    target, sink = FileDestination(destination, reads_as_zero=True), JsonFileCheckpointSink(checkpoint)
    CopyEngine(config).full_copy(server.uri, target, job="kill", checkpoint=sink)
"""


def test_copy_killed_at_half_resumes_and_repeats_little(images: Images, tmp_path: Path) -> None:
    destination = fresh(tmp_path)
    checkpoint = tmp_path / "ck.json"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(images.dense), str(destination.path), str(checkpoint)]
    )
    sink = JsonFileCheckpointSink(checkpoint)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            saved = sink.load() if checkpoint.exists() else None
            if saved is not None and saved.bytes_done >= DISK_SIZE // 2:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the child finished before it could be killed"
        child.kill()
    finally:
        child.kill()
        child.wait()
    saved = sink.load()
    assert saved is not None
    assert not saved.complete
    # the killed process could not stop its server: its private folder is swept by the next start
    left_behind = [
        path for path in Path(tempfile.gettempdir()).glob("vmferry-nbd-*") if _owned_by(path, child.pid)
    ]
    assert left_behind
    with NbdkitServer(LocalSource(images.dense).nbdkit_command()) as server:
        result = CopyEngine().full_copy(
            server.uri, FileDestination(destination.path, reads_as_zero=True), job="kill", checkpoint=sink
        )
    assert not any(path.exists() for path in left_behind)
    assert result.bytes_resumed >= DISK_SIZE // 2
    assert result.bytes_read <= DISK_SIZE - result.bytes_resumed
    assert result.bytes_read <= 0.6 * DISK_SIZE
    assert digest(destination.path) == digest(images.dense)


def _owned_by(folder: Path, pid: int) -> bool:
    try:
        return (folder / "owner.pid").read_text() == str(pid)
    except OSError:
        return False


def test_cancel_stops_cleanly_with_a_checkpoint_and_progress_is_throttled(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    server = serve(images.dense, delay("80ms"))  # 128 reads, 8 in flight: ~1.3 s
    destination = fresh(tmp_path)
    sink = MemoryCheckpointSink()
    reports: list[tuple[float, Progress]] = []
    cancel = threading.Event()

    def on_progress(report: Progress) -> None:
        reports.append((time.monotonic(), report))
        if len(reports) == 3:
            cancel.set()

    config = EngineConfig(request_size=256 * 1024, requests=4, progress_interval=0.25)
    with pytest.raises(TransferCancelledError):
        CopyEngine(config).full_copy(
            server.uri, destination, job="t", checkpoint=sink, progress=on_progress, cancel=cancel
        )
    assert len(reports) == 3
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reports)]
    assert min(gaps) >= 0.25
    dones = [report.done for _, report in reports]
    assert dones == sorted(dones)
    last = reports[-1][1]
    assert last.phase == "copy"
    assert last.total == DISK_SIZE
    assert last.rate > 0
    assert last.eta is not None
    assert last.eta > 0
    saved = sink.checkpoint
    assert saved is not None
    assert not saved.complete
    assert saved.bytes_done > 0
    result = CopyEngine().full_copy(server.uri, destination, job="t", checkpoint=sink)
    assert result.bytes_resumed == saved.bytes_done
    assert digest(destination.path) == digest(images.dense)


async def test_async_copy_delivers_progress_on_the_loop_and_cancels(
    images: Images, serve: ServeFactory, tmp_path: Path
) -> None:
    server = serve(images.dense, delay("80ms"))
    loop_thread = threading.get_ident()
    threads: list[int] = []
    engine = CopyEngine(EngineConfig(request_size=256 * 1024, requests=4, progress_interval=0.1))
    sink = MemoryCheckpointSink()
    task = asyncio.create_task(
        engine.full_copy_async(
            server.uri,
            fresh(tmp_path),
            job="t",
            checkpoint=sink,
            progress=lambda report: threads.append(threading.get_ident()),
        )
    )
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert threads
    assert set(threads) == {loop_thread}
    assert sink.checkpoint is not None
    assert not sink.checkpoint.complete
    result = await engine.full_copy_async(
        server.uri, FileDestination(tmp_path / "dst.img", True), job="t", checkpoint=sink
    )
    assert result.bytes_resumed > 0
    assert digest(tmp_path / "dst.img") == digest(images.dense)


def test_missing_binding_gives_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # An error path the real component cannot produce here: pretend the module is not importable.
    nbdlib.load.cache_clear()
    monkeypatch.setitem(sys.modules, "nbd", None)
    try:
        with pytest.raises(LibnbdUnavailableError) as caught:
            nbdlib.load()
        assert "setup-dataplane" in caught.value.fix
        assert "pip install 'nbd'" in caught.value.fix
        assert not nbdlib.available()
    finally:
        nbdlib.load.cache_clear()
