"""XOR parity FEC for the downlink input, and the whole LayerInput path over a lossy channel."""

from __future__ import annotations

import numpy as np
import pytest

from halo_p2p.errors import WireError
from halo_p2p.wire import (
    ChunkedVector,
    LayerInput,
    decode,
    delivery_probability,
    encode,
    encode_parity,
    encode_vector,
    min_parity,
    parity_dtype,
    payload_budget,
    recover,
    split_ranges,
    wire_format,
)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(parity_dtype(a.dtype))


def test_parity_layouts() -> None:
    chunks = [np.array([1.0, 2.0, 3.0], np.float16), np.array([4.0, 5.0], np.float16),
              np.array([6.0, 7.0], np.float16)]
    assert encode_parity(chunks, 0) == []
    (p1,) = encode_parity(chunks, 1)
    assert p1.dtype == np.uint16 and p1.shape == (3,)
    np.testing.assert_array_equal(p1, bits(chunks[0]) ^ np.r_[bits(chunks[1]) ^ bits(chunks[2]), 0])
    dup = encode_parity(chunks, 3)  # p = n_data duplicates each chunk, zero-padded
    for c, d in zip(chunks, dup, strict=True):
        np.testing.assert_array_equal(d, np.r_[bits(c), np.zeros(3 - c.size, np.uint16)])
    p2 = encode_parity(chunks, 2)  # subsets {0, 2} and {1}
    np.testing.assert_array_equal(p2[0], bits(chunks[0]) ^ np.r_[bits(chunks[2]), 0])
    assert encode_parity([np.zeros(4, np.float32)], 1)[0].dtype == np.uint32


@pytest.mark.parametrize(("chunks", "p", "error"), [
    ([], 0, ValueError),
    ([np.zeros(2, np.float16)], 2, ValueError),
    ([np.zeros(2, np.float16), np.zeros(2, np.float32)], 1, ValueError),
    ([np.zeros(2, np.float64)], 1, ValueError),
])
def test_encode_parity_rejects(chunks: list[np.ndarray], p: int, error: type) -> None:
    with pytest.raises(error):
        encode_parity(chunks, p)


def recoverable(lost: set[int], n_data: int, p: int) -> bool:
    """The rule, stated independently: every subset plus its parity lost at most one chunk."""
    if p == 0:
        return not any(i < n_data for i in lost)
    return all(sum(i in lost for i in [*range(j, n_data, p), n_data + j]) <= 1 for j in range(p))


def test_recover_property() -> None:
    rng = np.random.default_rng(3)
    outcomes = {True: 0, False: 0}
    for _ in range(1500):
        n_data = int(rng.integers(1, 13))
        p = int(rng.integers(0, n_data + 1))
        dtype = np.dtype(rng.choice(["float16", "float32"]))
        total = int(rng.integers(n_data, 60))
        lengths = [b - a for a, b in split_ranges(total, n_data)]
        flat = rng.integers(0, 256, total * dtype.itemsize, dtype=np.uint8).view(dtype)  # any bits, NaNs too
        data = [flat[a:b] for a, b in split_ranges(total, n_data)]
        sent = dict(enumerate([*data, *encode_parity(data, p)]))
        lost = {k for k in sent if rng.random() < 0.25}
        got = recover({k: v for k, v in sent.items() if k not in lost}, n_data, p, lengths, dtype)
        expected = recoverable(lost, n_data, p)
        outcomes[expected] += 1
        assert (got is not None) == expected, (n_data, p, sorted(lost))
        if got is not None:
            assert [g.dtype for g in got] == [dtype] * n_data
            assert np.concatenate([bits(g) for g in got]).tobytes() == flat.tobytes()
    assert min(outcomes.values()) > 200


def test_recover_rejects_inconsistent_chunks() -> None:
    data = [np.zeros(3, np.float16), np.zeros(2, np.float16)]
    (par,) = encode_parity(data, 1)
    with pytest.raises(WireError, match="chunk 1 is float32"):
        recover({0: data[0], 1: np.zeros(2, np.float32)}, 2, 1, [3, 2], np.float16)
    with pytest.raises(WireError, match=r"chunk 2 is uint16\[2\], expected uint16\[3\]"):
        recover({0: data[0], 2: par[:2]}, 2, 1, [3, 2], np.float16)
    with pytest.raises(WireError, match="chunk index 3 out of range"):
        recover({3: par}, 2, 1, [3, 2], np.float16)
    with pytest.raises(ValueError, match="lengths has 1 items"):
        recover({}, 2, 1, [3], np.float16)
    assert recover({0: data[0], 2: par}, 2, 1, [3, 2], np.float16) is not None


def test_delivery_probability_closed_form_cases() -> None:
    assert delivery_probability(5, 0, 0.1) == pytest.approx(0.9**5)
    assert delivery_probability(5, 5, 0.1) == pytest.approx((1 - 0.1**2) ** 5)  # duplicates
    assert delivery_probability(4, 1, 0.1) == pytest.approx(0.9**5 + 5 * 0.1 * 0.9**4)
    assert delivery_probability(7, 3, 0.0) == 1.0 and delivery_probability(7, 3, 1.0) == 0.0
    assert min_parity(4, 0.05, 0.98) == 2 and min_parity(8, 0.01, 0.998) == 2
    assert min_parity(8, 0.0, 1.0) == 0 and min_parity(8, 0.05, 0.99) is None
    with pytest.raises(ValueError):
        delivery_probability(2, 3, 0.1)
    with pytest.raises(ValueError):
        delivery_probability(2, 1, 1.5)


@pytest.mark.parametrize(("n_data", "p", "plr"), [(1, 0, 0.05), (4, 1, 0.05), (8, 2, 0.1), (8, 3, 0.2),
                                                  (6, 6, 0.3), (10, 4, 0.02)])
def test_delivery_probability_matches_monte_carlo(n_data: int, p: int, plr: float) -> None:
    rng = np.random.default_rng(n_data * 100 + p)
    trials = 40_000
    lost = rng.random((trials, n_data + p)) < plr
    if p == 0:
        ok = ~lost.any(axis=1)
    else:
        per_subset = np.stack([lost[:, [*range(j, n_data, p), n_data + j]].sum(axis=1) for j in range(p)], 1)
        ok = (per_subset <= 1).all(axis=1)
    expected = delivery_probability(n_data, p, plr)
    sigma = np.sqrt(expected * (1 - expected) / trials)
    assert abs(ok.mean() - expected) <= 4 * sigma + 1e-9


def test_monte_carlo_through_recover() -> None:
    """The closed form against the real recover(), fewer trials."""
    rng = np.random.default_rng(99)
    n_data, p, plr, trials = 6, 2, 0.15, 3000
    data = [rng.standard_normal(5).astype(np.float32) for _ in range(n_data)]
    sent = dict(enumerate([*data, *encode_parity(data, p)]))
    hits = sum(
        recover({k: v for k, v in sent.items() if rng.random() >= plr}, n_data, p, [5] * n_data, np.float32)
        is not None for _ in range(trials))
    expected = delivery_probability(n_data, p, plr)
    assert abs(hits / trials - expected) <= 4 * np.sqrt(expected * (1 - expected) / trials)


@pytest.mark.parametrize("fmt", ["float16", "q8_0"])
def test_layer_input_end_to_end_over_a_lossy_channel(fmt: str) -> None:
    """Flatten, chunk to the packet budget, add parity, encode, lose packets, decode, recover."""
    rng = np.random.default_rng(17)
    n_tokens, dim = 6, 576
    x = rng.standard_normal((n_tokens, dim)).astype(np.float32)
    f = wire_format(fmt)
    template = LayerInput(session=9, step=4, layer=2, part=0, start_pos=10, n_tokens=n_tokens, groups=(1, 2),
                          segments=(2,), chunk=0, n_data=1, n_parity=0, offset=0, data=np.zeros(0, f.dtype))
    vec = encode_vector(f, x.reshape(-1), payload_budget(template), parity=True)
    frames = [encode(LayerInput(session=9, step=4, layer=2, part=0, start_pos=10, n_tokens=n_tokens, groups=(1, 2),
                                segments=(2,), chunk=k, n_data=vec.n_data, n_parity=vec.n_parity,
                                offset=vec.offset(k), data=p)) for k, p in enumerate(vec.payloads)]
    assert all(len(fr) <= 1160 for fr in frames) and (vec.n_data, vec.n_parity) == {"float16": (7, 2),
                                                                                       "q8_0": (4, 1)}[fmt]
    sent = f.unpack(np.concatenate(vec.payloads[:vec.n_data]), x.size)   # what the sender's format keeps
    for lost in ({1}, {0}, {vec.n_data}, {vec.n_data + vec.n_parity - 1}):
        got = ChunkedVector(f, x.size, vec.n_data, vec.n_parity)
        for k, fr in enumerate(frames):
            if k not in lost:
                msg = decode(fr)
                got.add(msg.chunk, msg.offset, msg.data)
        assert got.complete
        np.testing.assert_array_equal(got.values(), sent)
    both = ChunkedVector(f, x.size, vec.n_data, vec.n_parity)     # chunks 0 and n_parity share a parity stripe
    for k, fr in enumerate(frames):
        if k not in (0, vec.n_parity if vec.n_parity > 1 else 1):
            msg = decode(fr)
            both.add(msg.chunk, msg.offset, msg.data)
    assert not both.complete and both.missing_chunks()[0] == 0 and both.touches(0, 10) is False
