"""Pure range logic: changed-extent validation, splitting, block-status parsing, range sets, zero runs."""

from __future__ import annotations

import random

import pytest

from vmferry.adapters.dataplane.errors import ExtentError
from vmferry.adapters.dataplane.extents import (
    Extent,
    MappedExtent,
    RangeSet,
    extents_digest,
    parse_block_status,
    split,
    validate_changed_extents,
)
from vmferry.adapters.dataplane.planning import zero_runs


def test_changed_extents_are_sorted_and_touching_ones_merged() -> None:
    result = validate_changed_extents([(8192, 4096), (0, 4096), (4096, 4096), (65536, 512)], 1 << 20)
    assert result == [Extent(0, 12288), Extent(65536, 512)]


@pytest.mark.parametrize(
    ("extents", "words"),
    [
        ([(1 << 20, 1)], "past the end"),
        ([((1 << 20) - 4096, 8192)], "past the end"),
        ([(-4096, 4096)], "negative offset"),
        ([(0, 0)], "no length"),
        ([(0, 8192), (4096, 4096)], "overlap"),
    ],
)
def test_bad_changed_extents_are_rejected_with_a_fix(extents: list[tuple[int, int]], words: str) -> None:
    with pytest.raises(ExtentError) as caught:
        validate_changed_extents(extents, 1 << 20)
    assert words in caught.value.cause
    assert caught.value.fix


def test_split_bounds_every_piece_and_covers_everything() -> None:
    pieces = list(split([Extent(10, 2500), Extent(5000, 100)], 1000))
    assert pieces == [Extent(10, 1000), Extent(1010, 1000), Extent(2010, 500), Extent(5000, 100)]
    with pytest.raises(ValueError, match="positive"):
        list(split([Extent(0, 1)], 0))


def test_digest_tells_extent_lists_apart() -> None:
    assert extents_digest([Extent(0, 10)]) != extents_digest([Extent(0, 11)])
    assert extents_digest([Extent(0, 10)]) == extents_digest([Extent(0, 10)])


def test_block_status_reply_is_clipped_merged_and_holes_without_zero_are_data() -> None:
    # hole+zero, data, hole-only (must be read), zero, and a length overshooting the window
    entries = [4096, 3, 4096, 0, 4096, 1, 4096, 2, 1 << 30, 3]
    mapped = parse_block_status(0, 20480, entries)
    assert mapped == [
        MappedExtent(0, 4096, True),
        MappedExtent(4096, 8192, False),
        MappedExtent(12288, 8192, True),
    ]
    assert parse_block_status(100, 200, []) == []


def test_range_set_merges_and_reports_gaps() -> None:
    ranges = RangeSet()
    for start, end in [(10, 20), (30, 40), (20, 25), (50, 60), (35, 55)]:
        ranges.add(start, end)
    assert ranges.as_pairs() == [(10, 25), (30, 60)]
    assert list(ranges.gaps(0, 70)) == [(0, 10), (25, 30), (60, 70)]
    assert ranges.covers(12, 25)
    assert not ranges.covers(12, 26)
    assert ranges.total() == 45
    ranges.add(5, 5)
    assert len(ranges) == 2
    clone = ranges.copy()
    clone.add(0, 100)
    assert ranges != clone
    assert RangeSet(ranges) == ranges


def test_range_set_matches_a_naive_model_on_random_input() -> None:
    generator = random.Random(7)
    ranges = RangeSet()
    model = [False] * 1000
    for _ in range(300):
        start = generator.randrange(1000)
        end = min(1000, start + generator.randrange(1, 40))
        ranges.add(start, end)
        model[start:end] = [True] * (end - start)
        covered = [False] * 1000
        for low, high in ranges:
            covered[low:high] = [True] * (high - low)
        assert covered == model
        pairs = ranges.as_pairs()
        assert all(pairs[i][1] < pairs[i + 1][0] for i in range(len(pairs) - 1))


def _checker(data: bytes) -> object:
    return lambda offset, size: not any(data[offset : offset + (len(data) - offset if size < 0 else size)])


def test_zero_runs_find_zero_areas_down_to_the_refine_step() -> None:
    block = 65536
    data = bytearray(4 * block)
    data[block + 8192 : block + 12288] = b"\x01" * 4096  # one 4 KiB page of data inside block 1
    data[3 * block :] = b"\x02" * block
    runs = zero_runs(_checker(bytes(data)), len(data), block, 4096)  # type: ignore[arg-type]
    assert runs == [
        (0, block + 8192, True),
        (block + 8192, 4096, False),
        (block + 12288, 2 * block - 12288, True),
        (3 * block, block, False),
    ]
    assert sum(length for _, length, _ in runs) == len(data)


def test_zero_runs_fast_paths() -> None:
    assert zero_runs(_checker(bytes(1000)), 1000, 256, 64) == [(0, 1000, True)]  # type: ignore[arg-type]
    dense = bytes(range(1, 256)) * 4
    assert zero_runs(_checker(dense), len(dense), 256, 64) == [(0, len(dense), False)]  # type: ignore[arg-type]
