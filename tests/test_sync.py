"""Deadline estimation (RFC 6298 with Karn's rule and backoff), answers and uplink FEC at a sync point."""

import dataclasses

import numpy as np
import pytest

from halo_p2p.errors import WireError
from halo_p2p.session.sync import (
    Action,
    Answer,
    Decision,
    ResendOrder,
    ResponseTimer,
    SyncPoint,
    WaitRules,
    answer_layout,
    decide,
)
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


# --- the wait decision: a pure function of the sync point's state ---------------------------------

RULES = WaitRules(halo=True, strict=False, stall_timeout_s=30.0, resend_interval_s=0.005, silence_gap_s=0.02)


def _armed(answers: dict[str, Answer], critical: frozenset[int], deadline_s: dict[str, float],
           srtt_s: float | None = None) -> SyncPoint:
    """A sync point sent at t = 0 whose peers' deadlines are ``deadline_s`` (timers still warming
    up: their deadline is their initial one) and whose smoothed RTT is ``srtt_s``."""
    sp = _point(answers, critical)
    timers = {p: ResponseTimer(initial_s=d) for p, d in deadline_s.items()}
    for t in timers.values():
        t.srtt = srtt_s
    sp.arm(timers)
    return sp


def _wait_state(sp: SyncPoint) -> tuple:
    per_peer = [(s.deadline_s, s.next_resend_s, s.last_resend_s, s.timer.backoff_factor) for s in sp.peers.values()]
    return sp.record.resends, set(sp.retried), per_peer


def test_halo_waits_for_other_groups_only_until_each_owners_deadline() -> None:
    sp = _armed({"w": Answer((1,), (1,)), "v": Answer((2,), (1,))}, frozenset(), {"w": 0.01, "v": 0.03})
    before = _wait_state(sp)
    d = decide(sp, 0.0, RULES, unreliable=True, dead=set(), progress_s=0.0)
    assert d == Decision(Action.WAIT, 0.01) and _wait_state(sp) == before           # pure: nothing changed
    assert decide(sp, 0.02, RULES, unreliable=True, dead=set(), progress_s=0.0) == Decision(Action.WAIT, 0.03)
    assert decide(sp, 0.03, RULES, unreliable=True, dead=set(), progress_s=0.0).action is Action.DONE
    strict = dataclasses.replace(RULES, halo=False)       # strict modes wait for every answer, then stall
    assert decide(sp, 0.03, strict, unreliable=False, dead=set(), progress_s=0.0) == Decision(Action.WAIT, 30.03)
    stall = decide(sp, 40.0, strict, unreliable=False, dead=set(), progress_s=0.0)
    assert stall.action is Action.STALL and stall.peers == ("v", "w")


def test_a_missing_critical_answer_is_asked_again_with_back_off() -> None:
    frames = _answer_frames(np.ones((1, DIM), np.float32))            # 3 data chunks + 1 parity
    sp = _armed({"w": Answer((4,), (1,))}, frozenset({4}), {"w": 0.05}, srtt_s=0.01)   # interval max(5 ms, 2 srtt)
    assert decide(sp, 0.01, RULES, unreliable=True, dead=set(), progress_s=0.0) == Decision(Action.WAIT, 0.05)
    d = decide(sp, 0.05, RULES, unreliable=True, dead=set(), progress_s=0.0)
    order = ResendOrder("w", (0, 1, 2), pytest.approx(0.05 + 0.02), True)   # nothing heard: the timer backs off
    assert d.action is Action.WAIT and d.resend == (order,) and d.until_s == pytest.approx(0.07)
    assert sp.record.resends == 0 and not sp.retried                  # decide only decides
    sp.resent(d.resend[0], 0.05)
    assert sp.record.resends == 1 and sp.retried == {"w"} and sp.peers["w"].timer.backoff_factor == 2
    assert decide(sp, 0.06, RULES, unreliable=True, dead=set(), progress_s=0.0) == Decision(Action.WAIT,
                                                                                           pytest.approx(0.07))
    assert sp.add("w", frames[0], 0.065)                              # a chunk arrives: not all
    d = decide(sp, 0.07, RULES, unreliable=True, dead=set(), progress_s=0.065)
    assert d.resend == (ResendOrder("w", (1, 2), pytest.approx(0.07 + 0.04), False),)   # 2nd: interval x2
    sp.resent(d.resend[0], 0.07)
    for msg in frames[1:3]:
        sp.add("w", msg, 0.08)
    assert decide(sp, 0.08, RULES, unreliable=True, dead=set(), progress_s=0.08).action is Action.DONE
    assert sp.response_sample_s("w") is None                          # resent: no timing sample (Karn)


def test_a_burst_gone_silent_is_asked_again_before_the_deadline_and_reliable_steps_never() -> None:
    frames = _answer_frames(np.ones((1, DIM), np.float32))
    sp = _armed({"w": Answer((4,), (1,))}, frozenset({4}), {"w": 1.0})
    sp.add("w", frames[0], 0.01)                                      # the rest of the burst is lost
    assert decide(sp, 0.02, RULES, unreliable=True, dead=set(), progress_s=0.01) == Decision(Action.WAIT, 0.03)
    d = decide(sp, 0.03, RULES, unreliable=True, dead=set(), progress_s=0.01)
    assert d.resend == (ResendOrder("w", (1, 2), pytest.approx(0.035), False),)   # heard from: no back-off
    reliable = decide(sp, 0.03, RULES, unreliable=False, dead=set(), progress_s=0.01)
    assert reliable == Decision(Action.WAIT, 30.03)                  # reliable answers just arrive


def test_lost_workers_fail_a_strict_step_and_count_as_missing_otherwise() -> None:
    answers = {"w": Answer((4,), (1,)), "v": Answer((5,), (1,))}
    sp = _armed(answers, frozenset({4, 5}), {"w": 0.05, "v": 0.05})
    strict = dataclasses.replace(RULES, halo=False, strict=True)
    assert decide(sp, 0.0, strict, unreliable=False, dead={"v"}, progress_s=0.0) == Decision(Action.LOST, 0.0,
                                                                                            peers=("v",))
    for msg in _answer_frames(np.ones((1, DIM), np.float32)):
        sp.add("w", msg, 0.01)
    assert decide(sp, 0.01, RULES, unreliable=True, dead={"v"}, progress_s=0.0).action is Action.DONE
    assert sp.answered("w") and not sp.answered("v") and sp.response_sample_s("w") == 0.01


def test_recall_is_measured_from_the_answers_and_the_known_norms() -> None:
    norms = np.array([5.0, 1.0], np.float16)
    sp = _point({"w": Answer((0, 1), (2,))}, frozenset({0}))
    assert sp.measure_recall(frozenset({0, 2}), {2: 4.0}, 4) is None      # group 3's norm unknown
    sp.add("w", _answer_frames(np.ones((1, DIM), np.float32), norms=norms)[0], 0.0)
    assert sp.measure_recall(frozenset({0, 2}), {2: 0.5, 3: 3.0}, 4) == 0.5 == sp.record.recall   # top-2: 0 and 3
