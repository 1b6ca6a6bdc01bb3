"""The discrete-event simulator of strict vs halo synchronization (pure: no network, no weights)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN, MLP
from halo_p2p.plan import PlacementPlan
from halo_p2p.sim import (
    LLAMA2_7B,
    SMOLLM2_135M,
    TINYLLAMA_1_1B,
    Cluster,
    ReliableStream,
    SimOptions,
    gbe_link,
    place,
    rpi4b,
    simulate,
    uniform_cluster,
)
from halo_p2p.sim.cluster import mlp_scores

QUIET = gbe_link(0.0, jitter_s=0.0)          # no loss, no jitter: hand-computable timings


def tiny(plr: float = 0.0, n: int = 8, **link: object) -> Cluster:
    return uniform_cluster(rpi4b(), n, gbe_link(plr, **link))  # type: ignore[arg-type]


def test_plr0_strict_and_halo_agree() -> None:
    cluster = uniform_cluster(rpi4b(), 8, QUIET)
    strict = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=8))
    halo = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="halo", tokens=8))
    assert abs(halo.tpot_s - strict.tpot_s) / strict.tpot_s < 0.03
    assert strict.tpot_s > strict.compute_s        # the network costs something even without loss


def test_strict_grows_with_plr_much_faster_than_halo() -> None:
    # deadlines seeded by the scheduler: no 0.5 s warm-up waits in these few tokens
    tpot = {(mode, plr): simulate(TINYLLAMA_1_1B, tiny(plr), SimOptions(mode=mode, tokens=8,
                                                                        initial_deadline_s=None)).tpot_s
            for mode in ("strict", "halo") for plr in (0.0, 0.01, 0.05)}
    strict_growth = tpot[("strict", 0.05)] / tpot[("strict", 0.0)]
    halo_growth = tpot[("halo", 0.05)] / tpot[("halo", 0.0)]
    assert tpot[("strict", 0.0)] < tpot[("strict", 0.01)] < tpot[("strict", 0.05)]
    assert strict_growth > 10 * halo_growth
    assert halo_growth < 3.0


def test_one_lost_packet_costs_one_rto_in_strict() -> None:
    """The first packet of the input to w01 at the first sync point is lost once: that input, and
    so that sync point, ends one RTO (200 ms) later; no other sync point changes."""
    cluster = uniform_cluster(rpi4b(), 4, QUIET)
    base = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=2, trace=True))
    lossy = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=2, trace=True,
                                                         drops=((0, 0, ATTN, "w01", "in", 0),)))
    rto = QUIET.rto_s
    assert lossy.retransmissions * 2 == 1
    delta = lossy.token_s[0] - base.token_s[0]
    first = [lossy.traces[0].closed_at_s - lossy.traces[0].sent_at_s,
             base.traces[0].closed_at_s - base.traces[0].sent_at_s]
    # w01's partials now arrive alone instead of queued behind the others: at most a few ms less
    assert rto - 0.003 < delta <= rto + 1e-6
    assert first[0] - first[1] == pytest.approx(delta, abs=1e-9)
    for a, b in zip(lossy.traces[1:], base.traces[1:], strict=True):
        assert a.closed_at_s - a.sent_at_s == pytest.approx(b.closed_at_s - b.sent_at_s, abs=1e-9)
    assert lossy.token_s[1] == pytest.approx(base.token_s[1], abs=1e-9)


def test_lost_retransmission_doubles_the_rto() -> None:
    """The same packet lost twice: RTO, then the retransmission waits 2 RTO (3 RTO in all)."""
    cluster = uniform_cluster(rpi4b(), 4, QUIET)
    key = (0, 0, ATTN, "w01", "in", 0)
    base = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1))
    once = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1, drops=(key,)))
    twice = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1, drops=(key, key)))
    assert twice.tpot_s - once.tpot_s == pytest.approx(2 * QUIET.rto_s, abs=1e-9)
    assert twice.retransmissions == 2 and once.tpot_s > base.tpot_s


def test_head_of_line_blocking_in_strict() -> None:
    stream = ReliableStream()
    first, second = stream.open("a"), stream.open("b")
    assert stream.complete(second, 0.001) == []                    # complete, but blocked
    assert stream.complete(first, 0.201) == [("a", 0.201), ("b", 0.201)]
    # in the simulation: w01's first partial (group message) loses its first packet; its later
    # group messages arrive in time but are delivered only behind it
    cluster = uniform_cluster(rpi4b(), 4, QUIET)
    sync = (0, 0, MLP)
    base = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1, trace=True))
    lossy = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1, trace=True,
                                                         drops=((*sync, "w01", "out", 0),)))
    groups = [g for g, p in lossy.schedule.plan.owners_at(0, MLP).items() if p == "w01"]
    assert len(groups) >= 2
    trace, ref = lossy.traces[1], base.traces[1]
    done = [trace.group_done_s[g] - trace.sent_at_s for g in groups]
    ref_done = [ref.group_done_s[g] - ref.sent_at_s for g in groups]
    assert done[0] > ref_done[0] + 0.19
    assert all(d == pytest.approx(done[0], abs=1e-9) for d in done[1:])   # all waited for the first
    assert all(d > r + 0.19 for d, r in zip(done[1:], ref_done[1:], strict=True))


def test_halo_at_plr0_skips_nothing() -> None:
    cluster = uniform_cluster(rpi4b(), 8, QUIET)
    for shape in (TINYLLAMA_1_1B, SMOLLM2_135M):
        res = simulate(shape, cluster, SimOptions(mode="halo", tokens=16))
        counts = (res.skipped_groups, res.lost_importance, res.resends, res.need_inputs, res.late_chunks)
        assert counts == (0, 0, 0, 0, 0)


def test_halo_under_loss_skips_only_non_critical_groups() -> None:
    res = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=8, trace=True))
    assert res.skipped_groups > 0 and res.resends > 0
    layout = TINYLLAMA_1_1B.layout()
    scores = mlp_scores(layout, 0)
    k = round(0.5 * layout.n_mlp)
    for t in res.traces:
        remote = [g for g, p in res.schedule.plan.owners_at(t.layer, t.part).items() if p != "c"]
        skipped = set(remote) - set(t.group_done_s)
        if t.part == ATTN:
            assert not skipped
        else:
            top = set(scores[t.layer].argsort(kind="stable")[::-1][:k].tolist())
            assert not skipped & top
    assert 0 < res.lost_importance < 0.1


def test_halo_skips_a_lost_non_critical_partial_and_resends_a_critical_one() -> None:
    """One packet lost at PLR 0, after the timers warmed up: a non-critical group is skipped at the
    worker's deadline without a Resend; a critical group is asked for again and nothing is skipped."""
    cluster = uniform_cluster(rpi4b(), 4, QUIET)
    layout = TINYLLAMA_1_1B.layout()
    scores = mlp_scores(layout, 0)
    plan = place(TINYLLAMA_1_1B, cluster, mode="halo", scores=scores).plan
    mine = [g for g, p in plan.owners_at(0, MLP).items() if p == "w01"]
    top = set(scores[0].argsort(kind="stable")[::-1][:round(0.5 * layout.n_mlp)].tolist())
    n_out = 4                                    # 2048 float16 elements in 563-element packets
    for critical in (False, True):
        pos = next(i for i, g in enumerate(mine) if (g in top) == critical)
        res = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="halo", tokens=6, trace=True,
                                                           drops=((4, 0, MLP, "w01", "out", pos * n_out),)))
        trace = next(t for t in res.traces if (t.token, t.layer, t.part) == (4, 0, MLP))
        if critical:
            assert res.skipped_groups == 0 and res.resends * 6 == 1
            assert mine[pos] in trace.group_done_s
        else:
            assert res.skipped_groups * 6 == 1 and res.resends == 0
            # its other 3 packets arrived in time (summed as a partial group); none came late
            assert mine[pos] not in trace.group_done_s and res.late_chunks == 0


def test_deterministic_with_a_seed() -> None:
    a = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=6, seed=3))
    b = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=6, seed=3))
    c = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=6, seed=4))
    assert a.token_s == b.token_s and a.skipped_groups == b.skipped_groups
    assert a.token_s != c.token_s


def test_more_devices_less_compute_per_token() -> None:
    compute = [simulate(LLAMA2_7B, uniform_cluster(rpi4b(), n, QUIET), SimOptions(mode="strict", tokens=1)).compute_s
               for n in (1, 2, 4, 8)]
    assert compute[0] > compute[1] > compute[2] > compute[3]
    single = LLAMA2_7B.matvec_params * rpi4b().seconds_per_param   # distributed-llama's 1312.5 ms
    assert compute[0] == pytest.approx(single, rel=1e-9) == pytest.approx(1.3125, rel=1e-9)


def test_uses_the_scheduler_placement() -> None:
    """A worker 4x slower gets fewer groups from the scheduler than from an equal split, and the
    simulated TPOT is lower with the scheduler's plan."""
    fast, slow = rpi4b(), replace(rpi4b(), seconds_per_param=4 * rpi4b().seconds_per_param)
    cluster = Cluster(fast, (fast, fast, slow), (QUIET,) * 3)
    opts = SimOptions(mode="halo", tokens=4)
    sched = place(TINYLLAMA_1_1B, cluster, mode="halo", scores=mlp_scores(TINYLLAMA_1_1B.layout(), 0))
    split = PlacementPlan.split(TINYLLAMA_1_1B.layout(), ["c", "w01", "w02", "w03"])
    assert len(sched.plan.groups_of("w03")) < len(split.groups_of("w03"))
    best = simulate(TINYLLAMA_1_1B, cluster, opts)
    equal = simulate(TINYLLAMA_1_1B, cluster, opts, plan=split)
    assert best.schedule.plan.owner == sched.plan.owner
    assert best.tpot_s < equal.tpot_s


def test_llama2_7b_64_tokens_is_fast() -> None:
    t0 = time.perf_counter()
    res = simulate(LLAMA2_7B, tiny(0.05), SimOptions(mode="halo", tokens=16))
    assert time.perf_counter() - t0 < 5.0          # 64 tokens take about 4x this
    assert len(res.token_s) == 16


def test_a_run_that_diverges_stops() -> None:
    res = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="strict", tokens=4, max_token_s=1.0))
    assert res.diverged and len(res.token_s) == 1 and res.token_s[0] > 1.0
    assert not simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=2)).diverged


def test_bad_options() -> None:
    with pytest.raises(ConfigError):
        SimOptions(mode="lossy")
    with pytest.raises(ConfigError):
        gbe_link(1.5)
