"""Chunk ranges and reassembly of flat activation arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from halo_p2p.errors import WireError
from halo_p2p.wire import Reassembly, chunk_ranges, split_ranges


def test_chunk_ranges_examples() -> None:
    assert chunk_ranges(0, 5) == []
    assert chunk_ranges(5, 5) == [(0, 5)]
    assert chunk_ranges(6, 5) == [(0, 3), (3, 6)]  # balanced, not (0, 5), (5, 6)
    assert chunk_ranges(11, 5) == [(0, 4), (4, 8), (8, 11)]
    assert chunk_ranges(1152, 553) == [(0, 384), (384, 768), (768, 1152)]
    assert split_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_ranges(0, 1) == [(0, 0)]


@pytest.mark.parametrize(("total", "n"), [(-1, 1), (3, 0), (3, 4)])
def test_split_ranges_rejects(total: int, n: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        split_ranges(total, n)


@pytest.mark.parametrize(("total", "max_elems"), [(-1, 1), (3, 0)])
def test_chunk_ranges_rejects(total: int, max_elems: int) -> None:
    with pytest.raises(ValueError, match="cannot cut"):
        chunk_ranges(total, max_elems)


def test_chunk_ranges_property() -> None:
    rng = np.random.default_rng(11)
    for _ in range(2000):
        total, max_elems = int(rng.integers(0, 5000)), int(rng.integers(1, 700))
        ranges = chunk_ranges(total, max_elems)
        assert len(ranges) == math.ceil(total / max_elems)  # fewest chunks
        assert [a for a, _ in ranges[1:]] == [b for _, b in ranges[:-1]]  # contiguous
        if ranges:
            sizes = [b - a for a, b in ranges]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert max(sizes) <= max_elems and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            assert ranges == split_ranges(total, len(ranges))  # receivers rebuild lengths from n_data


def test_reassembly_tracks_pieces_in_any_order() -> None:
    r = Reassembly(10, np.float16)
    assert not r.complete and r.missing_ranges() == [(0, 10)] and r.received_elems == 0
    assert r.add(6, np.full(4, 3, np.float16)) == 4
    assert r.add(0, np.full(3, 1, np.float16)) == 3
    assert r.missing_ranges() == [(3, 6)]
    assert r.add(0, np.full(3, 1, np.float16)) == 0  # exact duplicate: ignored
    np.testing.assert_array_equal(r.array, [1, 1, 1, 0, 0, 0, 3, 3, 3, 3])  # zeros where missing
    assert r.add(2, np.full(2, 2, np.float16)) == 1  # overlap: only element 3 is new
    assert r.missing_ranges() == [(4, 6)] and r.received_elems == 8
    assert r.add(4, np.full(2, 5, np.float16)) == 2
    assert r.complete and r.missing_ranges() == [] and r.received_mask.all()
    assert r.array.dtype == np.float16 and r.total_elems == 10
    with pytest.raises(ValueError):
        r.received_mask[0] = False


@pytest.mark.parametrize(("offset", "data", "message"), [
    (-1, np.zeros(2, np.float32), r"piece \[-1, 1\) falls outside \[0, 8\)"),
    (7, np.zeros(2, np.float32), r"piece \[7, 9\) falls outside \[0, 8\)"),
    (9, np.zeros(0, np.float32), r"falls outside"),
    (0, np.zeros(2, np.float16), "has dtype float16, expected float32"),
    (0, np.zeros((1, 2), np.float32), "must be a 1-D numpy array"),
    (0, [0.0, 1.0], "must be a 1-D numpy array"),
])
def test_reassembly_rejects_bad_pieces_and_stores_nothing(offset: int, data: np.ndarray,
                                                          message: str) -> None:
    r = Reassembly(8, np.float32)
    with pytest.raises(WireError, match=message):
        r.add(offset, data)
    assert r.received_elems == 0 and not r.received_mask.any() and not r.array.any()


def test_reassembly_of_nothing_is_complete() -> None:
    r = Reassembly(0, np.float32)
    assert r.complete and r.missing_ranges() == [] and r.add(0, np.zeros(0, np.float32)) == 0
    with pytest.raises(ValueError):
        Reassembly(-1, np.float32)


def test_reassembly_property_against_a_set_model() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        total = int(rng.integers(1, 3000))
        ranges = chunk_ranges(total, int(rng.integers(1, 600)))
        source = rng.standard_normal(total).astype(np.float32)
        r, have = Reassembly(total, np.float32), np.zeros(total, bool)
        for k in rng.permutation(len(ranges))[: int(rng.integers(0, len(ranges) + 1))]:
            a, b = ranges[k]
            assert r.add(a, source[a:b]) == b - a - have[a:b].sum()
            have[a:b] = True
        missing = np.ones(total, bool)
        for a, b in r.missing_ranges():
            assert a < b
            missing[a:b] = False  # every range is missing ...
        assert (missing == have).all()  # ... and every missing element is in a range
        assert r.complete == have.all() and r.received_elems == have.sum()
        np.testing.assert_array_equal(r.array, np.where(have, source, 0))
