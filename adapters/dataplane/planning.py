"""What a copy pass has to do, as a lazy stream of bounded work items.

A full copy maps the source with ``base:allocation`` block status one bounded window at a time (so
copying starts at once and memory stays flat on multi-terabyte disks); a CBT pass cuts its validated
changed extents into requests. Both leave out ranges a checkpoint already records as done.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.errors import TransferError
from vmferry.adapters.dataplane.extents import Extent, MappedExtent, RangeSet, parse_block_status, split

log = logging.getLogger(__name__)

MAX_WINDOW = 2 << 30  # block-status lengths are 32-bit on the wire: stay far below 4 GiB


class Op(enum.Enum):
    """What a worker does with an item."""

    COPY = "copy"  # read from the source, write data (zero runs zeroed, or skipped where allowed)
    ZERO = "zero"  # make the destination range read as zero without reading the source
    VERIFY = "verify"  # read both sides and compare digests


@dataclass(slots=True)
class WorkItem:
    """A bounded request: ``length`` bytes at ``offset``."""

    offset: int
    length: int
    op: Op
    attempts: int = 0

    @property
    def end(self) -> int:
        """First byte after the item."""
        return self.offset + self.length


class AllocationMapper:
    """Reads the source's allocation map through its own connection, retrying and reconnecting."""

    def __init__(self, uri: str, retries: int, retry_delay: float, retry_max_delay: float) -> None:
        self._uri = uri
        self._retries = retries
        self._retry_delay = retry_delay
        self._retry_max_delay = retry_max_delay
        self._handle: nbdlib.NbdHandle | None = None
        self.has_block_status = True
        self.calls = 0

    def _connect(self) -> nbdlib.NbdHandle:
        if self._handle is None:
            handle = nbdlib.connect(self._uri, block_status=True)
            self.has_block_status = handle.can_meta_context(nbdlib.BASE_ALLOCATION)
            self._handle = handle
        return self._handle

    def size(self) -> int:
        """Virtual size of the source."""
        return self._connect().get_size()

    def map_window(self, offset: int, length: int) -> list[MappedExtent]:
        """Extents covering ``[offset, offset + k)`` for some ``0 < k <= length``."""
        attempt = 0
        while True:
            try:
                return self._map_once(offset, length)
            except nbdlib.error_type() as error:
                attempt += 1
                if attempt > self._retries:
                    raise TransferError(
                        f"reading the source's allocation map at offset {offset} failed after {attempt} "
                        f"attempts: {error}",
                        "the source server stopped answering block-status requests: check its log and "
                        "the connection to the source host, then run the transfer again (it resumes)",
                        offset=offset,
                        length=length,
                    ) from error
                log.warning("block status at %d failed (%s); retrying", offset, error)
                if self._handle is not None and self._handle.aio_is_dead():
                    self._handle = None
                time.sleep(min(self._retry_max_delay, self._retry_delay * 2 ** (attempt - 1)))

    def _map_once(self, offset: int, length: int) -> list[MappedExtent]:
        handle = self._connect()
        if not self.has_block_status:
            return [MappedExtent(offset, length, zero=False)]
        replies: list[list[int]] = []

        def collect(context: str, _start: int, entries: list[int], _error: object) -> int:
            if context == nbdlib.BASE_ALLOCATION:
                replies.append(list(entries))
            return 0

        handle.block_status(length, offset, collect)
        self.calls += 1
        mapped: list[MappedExtent] = []
        for entries in replies:
            mapped = parse_block_status(offset, offset + length, entries)
            if mapped:
                break
        if not mapped:  # a server that answers with nothing: treat the window as data
            return [MappedExtent(offset, length, zero=False)]
        return mapped

    def close(self) -> None:
        """Disconnect."""
        if self._handle is not None:
            nbdlib.shutdown_quietly(self._handle)
            self._handle = None


def full_copy_items(
    mapper: AllocationMapper,
    size: int,
    done: RangeSet,
    *,
    skip_zero: bool,
    request_size: int,
    zero_request_size: int,
    window: int,
    on_skip: Callable[[int, int], None],
) -> Iterator[WorkItem]:
    """Work items of a full copy: data extents as COPY requests, zero extents skipped or zeroed."""
    window = min(window, MAX_WINDOW)
    position = 0
    while position < size:
        length = min(window, size - position)
        if done.covers(position, position + length):  # resumed: no need to map what is done
            position += length
            continue
        mapped = mapper.map_window(position, length)
        for extent in mapped:
            for start, end in done.gaps(extent.offset, extent.end):
                if not extent.zero:
                    for piece in split([Extent(start, end - start)], request_size):
                        yield WorkItem(piece.offset, piece.length, Op.COPY)
                elif skip_zero:
                    on_skip(start, end)
                else:
                    for piece in split([Extent(start, end - start)], zero_request_size):
                        yield WorkItem(piece.offset, piece.length, Op.ZERO)
        position = mapped[-1].end


def changed_extent_items(extents: list[Extent], done: RangeSet, request_size: int) -> Iterator[WorkItem]:
    """Work items of a CBT pass: every changed byte is read and written (zeroes included)."""
    for extent in extents:
        for start, end in done.gaps(extent.offset, extent.end):
            for piece in split([Extent(start, end - start)], request_size):
                yield WorkItem(piece.offset, piece.length, Op.COPY)


def verify_items(extents: Iterator[Extent], request_size: int) -> Iterator[WorkItem]:
    """Work items comparing source and destination over ``extents``."""
    for piece in split(extents, request_size):
        yield WorkItem(piece.offset, piece.length, Op.VERIFY)


def data_extents(
    mapper: AllocationMapper, size: int, window: int, on_zero: Callable[[int, int], None]
) -> Iterator[Extent]:
    """The source's data extents (what a full copy copied), mapping window by window."""
    window = min(window, MAX_WINDOW)
    position = 0
    while position < size:
        mapped = mapper.map_window(position, min(window, size - position))
        for extent in mapped:
            if extent.zero:
                on_zero(extent.offset, extent.end)
            else:
                yield Extent(extent.offset, extent.length)
        position = mapped[-1].end


def zero_runs(
    is_zero: Callable[[int, int], bool], length: int, granularity: int, refine: int
) -> list[tuple[int, int, bool]]:
    """Split a buffer of ``length`` bytes into runs ``(start, length, is_zero)``.

    Checked in ``granularity`` blocks; the edges of each data run are then trimmed in ``refine``
    steps, so a thick disk's zero areas are found almost exactly at little cost.
    """
    if is_zero(0, length):
        return [(0, length, True)]
    runs: list[tuple[int, int, bool]] = []
    for start in range(0, length, granularity):
        size = min(granularity, length - start)
        zero = is_zero(start, size)
        if runs and runs[-1][2] == zero:
            previous = runs[-1]
            runs[-1] = (previous[0], previous[1] + size, zero)
        else:
            runs.append((start, size, zero))
    if len(runs) == 1 or refine >= granularity:
        return runs
    return _refine_edges(runs, is_zero, refine)


def _refine_edges(
    runs: list[tuple[int, int, bool]], is_zero: Callable[[int, int], bool], refine: int
) -> list[tuple[int, int, bool]]:
    refined: list[tuple[int, int, bool]] = []

    def append(start: int, end: int, zero: bool) -> None:
        if end <= start:
            return
        if refined and refined[-1][2] == zero:
            refined[-1] = (refined[-1][0], end - refined[-1][0], zero)
        else:
            refined.append((start, end - start, zero))

    for start, size, zero in runs:
        if zero:
            append(start, start + size, True)
            continue
        data_start, data_end = start, start + size
        while data_start < data_end and is_zero(data_start, min(refine, data_end - data_start)):
            data_start += min(refine, data_end - data_start)
        while data_end > data_start:
            step = (data_end - start) % refine or refine
            if not is_zero(data_end - step, step):
                break
            data_end -= step
        append(start, data_start, True)
        append(data_start, data_end, False)
        append(data_end, start + size, True)
    return refined
