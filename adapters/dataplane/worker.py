"""One copy connection: a thread keeping many libnbd reads in flight on its own source connection,
writing results through its own destination writer, retrying failed requests with backoff,
reconnecting a dead connection, and flushing before it reports ranges as durable.

libnbd releases the GIL while it waits and copies, so connections run in parallel threads.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import itertools
import logging
import mmap
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.destinations import DestinationWriter
from vmferry.adapters.dataplane.errors import TransferError, VerificationError
from vmferry.adapters.dataplane.extents import RangeSet
from vmferry.adapters.dataplane.planning import Op, WorkItem, zero_runs

log = logging.getLogger(__name__)

_IDLE_WAIT = 0.01  # seconds an idle worker waits for work before checking whether the pass is over


@dataclass(frozen=True)
class WorkerSettings:
    """Tuning shared by all workers of a pass (see ``EngineConfig``)."""

    requests: int
    request_size: int
    retries: int
    retry_delay: float
    retry_max_delay: float
    flush_interval: float
    flush_bytes: int
    zero_granularity: int
    zero_refine: int
    poll_timeout: float
    skip_zero: bool  # zero runs need no write (full copy onto a destination that reads as zero)


@dataclass
class Counters:
    """What a pass did, summed over workers."""

    bytes_done: int = 0  # source bytes whose work is complete (copied, zeroed, skipped or verified)
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    retries: int = 0
    reconnects: int = 0


@dataclass
class Shared:
    """State the coordinator and the workers of one pass share."""

    work: queue.Queue[WorkItem]
    durable: RangeSet
    lock: threading.Lock = field(default_factory=threading.Lock)
    planned_all: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None
    durable_version: int = 0
    counters: Counters = field(default_factory=Counters)
    digests: list[tuple[int, int, bytes]] = field(default_factory=list)

    def fail(self, error: BaseException) -> None:
        """Record the first failure and stop every worker."""
        with self.lock:
            if self.failure is None:
                self.failure = error
        self.stop.set()

    def publish_durable(self, ranges: RangeSet) -> None:
        """Ranges that are on stable storage now."""
        with self.lock:
            self.durable.update(ranges)
            self.durable_version += 1

    def skip(self, start: int, end: int) -> None:
        """A range that needs no I/O at all (zero on a destination that reads as zero)."""
        with self.lock:
            self.durable.add(start, end)
            self.durable_version += 1
            self.counters.bytes_done += end - start
            self.counters.bytes_skipped += end - start

    def count(self, **amounts: int) -> None:
        """Add to the counters."""
        with self.lock:
            for name, amount in amounts.items():
                setattr(self.counters, name, getattr(self.counters, name) + amount)

    def exhausted(self) -> bool:
        """True once the planner is finished and every item has been taken."""
        return self.planned_all.is_set() and self.work.empty()


class _Slot:
    """A reusable read buffer (and, when verifying, a second one for the destination).

    Anonymous mmaps: page-aligned, and free to create (the kernel supplies pages on first touch), so a
    pass does not pay for zero-filling buffers it may never fill completely.
    """

    def __init__(self, size: int, verify: bool) -> None:
        self.memory = mmap.mmap(-1, size)
        self.view = memoryview(self.memory)
        self.full_buffer = nbdlib.buffer_over(self.view)
        self.verify_view = memoryview(mmap.mmap(-1, size)) if verify else memoryview(b"")
        self.item: WorkItem | None = None
        self.buffer: nbdlib.NbdBuffer = self.full_buffer

    def buffer_for(self, length: int) -> nbdlib.NbdBuffer:
        self.buffer = (
            self.full_buffer if length == len(self.memory) else nbdlib.buffer_over(self.view[:length])
        )
        return self.buffer


class Worker(threading.Thread):
    """Copies (or verifies) work items from the shared queue over one source connection."""

    def __init__(
        self,
        name: str,
        uri: str,
        writer: DestinationWriter,
        shared: Shared,
        settings: WorkerSettings,
        verify: bool = False,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._uri = uri
        self._writer = writer
        self._shared = shared
        self._settings = settings
        self._verify = verify
        self._handle: nbdlib.NbdHandle | None = None
        self._nbd_error = nbdlib.error_type()
        self._slots = [_Slot(settings.request_size, verify) for _ in range(settings.requests)]
        self._free = list(self._slots)
        self._in_flight = 0
        self._completed: deque[tuple[_Slot, WorkItem, int]] = deque()
        self._backlog: deque[WorkItem] = deque()
        self._retry_heap: list[tuple[float, int, WorkItem]] = []
        self._sequence = itertools.count()
        self._pending = RangeSet()
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._reconnect_failures = 0
        self._reconnect_due = 0.0
        self._writer_broken = False
        self._generation = 0  # bumped when a connection is dropped: its late completions are ignored

    # ---- thread body ----------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the source connection (called before the thread starts, so errors surface early)."""
        handle = nbdlib.connect(self._uri)
        handle.set_pread_initialize(False)  # buffers are only used after a successful read
        self._handle = handle

    def run(self) -> None:
        """Thread body: work until the queue is drained or the pass stops; record any failure."""
        try:
            self._loop()
        except BaseException as error:
            self._shared.fail(error)
        finally:
            self._finish()

    def _loop(self) -> None:
        shared = self._shared
        while not shared.stop.is_set():
            self._issue()
            if self._in_flight and self._handle is not None:
                self._poll(self._handle)
                self._handle_completions()
                self._flush_if_due()
                continue
            self._flush_if_due()
            if self._retry_heap or self._handle is None:
                time.sleep(self._settings.poll_timeout)
                continue
            if shared.exhausted() and not self._backlog:
                break
            try:  # idle: wait briefly, so the end of the work is noticed at once
                self._backlog.append(shared.work.get(timeout=_IDLE_WAIT))
            except queue.Empty:
                continue

    def _finish(self) -> None:
        """Settle outstanding reads, then make what was written durable and report it."""
        deadline = time.monotonic() + 10
        while self._in_flight and self._handle is not None and time.monotonic() < deadline:
            try:
                self._handle.poll(100)
            except self._nbd_error:
                break
            if self._shared.failure is None:
                try:
                    self._handle_completions()
                except BaseException as error:
                    self._shared.fail(error)
            else:
                self._completed.clear()
                self._in_flight = self._handle.aio_in_flight()
        try:
            if self._pending and not self._writer_broken:
                self._flush()
        except BaseException as error:
            self._shared.fail(error)
        finally:
            if self._handle is not None:
                nbdlib.shutdown_quietly(self._handle)
                self._handle = None
            self._writer.close()

    # ---- issuing and completing -----------------------------------------------------------------------

    def _next_item(self) -> WorkItem | None:
        if self._retry_heap and self._retry_heap[0][0] <= time.monotonic():
            return heapq.heappop(self._retry_heap)[2]
        if self._backlog:
            return self._backlog.popleft()
        try:
            return self._shared.work.get_nowait()
        except queue.Empty:
            return None

    def _issue(self) -> None:
        if self._handle is None and not self._reconnect():
            return
        handle = self._handle
        if handle is None:
            return
        while self._free and not self._shared.stop.is_set():
            item = self._next_item()
            if item is None:
                return
            if item.op is Op.ZERO:
                self._zero(item)
                continue
            slot = self._free.pop()
            slot.item = item
            try:
                handle.aio_pread(slot.buffer_for(item.length), item.offset, self._completion(slot, item))
            except self._nbd_error as error:
                slot.item = None
                self._free.append(slot)
                self._backlog.appendleft(item)
                self._connection_lost(error)
                return
            self._in_flight += 1

    def _completion(self, slot: _Slot, item: WorkItem) -> nbdlib.CompletionCallback:
        generation = self._generation

        def completed(error: object) -> int:
            # Runs inside libnbd's poll on this thread: queue the result, do the work in the loop.
            # Completions of a connection dropped meanwhile were already handled as failures.
            if generation == self._generation:
                self._completed.append((slot, item, int(getattr(error, "value", 0))))
            return 1  # retire the command

        return completed

    def _poll(self, handle: nbdlib.NbdHandle) -> None:
        try:
            handle.poll(max(1, int(self._settings.poll_timeout * 1000)))
        except self._nbd_error as error:
            self._handle_completions()
            self._connection_lost(error)

    def _handle_completions(self) -> None:
        while self._completed:
            slot, item, code = self._completed.popleft()
            slot.item = None
            self._in_flight -= 1
            try:
                if code:
                    self._retry(item, OSError(code, os.strerror(code)), "reading the source")
                else:
                    self._reconnect_failures = 0
                    self._deliver(item, slot)
            finally:
                self._free.append(slot)

    def _deliver(self, item: WorkItem, slot: _Slot) -> None:
        if item.op is Op.VERIFY:
            self._compare(item, slot)
            return
        view = slot.view[: item.length]
        runs = zero_runs(
            slot.buffer.is_zero, item.length, self._settings.zero_granularity, self._settings.zero_refine
        )
        written = zeroed = skipped = 0
        try:
            for start, length, zero in runs:
                if not zero:
                    self._writer.write(item.offset + start, view[start : start + length])
                    written += length
                elif self._settings.skip_zero:
                    skipped += length
                else:
                    self._writer.zero(item.offset + start, length)
                    zeroed += length
        except (OSError, self._nbd_error) as error:
            self._retry(item, error, "writing the destination")
            return
        self._completed_range(item)
        self._shared.count(
            bytes_done=item.length,
            bytes_read=item.length,
            bytes_written=written,
            bytes_zeroed=zeroed,
            bytes_skipped=skipped,
        )

    def _zero(self, item: WorkItem) -> None:
        try:
            self._writer.zero(item.offset, item.length)
        except (OSError, self._nbd_error) as error:
            self._retry(item, error, "zeroing the destination")
            return
        self._completed_range(item)
        self._shared.count(bytes_done=item.length, bytes_zeroed=item.length)

    def _compare(self, item: WorkItem, slot: _Slot) -> None:
        source = slot.view[: item.length]
        destination = slot.verify_view[: item.length]
        try:
            self._writer.read_into(item.offset, destination)
        except (OSError, self._nbd_error) as error:
            self._retry(item, error, "reading the destination for verification")
            return
        source_digest = hashlib.sha256(source).digest()
        if hashlib.sha256(destination).digest() != source_digest:
            offset = item.offset + _first_difference(source, destination)
            raise VerificationError(
                f"the destination differs from the source at offset {offset} (in the extent "
                f"{item.offset}+{item.length})",
                "the copy is not trustworthy: the pass's checkpoint was discarded; run the pass again "
                "(a full copy onto a destination no longer known to read as zero); if it repeats, "
                "check the destination volume and host for I/O errors",
                offset=offset,
            )
        with self._shared.lock:
            self._shared.digests.append((item.offset, item.length, source_digest))
            self._shared.counters.bytes_done += item.length
            self._shared.counters.bytes_read += item.length

    def _completed_range(self, item: WorkItem) -> None:
        self._pending.add(item.offset, item.end)
        self._pending_bytes += item.length

    # ---- failures -------------------------------------------------------------------------------------

    def _retry(self, item: WorkItem, error: BaseException, action: str) -> None:
        item.attempts += 1
        self._shared.count(retries=1)
        code = _errno_of(error)
        if item.attempts > self._settings.retries:
            if action != "reading the source":
                self._writer_broken = True
            reason = os.strerror(code) if code else str(error)
            raise TransferError(
                f"{action} at offset {item.offset} ({item.length} bytes) failed after {item.attempts} "
                f"attempts: {reason}",
                fix_for(code, action),
                offset=item.offset,
                length=item.length,
            ) from error
        delay = min(self._settings.retry_max_delay, self._settings.retry_delay * 2 ** (item.attempts - 1))
        log.warning(
            "%s at %d+%d failed (%s); attempt %d, retrying in %.1f s",
            action, item.offset, item.length, error, item.attempts, delay,
        )  # fmt: skip
        heapq.heappush(self._retry_heap, (time.monotonic() + delay, next(self._sequence), item))

    def _connection_lost(self, error: BaseException) -> None:
        log.warning("%s: source connection lost (%s)", self.name, error)
        self._handle = None  # the binding closes the handle when it is released
        self._generation += 1
        self._completed.clear()
        self._in_flight = 0
        for slot in self._slots:  # reads libnbd did not fail before the connection died
            item = slot.item
            if item is None:
                continue
            slot.item = None
            self._free.append(slot)
            self._retry(item, OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN)), "reading the source")
        self._schedule_reconnect(error)

    def _schedule_reconnect(self, error: BaseException) -> None:
        self._reconnect_failures += 1
        if self._reconnect_failures > self._settings.retries:
            raise TransferError(
                f"the connection to the source ({self._uri}) was lost and could not be re-established "
                f"after {self._settings.retries} attempts: {error}",
                "the source server stopped or the network broke: check the nbdkit log and the source "
                "host, then run the transfer again (it resumes from the last checkpoint)",
            ) from error
        delay = min(
            self._settings.retry_max_delay, self._settings.retry_delay * 2 ** (self._reconnect_failures - 1)
        )
        self._reconnect_due = time.monotonic() + delay

    def _reconnect(self) -> bool:
        if time.monotonic() < self._reconnect_due:
            return False
        try:
            self.connect()
        except self._nbd_error as error:
            self._schedule_reconnect(error)
            return False
        self._shared.count(reconnects=1)
        log.info("%s: reconnected to the source", self.name)
        return True

    # ---- durability -----------------------------------------------------------------------------------

    def _flush_if_due(self) -> None:
        if not self._pending:
            return
        due = time.monotonic() - self._last_flush >= self._settings.flush_interval
        if due or self._pending_bytes >= self._settings.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        try:
            self._writer.flush()
        except (OSError, self._nbd_error) as error:
            self._writer_broken = True
            code = _errno_of(error)
            raise TransferError(
                f"flushing the destination failed: {os.strerror(code) if code else error}",
                fix_for(code, "writing the destination"),
            ) from error
        pending, self._pending = self._pending, RangeSet()
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._shared.publish_durable(pending)


def _errno_of(error: BaseException) -> int | None:
    if isinstance(error, OSError) and error.errno:
        return error.errno
    return nbdlib.errno_of(error)


def _first_difference(left: memoryview, right: memoryview) -> int:
    step = 4096
    for start in range(0, len(left), step):
        if left[start : start + step] != right[start : start + step]:
            for index in range(start, min(start + step, len(left))):
                if left[index] != right[index]:
                    return index
    return 0


_RESUME = "then run the transfer again: it resumes from the last checkpoint"
_SOURCE_FIXES = {
    errno.EIO: "the source could not read this part of the disk: check the datastore and the ESXi host "
    "(vmkernel log) and that the snapshot still exists, " + _RESUME,
    errno.ENOTCONN: "the connection to the source broke: check the nbdkit log and the network, " + _RESUME,
    errno.ECONNRESET: "the connection to the source broke: check the nbdkit log and the network, " + _RESUME,
    errno.EPIPE: "the connection to the source broke: check the nbdkit log and the network, " + _RESUME,
    errno.ETIMEDOUT: "the source host stopped answering in time: check its load and the network, " + _RESUME,
}
_DESTINATION_FIXES = {
    errno.ENOSPC: "the destination is full or smaller than the disk: extend the volume, " + _RESUME,
    errno.EROFS: "the destination is read-only: attach it writable, " + _RESUME,
    errno.EACCES: "this process may not write the destination: fix its permissions, " + _RESUME,
    errno.EPERM: "this process may not write the destination: fix its permissions, " + _RESUME,
}


def fix_for(code: int | None, action: str) -> str:
    """What an operator can do about a request that kept failing."""
    if action == "reading the source":
        return _SOURCE_FIXES.get(code or 0, "see the source server's log for the cause, " + _RESUME)
    return _DESTINATION_FIXES.get(
        code or 0, "check the destination volume (attached, healthy, writable), " + _RESUME
    )
