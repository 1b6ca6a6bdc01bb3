"""Deadline estimation (RFC 6298 with Karn's rule and backoff), answers and uplink FEC at a sync point."""

import dataclasses

import numpy as np
import pytest

from halo_p2p.errors import WireError
from halo_p2p.session.sync import Answer, ResponseTimer, SyncPoint, answer_layout
from halo_p2p.wire.messages import Partial
from halo_p2p.wire.quant import wire_format
from halo_p2p.wire.vector import chunk_count, encode_vector


def test_deadline_follows_samples_and_backs_off() -> None:
    t = ResponseTimer(initial_s=0.01, k=4.0, floor_s=0.001, warmup=3)
    assert t.deadline_s() == 0.01
    t.backoff()
    t.backoff()
    assert t.deadline_s() == 0.04                 # doubled per expiry before any sample
    for _ in range(5):
        t.observe(0.05)
    clean = t.deadline_s()                        # srtt + 4 rttvar; a clean sample reset the backoff
    assert 0.05 < clean < 0.1
    t.backoff()
    assert t.deadline_s() == 2 * clean


# --- answers: one sum per worker (or two rows), chunked with parity -------------------------------

DIM = 576


def _answer_frames(rows: np.ndarray, fmt: str = "float32", budget: int = 1100, norms: np.ndarray | None = None,
                   parity: bool = True) -> list[Partial]:
    f = wire_format(fmt)
    vec = encode_vector(f, rows.reshape(-1), budget, parity=parity)
    return [Partial(session=1, step=3, layer=2, part=1, chunk=k, n_data=vec.n_data, n_parity=vec.n_parity,
                    offset=vec.offset(k), norms=(norms if norms is not None and k == 0 else np.zeros(0, np.float16)),
                    data=p) for k, p in enumerate(vec.payloads)]


def _point(answers: dict[str, Answer], critical: frozenset[int], fmt: str = "float32",
           budget: int = 1100) -> SyncPoint:
    f = wire_format(fmt)
    chunks = {p: chunk_count(f, len(a.segments) * DIM, budget) for p, a in answers.items()}
    return SyncPoint(3, 2, 1, n_tokens=1, dim=DIM, answers=answers, chunks=chunks, critical=critical, fmt=f,
                     sent_at_s=0.0)


def test_answer_layout_is_one_sum_unless_split_is_asked_and_both_kinds_are_held() -> None:
    crit = frozenset({1, 4})
    assert answer_layout([4, 2, 1, 7], crit, split=False) == Answer((1, 2, 4, 7), (4,))
    assert answer_layout([4, 2, 1, 7], crit, split=True) == Answer((1, 4, 2, 7), (2, 2))
    assert answer_layout([2, 7], crit, split=True) == Answer((2, 7), (2,))
    assert Answer((1, 4, 2, 7), (2, 2)).rows() == [(1, 4), (2, 7)]


@pytest.mark.parametrize("lost", [0, 1, 2])
def test_one_lost_chunk_of_an_answer_is_rebuilt_bit_exactly(lost: int) -> None:
    rows = np.random.default_rng(lost).standard_normal((2, DIM)).astype(np.float32)
    frames = _answer_frames(rows, budget=2400)                        # 2 data chunks (one per row) + 1 parity
    assert [(m.chunk, m.n_data, m.n_parity) for m in frames] == [(0, 2, 1), (1, 2, 1), (2, 2, 1)]
    sp = _point({"w": Answer((0, 5, 3), (2, 1))}, frozenset({0, 5, 3}), budget=2400)
    for i, msg in enumerate(frames):
        if i != lost:
            sp.add("w", msg, 1.0)
    assert sp.all_complete and sp.done_at_s == {"w": 1.0} and all(sp.complete(g) for g in (0, 5, 3))
    total = sp.close(2.0)
    assert total.reshape(-1).tobytes() == (rows[0] + rows[1]).tobytes()
    assert sp.record.recovered == (lost < 2) and sp.record.used == 3 and sp.record.skipped_groups == []


def test_a_lost_row_of_other_groups_is_skipped_and_the_critical_row_summed() -> None:
    rows = np.stack([np.full(DIM, 1.0, np.float32), np.full(DIM, 100.0, np.float32)])
    frames = _answer_frames(rows, budget=2400, parity=False)
    sp = _point({"w": Answer((4, 1, 2), (1, 2)), "v": Answer((6,), (1,))}, frozenset({4, 6}), budget=2400)
    assert sp.missing_critical() == {"w": [4], "v": [6]} and sp.missing_chunks("w") == (0, 1)
    assert sp.add("w", frames[0], 1.0) and sp.missing_critical() == {"v": [6]}
    assert sp.complete(4) and not sp.complete(1) and sp.missing_chunks("w") == (1,)
    assert sp.pending_peers() == {"w", "v"}
    total = sp.close(2.0)
    np.testing.assert_array_equal(total, np.ones((1, DIM), np.float32))
    assert (sp.record.used, sp.record.partial, sp.record.missing) == (1, 0, 3)
    assert sorted(sp.record.skipped_groups) == [1, 2, 6]
    assert not sp.add("w", frames[1], 3.0) and sp.record.late == 1       # after close: counted late, not summed


def test_norms_and_counts_are_checked_and_a_bad_chunk_is_not_kept() -> None:
    rows = np.ones((1, DIM), np.float32)
    norms = np.array([2.0, 3.0], np.float16)
    frames = _answer_frames(rows, norms=norms)
    sp = _point({"w": Answer((0, 5), (2,))}, frozenset())
    with pytest.raises(WireError, match="not asked"):
        sp.add("x", frames[0], 1.0)
    with pytest.raises(WireError, match="3 norms for 2 groups"):
        sp.add("w", dataclasses.replace(frames[0], norms=np.zeros(3, np.float16)), 1.0)
    with pytest.raises(WireError, match="must start at element 0"):
        sp.add("w", dataclasses.replace(frames[0], offset=7), 1.0)
    with pytest.raises(WireError, match="announces 2\\+1 chunks; its answer takes 3 data chunks"):
        sp.add("w", dataclasses.replace(frames[0], n_data=2), 1.0)
    assert sp.missing_chunks("w") == (0, 1, 2)                         # nothing was kept
    assert sp.add("w", frames[0], 1.0) and sp.norms() == {0: 2.0, 5: 3.0} and sp.missing_chunks("w") == (1, 2)
    with pytest.raises(WireError, match="announces 0 parity chunks, earlier ones 1"):
        sp.add("w", dataclasses.replace(frames[0], n_parity=0), 1.0)


def test_q8_0_answers_sum_what_the_format_keeps() -> None:
    rows = np.random.default_rng(9).standard_normal((1, DIM)).astype(np.float32)
    sp = _point({"w": Answer((2,), (1,))}, frozenset({2}), fmt="q8_0")
    for msg in _answer_frames(rows, "q8_0"):
        sp.add("w", msg, 1.0)
    kept = wire_format("q8_0").unpack(wire_format("q8_0").pack(rows.reshape(-1)), DIM)
    np.testing.assert_array_equal(sp.close(2.0).reshape(-1), kept)
    assert 0 < np.abs(kept - rows.reshape(-1)).max() < 0.02
