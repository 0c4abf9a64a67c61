"""The copy engine: full copies and CBT passes from an NBD source onto a destination, on libnbd.

One coordinator (the calling thread) plans bounded work items, saves checkpoints and reports progress;
``EngineConfig.connections`` worker threads each keep ``requests`` reads in flight on their own source
connection (see ``worker.Worker``). The same code path serves full copies (block-status map, holes and
zero runs skipped or zeroed depending on the destination) and CBT passes (validated changed extents,
zeroes always written). After the copy, extents can be verified by comparing SHA-256 digests of both
sides, and the whole disk compared with ``qemu-img compare``.

Blocking by design: call it from a worker thread, e.g. ``await engine.full_copy_async(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.checkpoints import Checkpoint, CheckpointSink, CopyKind
from vmferry.adapters.dataplane.destinations import Destination, OpenDestination
from vmferry.adapters.dataplane.errors import (
    CheckpointMismatchError,
    DestinationError,
    TransferCancelledError,
    TransferError,
    VerificationError,
)
from vmferry.adapters.dataplane.extents import Extent, RangeSet, extents_digest, validate_changed_extents
from vmferry.adapters.dataplane.planning import (
    AllocationMapper,
    WorkItem,
    changed_extent_items,
    data_extents,
    full_copy_items,
    verify_items,
)
from vmferry.adapters.dataplane.worker import Counters, Shared, Worker, WorkerSettings

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    """Tuning of the copy engine; the defaults suit a 2-core conversion host and a local or VDDK source.

    Buffers take ``connections * requests * request_size`` bytes (twice that while verifying).
    """

    connections: int = 2
    requests: int = 16  # in flight per connection; nbdkit serves 16 at once by default
    request_size: int = 1 * MiB
    zero_request_size: int = 256 * MiB
    map_window: int = 1 * GiB
    zero_granularity: int = 64 * 1024
    zero_refine: int = 4096
    retries: int = 5
    retry_delay: float = 0.2
    retry_max_delay: float = 10.0
    checkpoint_interval: float = 1.0  # seconds between flushes of each connection's completed writes
    checkpoint_bytes: int = 32 * MiB  # ... or after this many bytes, whichever comes first
    checkpoint_save_interval: float = 0.1  # least seconds between two checkpoint saves
    progress_interval: float = 2.0  # least seconds between two progress reports
    poll_timeout: float = 0.05

    def __post_init__(self) -> None:
        if self.connections < 1 or self.requests < 1:
            raise ValueError("connections and requests must be at least 1")
        if not 4096 <= self.request_size <= 64 * MiB:
            raise ValueError("request_size must be between 4 KiB and 64 MiB (libnbd's limit)")
        if self.zero_granularity < self.zero_refine or self.zero_refine < 512:
            raise ValueError("zero_granularity must be >= zero_refine >= 512")


@dataclass(frozen=True)
class Progress:
    """A progress report: ``done`` of ``total`` bytes of the current phase ("copy" or "verify")."""

    phase: str
    done: int
    total: int
    rate: float  # bytes per second over the last reporting interval
    eta: float | None  # seconds, None while the rate is unknown


@dataclass(frozen=True)
class Verification:
    """Digests of the compared extents: ``digest`` covers every (offset, length, sha256) in order."""

    extents: int
    bytes: int
    digest: str
    seconds: float
    full_compare: bool


@dataclass(frozen=True)
class TransferResult:
    """What a copy pass did."""

    kind: CopyKind
    disk_size: int
    bytes_total: int  # bytes the pass covers (disk size, or the changed extents' total)
    bytes_resumed: int  # already done according to the checkpoint at start
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    bytes_skipped: int
    retries: int
    reconnects: int
    block_status_calls: int
    seconds: float
    verification: Verification | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class _Pass:
    """Everything one call of the engine needs."""

    kind: CopyKind
    uri: str
    destination: Destination
    job: str
    sink: CheckpointSink | None
    progress: ProgressCallback | None
    cancel: threading.Event
    verify: bool
    full_compare: bool
    extents: list[Extent] = field(default_factory=list)


class CopyEngine:
    """Copies disks from an NBD URI (usually an ``NbdkitServer``) to a ``Destination``."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()

    # ---- public API -----------------------------------------------------------------------------------

    def full_copy(
        self,
        source_uri: str,
        destination: Destination,
        *,
        job: str,
        checkpoint: CheckpointSink | None = None,
        progress: ProgressCallback | None = None,
        verify: bool = False,
        full_compare: bool = False,
        cancel: threading.Event | None = None,
    ) -> TransferResult:
        """Copy the whole disk; holes/zero runs are skipped only if the destination reads as zero."""
        return self._run(
            _Pass(
                kind="full",
                uri=source_uri,
                destination=destination,
                job=job,
                sink=checkpoint,
                progress=progress,
                cancel=cancel or threading.Event(),
                verify=verify,
                full_compare=full_compare,
            )
        )

    def copy_changed(
        self,
        source_uri: str,
        destination: Destination,
        extents: Iterable[tuple[int, int]],
        *,
        job: str,
        checkpoint: CheckpointSink | None = None,
        progress: ProgressCallback | None = None,
        full_compare: bool = False,
        cancel: threading.Event | None = None,
    ) -> TransferResult:
        """Copy changed extents (a CBT pass) and verify them.

        Extents are validated against the disk before any I/O. Every changed byte is written (zeroes
        included), then each extent's SHA-256 is compared between source and destination: a pass that
        moves a CBT changeId forward must be known good.
        """
        return self._run(
            _Pass(
                kind="cbt",
                uri=source_uri,
                destination=destination,
                job=job,
                sink=checkpoint,
                progress=progress,
                cancel=cancel or threading.Event(),
                verify=True,
                full_compare=full_compare,
                extents=[Extent(int(offset), int(length)) for offset, length in extents],
            )
        )

    async def full_copy_async(
        self,
        source_uri: str,
        destination: Destination,
        *,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> TransferResult:
        """``full_copy`` in a worker thread: progress is delivered on the event loop, and cancelling the
        awaiting task stops the copy cleanly (completed extents checkpointed)."""

        def call(cancel: threading.Event, report: ProgressCallback | None) -> TransferResult:
            return self.full_copy(source_uri, destination, cancel=cancel, progress=report, **options)

        return await _in_thread(call, progress)

    async def copy_changed_async(
        self,
        source_uri: str,
        destination: Destination,
        extents: Iterable[tuple[int, int]],
        *,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> TransferResult:
        """``copy_changed`` in a worker thread, like ``full_copy_async``."""
        extent_list = list(extents)

        def call(cancel: threading.Event, report: ProgressCallback | None) -> TransferResult:
            return self.copy_changed(
                source_uri, destination, extent_list, cancel=cancel, progress=report, **options
            )

        return await _in_thread(call, progress)

    # ---- one pass -------------------------------------------------------------------------------------

    def _run(self, spec: _Pass) -> TransferResult:
        nbdlib.load()
        started = time.monotonic()
        config = self.config
        mapper = AllocationMapper(spec.uri, config.retries, config.retry_delay, config.retry_max_delay)
        try:
            disk_size = _source_call(spec.uri, mapper.size)
            if spec.kind == "cbt":
                spec.extents = validate_changed_extents(spec.extents, disk_size)
                plan = extents_digest(spec.extents)
                total = sum(extent.length for extent in spec.extents)
            else:
                plan = f"full:{disk_size}"
                total = disk_size
            opened = spec.destination.open()
            try:
                return self._run_opened(spec, mapper, opened, disk_size, plan, total, started)
            finally:
                opened.close()
        finally:
            mapper.close()

    def _run_opened(
        self,
        spec: _Pass,
        mapper: AllocationMapper,
        opened: OpenDestination,
        disk_size: int,
        plan: str,
        total: int,
        started: float,
    ) -> TransferResult:
        if opened.size < disk_size:
            raise DestinationError(
                f"{spec.destination.description} holds {opened.size} bytes, less than the "
                f"{disk_size}-byte source disk",
                f"create or extend the destination to at least {disk_size} bytes",
            )
        previous = self._load_checkpoint(spec, disk_size, plan)
        done = previous.done_ranges() if previous else RangeSet()
        resumed = sum(end - start for start, end in done) if previous else 0
        if resumed:
            log.info("%s: resuming, %d of %d bytes already done", spec.job, resumed, total)
        copy_counters = Counters()
        if previous is None or not previous.complete:
            shared = self._copy(spec, mapper, opened, disk_size, plan, done, resumed, total)
            copy_counters = shared.counters
        verification = None
        if spec.verify or spec.full_compare:
            verification = self._verify(spec, mapper, opened, disk_size)
        return TransferResult(
            kind=spec.kind,
            disk_size=disk_size,
            bytes_total=total,
            bytes_resumed=resumed,
            bytes_read=copy_counters.bytes_read,
            bytes_written=copy_counters.bytes_written,
            bytes_zeroed=copy_counters.bytes_zeroed,
            bytes_skipped=copy_counters.bytes_skipped,
            retries=copy_counters.retries,
            reconnects=copy_counters.reconnects,
            block_status_calls=mapper.calls,
            seconds=time.monotonic() - started,
            verification=verification,
        )

    def _load_checkpoint(self, spec: _Pass, disk_size: int, plan: str) -> Checkpoint | None:
        if spec.sink is None:
            return None
        previous = spec.sink.load()
        if previous is None:
            return None
        expected = (spec.job, spec.kind, disk_size, plan)
        found = (previous.job, previous.kind, previous.disk_size, previous.plan)
        if found != expected:
            raise CheckpointMismatchError(
                f"the stored checkpoint belongs to another pass (job {previous.job!r}, {previous.kind}, "
                f"{previous.disk_size} bytes) than this one (job {spec.job!r}, {spec.kind}, "
                f"{disk_size} bytes)",
                "clear the checkpoint and copy again onto a destination not assumed to read as zero",
            )
        return previous

    # ---- copy phase -----------------------------------------------------------------------------------

    def _copy(
        self,
        spec: _Pass,
        mapper: AllocationMapper,
        opened: OpenDestination,
        disk_size: int,
        plan: str,
        done: RangeSet,
        resumed: int,
        total: int,
    ) -> Shared:
        config = self.config
        shared = self._shared(done)
        skip_zero = spec.kind == "full" and spec.destination.reads_as_zero
        items: Iterator[WorkItem]
        if spec.kind == "full":
            items = full_copy_items(
                mapper,
                disk_size,
                done,
                skip_zero=skip_zero,
                request_size=config.request_size,
                zero_request_size=config.zero_request_size,
                window=config.map_window,
                on_skip=shared.skip,
            )
        else:
            items = changed_extent_items(spec.extents, done, config.request_size)
        reporter = _Reporter(spec, "copy", total, resumed, config)
        saver = _Saver(spec, disk_size, plan, config.checkpoint_save_interval)
        workers = self._start_workers(spec.uri, opened, shared, skip_zero, verify=False)

        def housekeeping() -> None:
            if spec.cancel.is_set():
                shared.stop.set()
            saver.maybe_save(shared)
            if not shared.stop.is_set():
                reporter.maybe_report(shared.counters.bytes_done)

        try:
            self._feed(items, shared, housekeeping)
            self._wait(workers, housekeeping)
        except BaseException as error:
            shared.fail(error)
            self._wait(workers, lambda: None)
        saver.save(shared, complete=shared.failure is None and not spec.cancel.is_set())
        if shared.failure is not None:
            raise shared.failure
        if spec.cancel.is_set():
            raise TransferCancelledError(
                f"{spec.job}: copy cancelled; {shared.durable.total()} bytes are checkpointed",
                "run the transfer again to resume",
            )
        return shared

    def _shared(self, done: RangeSet) -> Shared:
        depth = self.config.connections * self.config.requests * 2
        return Shared(work=queue.Queue(maxsize=depth), durable=done.copy())

    def _start_workers(
        self, uri: str, opened: OpenDestination, shared: Shared, skip_zero: bool, verify: bool
    ) -> list[Worker]:
        config = self.config
        settings = WorkerSettings(
            requests=config.requests,
            request_size=config.request_size,
            retries=config.retries,
            retry_delay=config.retry_delay,
            retry_max_delay=config.retry_max_delay,
            flush_interval=config.checkpoint_interval,
            flush_bytes=config.checkpoint_bytes,
            zero_granularity=config.zero_granularity,
            zero_refine=config.zero_refine,
            poll_timeout=config.poll_timeout,
            skip_zero=skip_zero,
        )
        workers: list[Worker] = []
        try:
            for index in range(config.connections):
                worker = Worker(f"vmferry-copy-{index}", uri, opened.writer(), shared, settings, verify)
                _source_call(uri, worker.connect)
                workers.append(worker)
        except BaseException:
            shared.stop.set()
            raise
        for worker in workers:
            worker.start()
        return workers

    def _feed(self, items: Iterator[WorkItem], shared: Shared, housekeeping: Callable[[], None]) -> None:
        next_housekeeping = 0.0
        for item in items:
            while not shared.stop.is_set():
                now = time.monotonic()
                if now >= next_housekeeping:
                    housekeeping()
                    next_housekeeping = now + 0.1
                try:
                    shared.work.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if shared.stop.is_set():
                break
        shared.planned_all.set()

    def _wait(self, workers: list[Worker], housekeeping: Callable[[], None]) -> None:
        for worker in workers:
            while worker.is_alive():
                worker.join(timeout=0.1)
                housekeeping()

    # ---- verification ---------------------------------------------------------------------------------

    def _verify(
        self, spec: _Pass, mapper: AllocationMapper, opened: OpenDestination, disk_size: int
    ) -> Verification:
        started = time.monotonic()
        extents = 0
        verified = 0
        digest = hashlib.sha256().hexdigest()
        if spec.verify:
            extents, verified, digest = self._verify_extents(spec, mapper, opened, disk_size)
        if spec.full_compare:
            full_compare(spec.uri, spec.destination)
        return Verification(
            extents=extents,
            bytes=verified,
            digest=digest,
            seconds=time.monotonic() - started,
            full_compare=spec.full_compare,
        )

    def _verify_extents(
        self, spec: _Pass, mapper: AllocationMapper, opened: OpenDestination, disk_size: int
    ) -> tuple[int, int, str]:
        config = self.config
        shared = self._shared(RangeSet())
        if spec.kind == "cbt":
            extents: Iterator[Extent] = iter(spec.extents)
            total = sum(extent.length for extent in spec.extents)
        else:
            extents = data_extents(mapper, disk_size, config.map_window, lambda start, end: shared.count(
                bytes_done=end - start
            ))  # fmt: skip
            total = disk_size
        reporter = _Reporter(spec, "verify", total, 0, config)
        workers = self._start_workers(spec.uri, opened, shared, skip_zero=False, verify=True)

        def housekeeping() -> None:
            if spec.cancel.is_set():
                shared.stop.set()
            if not shared.stop.is_set():
                reporter.maybe_report(shared.counters.bytes_done)

        try:
            self._feed(verify_items(extents, config.request_size), shared, housekeeping)
            self._wait(workers, housekeeping)
        except BaseException as error:
            shared.fail(error)
            self._wait(workers, lambda: None)
        if isinstance(shared.failure, VerificationError) and spec.sink is not None:
            spec.sink.clear()  # the copy is wrong: the whole pass must run again
        if shared.failure is not None:
            raise shared.failure
        if spec.cancel.is_set():
            raise TransferCancelledError(f"{spec.job}: verification cancelled", "run the transfer again")
        combined = hashlib.sha256()
        for offset, length, value in sorted(shared.digests):
            combined.update(f"{offset}+{length}:".encode() + value)
        return len(shared.digests), sum(length for _, length, _ in shared.digests), combined.hexdigest()


def _source_call(uri: str, call: Callable[[], T]) -> T:
    """Run a first call on the source, turning a refused connection into an actionable error."""
    try:
        return call()
    except nbdlib.error_type() as error:
        raise TransferError(
            f"cannot open the source disk at {uri}: {error}",
            "the source server is not running or refused the connection: start it (NbdkitServer) and "
            "check its log",
        ) from error


def full_compare(source_uri: str, destination: Destination) -> None:
    """Compare the whole disk with ``qemu-img compare`` (uses block status on both sides)."""
    argv = ["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", source_uri, destination.compare_target]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return
    message = (result.stdout + result.stderr).strip()
    if result.returncode == 1:
        offset = _mismatch_offset(message)
        raise VerificationError(
            f"qemu-img compare: the destination differs from the source ({message})",
            "run the pass again as a full copy onto a destination not assumed to read as zero; if it "
            "repeats, check the destination volume for I/O errors",
            offset=offset if offset is not None else -1,
        )
    raise VerificationError(
        f"qemu-img compare could not compare the disks (status {result.returncode}): {message}",
        "check that qemu-img is installed (scripts/setup-dataplane) and both sides are readable",
        offset=-1,
    )


def _mismatch_offset(message: str) -> int | None:
    marker = "offset "
    if marker not in message:
        return None
    digits = message.split(marker, 1)[1].split("!", 1)[0].strip()
    return int(digits) if digits.isdigit() else None


class _Reporter:
    """Calls the progress callback at most every ``progress_interval`` seconds."""

    def __init__(self, spec: _Pass, phase: str, total: int, resumed: int, config: EngineConfig) -> None:
        self._callback = spec.progress
        self._phase = phase
        self._total = total
        self._resumed = resumed
        self._interval = config.progress_interval
        self._last_time = time.monotonic()
        self._last_done = 0

    def maybe_report(self, done_this_run: int) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        elapsed = now - self._last_time
        if elapsed < self._interval:
            return
        rate = (done_this_run - self._last_done) / elapsed
        done = min(self._total, self._resumed + done_this_run)
        eta = (self._total - done) / rate if rate > 0 else None
        self._last_time, self._last_done = now, done_this_run
        try:
            self._callback(Progress(phase=self._phase, done=done, total=self._total, rate=rate, eta=eta))
        except Exception:
            log.exception("progress callback failed")


class _Saver:
    """Saves checkpoints of durable ranges, at most every ``interval`` seconds and only on change."""

    def __init__(self, spec: _Pass, disk_size: int, plan: str, interval: float) -> None:
        self._spec = spec
        self._disk_size = disk_size
        self._plan = plan
        self._interval = interval
        self._saved_version = 0
        self._last = 0.0

    def maybe_save(self, shared: Shared) -> None:
        if self._spec.sink is None or shared.durable_version == self._saved_version:
            return
        if time.monotonic() - self._last >= self._interval:
            self.save(shared, complete=False)

    def save(self, shared: Shared, complete: bool) -> None:
        if self._spec.sink is None:
            return
        with shared.lock:
            version = shared.durable_version
            pairs = shared.durable.as_pairs()
        if version == self._saved_version and not complete and self._last:
            return
        checkpoint = Checkpoint(
            job=self._spec.job,
            kind=self._spec.kind,
            disk_size=self._disk_size,
            plan=self._plan,
            done=pairs,
            bytes_done=sum(end - start for start, end in pairs),
            complete=complete,
        )
        self._spec.sink.save(checkpoint)
        self._saved_version = version
        self._last = time.monotonic()


async def _in_thread(
    call: Callable[[threading.Event, ProgressCallback | None], T], progress: ProgressCallback | None
) -> T:
    """Run ``call`` in a thread; progress reports hop to the event loop; cancellation stops the copy."""
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    report: ProgressCallback | None = None
    if progress is not None:
        callback = progress

        def report(update: Progress) -> None:
            loop.call_soon_threadsafe(callback, update)

    future = asyncio.ensure_future(asyncio.to_thread(call, cancel, report))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(TransferCancelledError):
            await future
        raise
