"""Activation formats (float32, float16, Q8_0) and one vector as chunks with parity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from halo_p2p.errors import WireError
from halo_p2p.wire.quant import FORMATS, Q8_BLOCK, wire_format
from halo_p2p.wire.vector import ChunkedVector, chunk_ranges, default_parity, encode_vector

Q8 = wire_format("q8_0")


@pytest.mark.parametrize("seed", range(4))
def test_q8_0_is_ggml_block_q8_0_bit_for_bit(seed: int) -> None:
    """The same bytes as gguf-py's Q8_0, which mirrors ggml's quantize_row_q8_0_ref."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(1024) * rng.uniform(0.01, 50)).astype(np.float32)
    x[32:64] = 0.0                                    # an all-zero block: d = 0
    x[100] = 0.5 * x[101]                             # ties and sign changes inside blocks
    ref = quantize(x.reshape(1, -1), GGMLQuantizationType.Q8_0).reshape(-1)
    np.testing.assert_array_equal(Q8.pack(x), ref)
    np.testing.assert_array_equal(Q8.unpack(ref, x.size), dequantize(ref, GGMLQuantizationType.Q8_0).reshape(-1))


def test_q8_0_error_is_half_a_step_per_block_and_a_short_last_block_is_padded() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(70).astype(np.float32) * 3              # 3 blocks, the last of 6 elements
    payload = Q8.pack(x)
    assert payload.dtype == np.uint8 and payload.size == 3 * 34 == Q8.payload_size(70)
    y = Q8.unpack(payload, 70)
    step = np.repeat([np.abs(x[i:i + Q8_BLOCK]).max() / 127 for i in range(0, 70, Q8_BLOCK)], Q8_BLOCK)[:70]
    assert np.all(np.abs(x - y) <= (0.5 + 127 * 2**-11) * step)     # + 127 x the float16 rounding of d
    assert not np.array_equal(x, y)
    np.testing.assert_array_equal(Q8.unpack(Q8.pack(np.zeros(40, np.float32)), 40), np.zeros(40))


def test_formats_refuse_what_they_cannot_carry() -> None:
    with pytest.raises(WireError, match="non-finite"):
        Q8.pack(np.array([1.0, np.nan], np.float32))
    with pytest.raises(WireError, match=r"must be uint8\[68\], got uint8\[34\]"):
        Q8.unpack(np.zeros(34, np.uint8), 40)
    with pytest.raises(WireError, match=r"must be float16\[3\], got float32\[3\]"):
        wire_format("float16").unpack(np.zeros(3, np.float32), 3)
    with pytest.raises(WireError, match="unknown wire format 'int4'"):
        wire_format("int4")
    x = np.array([1e-30, -0.0, 65504.0, np.inf], np.float32)
    np.testing.assert_array_equal(wire_format("float32").unpack(wire_format("float32").pack(x), 4), x)
    assert set(FORMATS) == {"float32", "float16", "q8_0"} and wire_format("float32").lossless


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chunk_ranges_start_on_units_and_cover_the_vector(fmt: str) -> None:
    f = wire_format(fmt)
    for n, k in ((576, 1), (576, 2), (1000, 3), (70, 2)):
        ranges = chunk_ranges(f, n, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) == k
        assert all(a % f.unit_elems == 0 and a < b for a, b in ranges)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    with pytest.raises(WireError, match="3 chunks"):
        chunk_ranges(Q8, 64, 3)                                      # 2 blocks cannot make 3 chunks


def test_encode_vector_uses_the_fewest_chunks_and_parity_per_four() -> None:
    x = np.arange(4000, dtype=np.float32)
    vec = encode_vector(Q8, x, 1100, parity=True)                     # 32 blocks per chunk, 125 blocks
    assert (vec.n_data, vec.n_parity) == (4, 1) and len(vec.payloads) == 5
    assert vec.offsets == [a for a, _ in chunk_ranges(Q8, 4000, 4)] and vec.offset(4) == 0
    assert [default_parity(n) for n in (1, 2, 4, 5, 9)] == [1, 1, 1, 2, 3]
    assert encode_vector(Q8, x, 1100, parity=False).n_parity == 0
    with pytest.raises(WireError, match="does not fit"):
        encode_vector(Q8, x, 33, parity=False)


def _vector(fmt: str, x: np.ndarray, budget: int = 400) -> tuple[ChunkedVector, list[np.ndarray], list[int]]:
    f = wire_format(fmt)
    vec = encode_vector(f, x, budget, parity=True)
    return ChunkedVector(f, x.size, vec.n_data, vec.n_parity), vec.payloads, vec.offsets


def test_chunked_vector_rebuilds_one_lost_chunk_per_stripe_and_zero_fills_the_rest() -> None:
    x = np.random.default_rng(2).standard_normal(1152).astype(np.float32)
    cv, payloads, offsets = _vector("float32", x)                     # float32: bit-exact
    n = cv.n_data
    assert (n, cv.n_parity) == (12, 3)
    for k in [i for i in range(len(payloads)) if i != 4]:
        cv.add(k, offsets[k] if k < n else 0, payloads[k])
    assert cv.complete and cv.missing_chunks() == []
    np.testing.assert_array_equal(cv.values(), x)
    partial, payloads, offsets = _vector("float32", x)
    assert partial.add(0, 0, payloads[0]) and not partial.add(0, 0, payloads[0])     # a duplicate adds nothing
    a, b = partial.ranges[0]
    assert partial.covers(a, b) and not partial.covers(0, b + 1) and partial.touches(b - 1, b + 5)
    got = partial.values()
    np.testing.assert_array_equal(got[a:b], x[a:b])
    assert not got[b:].any() and partial.missing_chunks() == list(range(1, n))


def test_chunked_vector_refuses_chunks_that_do_not_fit_and_stores_nothing() -> None:
    x = np.ones(576, np.float32)
    cv, payloads, _ = _vector("q8_0", x, 300)
    assert (cv.n_data, cv.n_parity) == (3, 1)
    with pytest.raises(WireError, match="must start at element 192"):
        cv.add(1, 0, payloads[1])
    with pytest.raises(WireError, match="out of range"):
        cv.add(7, 0, payloads[0])
    with pytest.raises(WireError, match=r"q8_0 payload of 192 elements must be uint8\[204\]"):
        cv.add(0, 0, payloads[0][:-34])
    with pytest.raises(WireError, match=r"parity chunk 3 must be uint8\[204\]"):
        cv.add(3, 0, payloads[3][:10])
    with pytest.raises(WireError, match="parity chunks"):
        ChunkedVector(Q8, 576, 2, 3)
    assert not cv.received and cv.matches(3, 1) and not cv.matches(3, 0)
