"""The discrete-event simulator of wire protocol 2 (pure: no network, no weights)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN, MLP, GroupId
from halo_p2p.plan import PlacementPlan
from halo_p2p.testbed.sim import (
    LLAMA2_7B,
    RPI4_STACK,
    SMOLLM2_135M,
    TINYLLAMA_1_1B,
    X86_STACK,
    Cluster,
    ReliableStream,
    SimOptions,
    StackCost,
    gbe_link,
    place,
    rpi4b,
    simulate,
    uniform_cluster,
)
from halo_p2p.testbed.sim.cluster import mlp_scores
from halo_p2p.testbed.sim.cpu import RPI4_SCALE
from halo_p2p.testbed.sim.framing import vector_frames
from halo_p2p.wire.framing import answer_template, encode_frames, input_template
from halo_p2p.wire.quant import wire_format

QUIET = gbe_link(0.0, jitter_s=0.0)          # no loss, no jitter: hand-computable timings
FREE = rpi4b(stack=StackCost())              # a Pi 4B whose network stack costs no CPU
MODES = ("strict", "strict-unreliable", "halo")


def tiny(plr: float = 0.0, n: int = 8, **link: object) -> Cluster:
    return uniform_cluster(rpi4b(), n, gbe_link(plr, **link))  # type: ignore[arg-type]


def split_by_criticality(shape=TINYLLAMA_1_1B) -> tuple[PlacementPlan, list[int], list[int]]:  # type: ignore[no-untyped-def]
    """Attention on the coordinator; at every layer the critical MLP groups (StaticRule, fraction
    0.5, scores of seed 0) on w02, the others on w01: w01's answers are never critical."""
    layout = shape.layout()
    scores = mlp_scores(layout, 0)
    owner = {}
    for layer in range(layout.n_layers):
        top = set(scores[layer].argsort(kind="stable")[::-1][:round(0.5 * layout.n_mlp)].tolist())
        for g in range(layout.n_attn):
            owner[GroupId(layer, ATTN, g)] = "c"
        for g in range(layout.n_mlp):
            owner[GroupId(layer, MLP, g)] = "w02" if g in top else "w01"
    plan = PlacementPlan(layout, "c", ("c", "w01", "w02"), owner)
    rest = sorted(g for g, p in plan.owners_at(0, MLP).items() if p == "w01")
    top0 = sorted(g for g, p in plan.owners_at(0, MLP).items() if p == "w02")
    return plan, rest, top0


# -- framing and CPU ------------------------------------------------------------------------------

def test_frames_are_the_real_encoders() -> None:
    fmt = wire_format("q8_0")
    x = np.ones(4096, np.float32)
    inp = input_template(1, 1000, 10, 1, start_pos=1000, n_tokens=1, groups=tuple(range(5)), segments=(5,), fmt=fmt)
    _, frames = encode_frames(inp, x, fmt, reliable=False, parity=True)
    vf = vector_frames(4096, 5, kind="in", parity=True)
    assert vf.sizes == tuple(map(len, frames)) and (vf.n_data, vf.n_parity) == (4, 1)   # 4352 B of blocks
    out = answer_template(1, 1000, 10, 1, n_groups=5, norms=True, fmt=fmt)
    _, frames = encode_frames(out, x, fmt, reliable=False, parity=False, norms=np.ones(5, np.float16))
    assert vector_frames(4096, 5, kind="out", norms=True).sizes == tuple(map(len, frames))
    assert all(n <= 1160 for n in vf.sizes)
    # a 576-element Q8_0 vector is one frame (sent twice on a lossy link); float16 takes two
    assert vector_frames(576, 3, kind="in").n_data == 1 and vector_frames(576, 3, kind="in", fmt="float16").n_data == 2
    twice = vector_frames(576, 3, kind="in", parity=True).sizes
    assert len(twice) == 2 and twice[0] == twice[1]
    # reliable: one message in 1160-byte packets
    rel = vector_frames(4096, 5, kind="out", reliable=True)
    assert rel.n_parity == 0 and rel.sizes[:-1] == (1160,) * (len(rel.sizes) - 1) and 4352 < sum(rel.sizes) < 4500


def test_frames_per_token_are_one_vector_each_way_per_worker() -> None:
    """At PLR 0 (no parity), a token moves exactly n_in + n_out packets per worker per sync point."""
    res = simulate(TINYLLAMA_1_1B, uniform_cluster(FREE, 8, QUIET), SimOptions(mode="halo", tokens=2))
    plan, expected = res.schedule.plan, 0
    for layer in range(plan.layout.n_layers):
        for part in (ATTN, MLP):
            counts: dict[str, int] = {}
            for p in plan.owners_at(layer, part).values():
                counts[p] = counts.get(p, 0) + 1
            expected += sum(len(vector_frames(2048, n, kind="in").sizes) + len(vector_frames(2048, n, kind="out",
                                                                                              norms=True).sizes)
                            for p, n in counts.items() if p != "c")
    assert res.frames == expected > 0 and res.stack_s == 0.0


def test_stack_cpu_lies_on_the_critical_path() -> None:
    """One worker holds every group (SmolLM2: one-frame vectors): per sync point the stack adds
    the coordinator's wake, input out and answer in, and the worker's wake, input in and answer
    out, in series: 2 * (sync + vector_tx + frame_tx + vector_rx + frame_rx)."""
    layout = SMOLLM2_135M.layout()
    plan = PlacementPlan(layout, "c", ("c", "w01"), {g: "w01" for g in layout.all_groups()})
    cost = StackCost(frame_tx_s=1e-4, frame_rx_s=2e-4, vector_tx_s=3e-5, vector_rx_s=4e-5, sync_s=5e-4)
    runs = {}
    for name, stack in (("free", StackCost()), ("paid", cost)):
        cluster = Cluster(rpi4b(stack=stack), (rpi4b(stack=stack),), (QUIET,))
        runs[name] = simulate(SMOLLM2_135M, cluster, SimOptions(mode="halo", tokens=3), plan=plan)
    per_sync = 2 * (cost.sync_s + cost.vector_tx_s + cost.frame_tx_s + cost.vector_rx_s + cost.frame_rx_s)
    n_sync = 2 * layout.n_layers
    assert runs["paid"].stack_s == pytest.approx(n_sync * per_sync, rel=1e-9)
    for paid, free in zip(runs["paid"].token_s, runs["free"].token_s, strict=True):
        assert paid - free == pytest.approx(n_sync * per_sync, rel=1e-6)


def test_stack_cost_presets() -> None:
    assert RPI4_STACK.frame_rx_s == pytest.approx(RPI4_SCALE * X86_STACK.frame_rx_s)
    assert 3.0 <= RPI4_SCALE <= 5.0
    assert 100e-6 <= X86_STACK.frame_tx_s + X86_STACK.frame_rx_s <= 500e-6      # measured: 330 us per frame pair
    with pytest.raises(ConfigError):
        StackCost(frame_tx_s=-1.0)


# -- strict ---------------------------------------------------------------------------------------

def test_plr0_modes_agree() -> None:
    cluster = uniform_cluster(rpi4b(), 8, QUIET)
    tpot = {m: simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode=m, tokens=6)) for m in MODES}
    # the same protocol; halo's answers also carry their groups' norms (a few bytes of wire time)
    assert tpot["halo"].tpot_s == pytest.approx(tpot["strict-unreliable"].tpot_s, rel=1e-5)
    assert abs(tpot["halo"].tpot_s - tpot["strict"].tpot_s) / tpot["strict"].tpot_s < 0.03
    for res in tpot.values():
        assert res.tpot_s > res.compute_s + res.stack_s / cluster.n_devices   # network and stack cost something


def test_strict_grows_with_plr_much_faster_than_the_unreliable_modes() -> None:
    # deadlines seeded by the scheduler: no 0.5 s warm-up waits in these few tokens
    tpot = {(mode, plr): simulate(TINYLLAMA_1_1B, tiny(plr), SimOptions(mode=mode, tokens=8,
                                                                        initial_deadline_s=None)).tpot_s
            for mode in ("strict", "halo") for plr in (0.0, 0.01, 0.05)}
    strict_growth = tpot[("strict", 0.05)] / tpot[("strict", 0.0)]
    halo_growth = tpot[("halo", 0.05)] / tpot[("halo", 0.0)]
    assert tpot[("strict", 0.0)] < tpot[("strict", 0.01)] < tpot[("strict", 0.05)]
    assert strict_growth > 3 * halo_growth
    assert halo_growth < 2.0


def test_one_lost_packet_costs_one_rto_in_strict() -> None:
    """The first packet of the input to w01 at the first sync point is lost once: that input, and
    so that sync point, ends one RTO (200 ms) later; no other sync point changes."""
    cluster = uniform_cluster(FREE, 4, QUIET)
    base = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=2, trace=True))
    lossy = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=2, trace=True,
                                                         drops=((0, 0, ATTN, "w01", "in", 0),)))
    rto = QUIET.rto_s
    assert lossy.retransmissions * 2 == 1
    delta = lossy.token_s[0] - base.token_s[0]
    first = [lossy.traces[0].closed_at_s - lossy.traces[0].sent_at_s,
             base.traces[0].closed_at_s - base.traces[0].sent_at_s]
    # w01's answer now arrives alone instead of queued behind the others: at most a few ms less
    assert rto - 0.003 < delta <= rto + 1e-6
    assert first[0] - first[1] == pytest.approx(delta, abs=1e-9)
    for a, b in zip(lossy.traces[1:], base.traces[1:], strict=True):
        assert a.closed_at_s - a.sent_at_s == pytest.approx(b.closed_at_s - b.sent_at_s, abs=1e-9)
    assert lossy.token_s[1] == pytest.approx(base.token_s[1], abs=1e-9)


def test_lost_retransmission_doubles_the_rto() -> None:
    """The same packet lost twice: RTO, then the retransmission waits 2 RTO (3 RTO in all)."""
    cluster = uniform_cluster(FREE, 4, QUIET)
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
    # in the simulation: w01's answer (one reliable message of 2 packets) loses its first packet;
    # only w01's answer is late, by one RTO; the other workers' answers are as without loss
    cluster = uniform_cluster(FREE, 4, QUIET)
    base = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1, trace=True))
    lossy = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict", tokens=1, trace=True,
                                                         drops=((0, 0, MLP, "w01", "out", 0),)))
    owners = lossy.schedule.plan.owners_at(0, MLP)
    trace, ref = lossy.traces[1], base.traces[1]
    for g, p in owners.items():
        if p == "c":
            continue
        late = trace.group_done_s[g] - ref.group_done_s[g]
        assert late == pytest.approx(QUIET.rto_s, abs=1e-3) if p == "w01" else abs(late) < 1e-3


# -- the unreliable modes -------------------------------------------------------------------------

def test_nothing_skipped_or_resent_at_plr0() -> None:
    cluster = uniform_cluster(rpi4b(), 8, QUIET)
    for shape in (TINYLLAMA_1_1B, SMOLLM2_135M):
        for mode in ("strict-unreliable", "halo"):
            res = simulate(shape, cluster, SimOptions(mode=mode, tokens=16))
            counts = (res.skipped_groups, res.lost_importance, res.resends, res.need_inputs, res.late_chunks)
            assert counts == (0, 0, 0, 0, 0)


def test_halo_skips_a_lost_non_critical_answer_and_resends_a_critical_one() -> None:
    """One answer packet lost at PLR 0 (no parity), after the timers warmed up. halo: w01's answer
    holds only non-critical groups: skipped whole at w01's deadline, no Resend; w02's holds the
    critical ones: asked for again, nothing skipped. strict-unreliable: both resent."""
    plan, rest, top = split_by_criticality()
    cluster = Cluster(FREE, (FREE, FREE), (QUIET, QUIET))
    scores = mlp_scores(TINYLLAMA_1_1B.layout(), 0)
    total = float(scores.sum() + TINYLLAMA_1_1B.layout().n_attn * scores.max(axis=1).sum())
    tokens = 6
    for mode in ("halo", "strict-unreliable"):
        for pid, groups in (("w01", rest), ("w02", top)):
            res = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode=mode, tokens=tokens, trace=True),
                           plan=plan, scores=scores)
            drop = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode=mode, tokens=tokens, trace=True,
                                                                drops=((4, 0, MLP, pid, "out", 0),)),
                            plan=plan, scores=scores)
            trace = next(t for t in drop.traces if (t.token, t.layer, t.part) == (4, 0, MLP))
            assert res.skipped_groups == res.resends == 0
            if mode == "halo" and pid == "w01":
                assert drop.skipped_groups * tokens == len(groups) and drop.resends == 0
                assert drop.lost_importance * tokens == pytest.approx(float(scores[0, groups].sum()) / total)
                assert not set(groups) & set(trace.group_done_s)
                assert drop.token_s[4] - res.token_s[4] < 0.02        # waited only until the deadline
            else:
                assert drop.skipped_groups == 0 and drop.resends * tokens == 1
                assert set(groups) <= set(trace.group_done_s)


def test_parity_repairs_one_lost_answer_packet() -> None:
    """On a link that measured loss the answer carries XOR parity: one lost data packet is rebuilt,
    no Resend, nothing skipped."""
    plan, _, _ = split_by_criticality()
    # lossy enough to send parity, never loses by itself; with some jitter, so that the deadline
    # (srtt + 4 rttvar) leaves room for the parity packet that follows the data
    link = gbe_link(1e-12, jitter_s=1e-4)
    cluster = Cluster(FREE, (FREE, FREE), (link, link))
    for pid in ("w01", "w02"):
        res = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="halo", tokens=6,
                                                           drops=((4, 0, MLP, pid, "out", 0),)), plan=plan)
        assert (res.skipped_groups, res.resends, res.need_inputs) == (0, 0, 0)


def test_a_lost_input_costs_a_need_input() -> None:
    """The input to w01 (2 data packets, no parity) loses its first packet: the worker asks again
    after its 20 ms gap. strict-unreliable: the coordinator's Resend at the deadline comes first
    and the worker answers it with NeedInput; halo: w01's answer is non-critical, skipped at the
    deadline, and the next sync point's input supersedes the lost one before the gap ends (a
    worker drops inputs older than the newest it computed): no NeedInput at all."""
    plan, rest, _ = split_by_criticality()
    cluster = Cluster(FREE, (FREE, FREE), (QUIET, QUIET))
    tokens = 6
    drop = ((4, 0, MLP, "w01", "in", 0),)
    su = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict-unreliable", tokens=tokens, drops=drop), plan=plan)
    halo = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="halo", tokens=tokens, drops=drop), plan=plan)
    assert su.skipped_groups == 0 and su.resends * tokens >= 1 and su.need_inputs * tokens >= 1
    assert halo.skipped_groups * tokens == len(rest) and halo.resends == 0 and halo.need_inputs == 0


def test_halo_under_loss_skips_only_non_critical_answers() -> None:
    plan, _, _ = split_by_criticality()
    cluster = Cluster(FREE, (FREE, FREE), (gbe_link(0.05), gbe_link(0.05)))
    res = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="halo", tokens=8, trace=True), plan=plan)
    assert res.skipped_groups > 0 and res.resends > 0
    for t in res.traces:
        remote = {g for g, p in plan.owners_at(t.layer, t.part).items() if p != "c"}
        skipped = remote - set(t.group_done_s)
        critical = {g for g, p in plan.owners_at(t.layer, t.part).items() if p == "w02"}
        assert not skipped & critical
        assert skipped in (set(), remote - critical)           # a worker's answer is skipped whole
    assert 0 < res.lost_importance < 0.1
    su = simulate(TINYLLAMA_1_1B, cluster, SimOptions(mode="strict-unreliable", tokens=8), plan=plan)
    assert su.skipped_groups == 0 and su.resends > res.resends


# -- placement, determinism, limits ---------------------------------------------------------------

def test_deterministic_with_a_seed() -> None:
    a = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=6, seed=3))
    b = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=6, seed=3))
    c = simulate(TINYLLAMA_1_1B, tiny(0.05), SimOptions(mode="halo", tokens=6, seed=4))
    assert a.token_s == b.token_s and a.resends == b.resends
    assert a.token_s != c.token_s


def test_more_devices_less_compute_per_token() -> None:
    compute = [simulate(LLAMA2_7B, uniform_cluster(FREE, n, QUIET), SimOptions(mode="strict", tokens=1)).compute_s
               for n in (1, 2, 4, 8)]
    assert compute[0] > compute[1] > compute[2] > compute[3]
    single = LLAMA2_7B.matvec_params * rpi4b().seconds_per_param   # distributed-llama's 1312.5 ms
    assert compute[0] == pytest.approx(single, rel=1e-9) == pytest.approx(1.3125, rel=1e-9)


def test_uses_the_scheduler_placement() -> None:
    """A worker 4x slower gets fewer groups from the scheduler than from an equal split, and the
    simulated TPOT is lower with the scheduler's plan."""
    fast, slow = FREE, replace(FREE, seconds_per_param=4 * FREE.seconds_per_param)
    cluster = Cluster(fast, (fast, fast, slow), (QUIET,) * 3)
    opts = SimOptions(mode="halo", tokens=4)
    sched = place(TINYLLAMA_1_1B, cluster, mode="halo", scores=mlp_scores(TINYLLAMA_1_1B.layout(), 0))
    split = PlacementPlan.split(TINYLLAMA_1_1B.layout(), ["c", "w01", "w02", "w03"])
    assert len(sched.plan.groups_of("w03")) < len(split.groups_of("w03"))
    best = simulate(TINYLLAMA_1_1B, cluster, opts)
    equal = simulate(TINYLLAMA_1_1B, cluster, opts, plan=split)
    assert best.schedule.plan.owner == sched.plan.owner
    assert best.tpot_s < equal.tpot_s


def test_stack_aware_placement_uses_fewer_workers_and_is_faster() -> None:
    """With the Pi 4B's Python stack, the stack-aware scheduler keeps Llama-2-7B on fewer devices
    than the node's (stack-blind) placement, and the simulation agrees that it is faster."""
    cluster = uniform_cluster(rpi4b(), 8, QUIET)
    blind = simulate(LLAMA2_7B, cluster, SimOptions(mode="halo", tokens=2))
    aware = simulate(LLAMA2_7B, cluster, SimOptions(mode="halo", tokens=2, stack_aware=True))
    assert len(aware.schedule.deadline_s) < len(blind.schedule.deadline_s) == 7
    assert aware.tpot_s < blind.tpot_s and aware.stack_s < blind.stack_s


def test_llama2_7b_is_fast_to_simulate() -> None:
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
        SimOptions(wire_dtype="int4")
    with pytest.raises(ConfigError):
        gbe_link(1.5)
    assert SimOptions(mode="strict-unreliable", wire_dtype="float16").mode == "strict-unreliable"
