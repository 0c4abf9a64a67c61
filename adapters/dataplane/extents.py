"""Byte ranges of a disk: changed-extent validation, request splitting, block-status maps and the
merged range sets that record which parts of a copy are done. Pure code, no I/O."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from vmferry.adapters.dataplane.errors import ExtentError

STATE_HOLE = 1
STATE_ZERO = 2


class Extent(NamedTuple):
    """``length`` bytes starting at byte ``offset``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.length


class MappedExtent(NamedTuple):
    """An extent of the source's allocation map; ``zero`` means it reads as zeroes."""

    offset: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.length


def validate_changed_extents(extents: Iterable[tuple[int, int]], disk_size: int) -> list[Extent]:
    """Check a changed-extent list (e.g. from QueryChangedDiskAreas) before anything is copied.

    Every extent must have a positive length and lie inside the disk; overlaps mean the list is not what
    the source reported and are rejected. Extents are sorted and touching neighbours merged.
    """
    items = sorted(Extent(int(offset), int(length)) for offset, length in extents)
    for extent in items:
        if extent.offset < 0 or extent.length <= 0:
            raise ExtentError(
                f"changed extent {extent.offset}+{extent.length} has a negative offset or no length",
                "the changed-block list is corrupt: query the changed areas again",
            )
        if extent.end > disk_size:
            raise ExtentError(
                f"changed extent {extent.offset}+{extent.length} ends at {extent.end}, "
                f"past the end of the {disk_size}-byte disk",
                "the changed-block list belongs to another disk or an older disk size: query it again "
                "for this disk and snapshot (after a resize, do a full copy)",
            )
    merged: list[Extent] = []
    for extent in items:
        if merged and extent.offset < merged[-1].end:
            previous = merged[-1]
            raise ExtentError(
                f"changed extents {previous.offset}+{previous.length} and {extent.offset}+{extent.length} "
                "overlap",
                "the changed-block list is inconsistent: query the changed areas again",
            )
        if merged and extent.offset == merged[-1].end:
            merged[-1] = Extent(merged[-1].offset, merged[-1].length + extent.length)
        else:
            merged.append(extent)
    return merged


def split(extents: Iterable[Extent], max_length: int) -> Iterator[Extent]:
    """Cut extents into pieces of at most ``max_length`` bytes."""
    if max_length <= 0:
        raise ValueError("max_length must be positive")
    for extent in extents:
        offset = extent.offset
        while offset < extent.end:
            length = min(max_length, extent.end - offset)
            yield Extent(offset, length)
            offset += length


def extents_digest(extents: Sequence[Extent]) -> str:
    """A stable fingerprint of an extent list, to tie a checkpoint to the pass that wrote it."""
    digest = hashlib.sha256()
    for extent in extents:
        digest.update(f"{extent.offset}+{extent.length};".encode())
    return digest.hexdigest()


def parse_block_status(window_start: int, window_end: int, entries: Sequence[int]) -> list[MappedExtent]:
    """Turn a ``base:allocation`` reply (flat ``[length, flags, ...]``) into extents inside the window.

    Servers may describe less than asked (the caller continues from the last end) or more (clipped
    here). A hole that does not also read as zero is data: only ``STATE_ZERO`` allows skipping.
    """
    mapped: list[MappedExtent] = []
    offset = window_start
    for index in range(0, len(entries) - 1, 2):
        length, flags = entries[index], entries[index + 1]
        if length <= 0 or offset >= window_end:
            break
        length = min(length, window_end - offset)
        zero = bool(flags & STATE_ZERO)
        if mapped and mapped[-1].zero == zero and mapped[-1].end == offset:
            last = mapped[-1]
            mapped[-1] = MappedExtent(last.offset, last.length + length, zero)
        else:
            mapped.append(MappedExtent(offset, length, zero))
        offset += length
    return mapped


class RangeSet:
    """Disjoint, sorted, merged half-open byte ranges; records completed parts of a copy."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Include ``[start, end)``, merging with touching or overlapping ranges."""
        if end <= start:
            return
        left = bisect.bisect_left(self._ends, start)
        right = bisect.bisect_right(self._starts, end)
        if left < right:
            start = min(start, self._starts[left])
            end = max(end, self._ends[right - 1])
        self._starts[left:right] = [start]
        self._ends[left:right] = [end]

    def update(self, other: RangeSet) -> None:
        """Include every range of ``other``."""
        for start, end in other:
            self.add(start, end)

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of ``[start, end)`` not yet included."""
        position = start
        index = bisect.bisect_right(self._ends, start)
        while position < end and index < len(self._starts):
            covered_start, covered_end = self._starts[index], self._ends[index]
            if covered_start >= end:
                break
            if covered_start > position:
                yield position, covered_start
            position = max(position, covered_end)
            index += 1
        if position < end:
            yield position, end

    def covers(self, start: int, end: int) -> bool:
        """True when all of ``[start, end)`` is included."""
        return next(self.gaps(start, end), None) is None

    def total(self) -> int:
        """Number of bytes included."""
        return sum(end - start for start, end in self)

    def copy(self) -> RangeSet:
        """An independent copy."""
        clone = RangeSet()
        clone._starts = list(self._starts)
        clone._ends = list(self._ends)
        return clone

    def clear(self) -> None:
        """Remove every range."""
        self._starts.clear()
        self._ends.clear()

    def as_pairs(self) -> list[tuple[int, int]]:
        """The ranges as ``(start, end)`` pairs."""
        return list(zip(self._starts, self._ends, strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self.as_pairs() == other.as_pairs()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RangeSet({self.as_pairs()!r})"
