"""The scheduler's cost model (pure: no I/O, no asyncio, no torch).

Everything the placement search optimizes is computed here, by one function per quantity, so
that a plan made by the scheduler and any other plan (an equal split, the plan currently
running) are scored by the same model: :func:`evaluate_plan`. The model and its assumptions are
written out in ``docs/scheduler.md``. It follows wire protocol 2: per sync point the coordinator
sends each worker holding groups there one input vector and the worker answers with ONE vector,
the sum of its groups' partials. In short, per token and per sync point ``s``:

* peer ``p`` holding ``W_p`` weight parameters there answers, if nothing is lost, at
  ``b_p = c_p * W_p + rtt_p + jw * jit_p + S_p`` (``S_p``: the network stack's CPU on the way,
  both ends; the coordinator: ``c_0 * W_0``); the coordinator's CPU also serializes its own
  compute with its stack work for every worker: ``C = c_0 W_0 + sync + sum_p H_p``;
* the answer is lost (input or answer unrecoverable from its frames and XOR parity) with
  probability ``P_p``; it is critical (the worker holds a critical group there) with probability
  ``pi_p = 1 - prod_g (1 - p_crit_g)``. A lost critical answer costs Resend attempts (expected
  ``A_p = pi_p P/(1-P)``), each ending one round trip after the deadline: ``b_p + R_p``; a lost
  or late non-critical answer (probability ``V_p``) makes the coordinator wait until the deadline
  ``b_p + k * jit_p`` and skip the worker's whole answer;
* the sync point takes ``T_s = M + sum_p A_p (b_p + R_p - M)^+ + V_p (b_p + k jit_p - M)^+`` with
  ``M = max(max_p b_p, C)`` (first order in loss events: one late peer at a time), and loses
  ``sum_p q_p * prod_g (1 - p_crit_g) * sum_g importance_g`` of importance (``q_p``: probability
  that the answer of worker ``p`` is lost or late).

Sources: HALO (Zheng et al., INFOCOM 2026, arXiv 2601.11676, abstract: relaxed synchronization
and load balancing by criticality); RFC 6298 for the deadline ``srtt + k * rttvar``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from halo_p2p.errors import PlanError
from halo_p2p.groups import ATTN, MLP, PARTS, GroupId, GroupLayout
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler.model import GroupStats, PeerLoad, PeerModel, Schedule, SchedulerConfig

__all__ = ["CostModel", "Terms", "evaluate_plan", "parity_chunks", "vector_loss"]

log = logging.getLogger(__name__)

Terms = tuple[float, float, float, float]
"""A peer's terms at one sync point: ``(b, A, V, H)`` (see :meth:`CostModel.terms`)."""


def parity_chunks(n_data: int, plr: float, n_parity: int) -> int:
    """XOR parity chunks the session adds to a vector of ``n_data`` chunks on a link of loss ``plr``:
    none on a link without loss or with FEC off (``n_parity = 0``), else
    ``min(n_data, max(n_parity, ceil(n_data / 4)))`` (``wire.vector.default_parity``)."""
    if plr <= 0.0 or n_parity <= 0:
        return 0
    return min(n_data, max(n_parity, math.ceil(n_data / 4)))


def vector_loss(plr: float, n_data: int, n_parity: int) -> float:
    """Probability that a vector of ``n_data`` chunks plus ``n_parity`` XOR parity chunks cannot be rebuilt.

    Parity chunk ``j`` covers the data chunks ``i`` with ``i % n_parity == j`` (a stripe) and
    rebuilds one lost chunk of its stripe (``wire.fec``); stripes are lost independently, every
    packet with probability ``plr``. Exact for the session's layout.
    """
    if plr <= 0.0:
        return 0.0
    keep = 1.0 - plr
    if n_parity <= 0:
        return 1.0 - keep ** n_data
    ok = 1.0
    for j in range(n_parity):
        s = len(range(j, n_data, n_parity)) + 1            # the stripe's data chunks and its parity
        ok *= keep ** s + s * plr * keep ** (s - 1)
    return max(0.0, 1.0 - ok)


class CostModel:
    """Per-peer constants of the cost model, a peer's terms at a sync point, and its time (s).

    Args:
        layout: the model's groups.
        peers: every peer (one coordinator), in schedule order.
        config: cost-model settings.
    """

    def __init__(self, layout: GroupLayout, peers: list[PeerModel], config: SchedulerConfig) -> None:
        self.layout, self.peers, self.config = layout, peers, config
        k = config.deadline_k
        # mypy: chunk sizes are set in __post_init__ before any cost model exists
        n_in = max(1, math.ceil(layout.dim / config.input_chunk_elems))      # type: ignore[operator]
        # mypy: chunk sizes are set in __post_init__ before any cost model exists
        n_out = max(1, math.ceil(layout.dim / config.partial_chunk_elems))   # type: ignore[operator]
        self.coord = [p.is_coordinator for p in peers]
        self.c = [p.seconds_per_gparam * 1e-9 for p in peers]                 # seconds per parameter
        jit = [0.0 if p.is_coordinator else p.jitter_ms / 1e3 for p in peers]
        rtt = [0.0 if p.is_coordinator else p.rtt_ms / 1e3 for p in peers]
        plr = [0.0 if p.is_coordinator else min(p.plr, 1.0 - 1e-9) for p in peers]
        tx, rx = config.frame_tx_cpu_s, config.frame_rx_cpu_s
        vtx, vrx, sync = config.vector_tx_cpu_s, config.vector_rx_cpu_s, config.sync_cpu_s
        self.sync_cpu = sync
        self.rtt = rtt
        self.frames: list[tuple[int, int]] = []    # packets of the input and of the answer, parity included
        self.base, self.hold, self.rec, self.path = [], [], [], []
        keep = []
        for co, r, j, x in zip(self.coord, rtt, jit, plr, strict=True):
            f_in = n_in + parity_chunks(n_in, x, config.n_parity)
            f_out = n_out + parity_chunks(n_out, x, config.n_parity)
            self.frames.append((f_in, f_out))
            # stack CPU on the way (worker: wake, input in, answer out; coordinator: input out, answer in)
            path = sync + 2 * (vtx + vrx) + (f_in + f_out) * (tx + rx)
            self.path.append(0.0 if co else path)
            self.base.append(0.0 if co else r + config.jitter_weight * j + path)
            self.hold.append(0.0 if co else vtx + vrx + f_in * tx + f_out * rx)    # the coordinator's CPU
            self.rec.append(r + k * j + (1 + f_out) * (tx + rx))                   # one Resend attempt
            keep.append((1.0 - vector_loss(x, n_in, f_in - n_in)) * (1.0 - vector_loss(x, n_out, f_out - n_out)))
        self.waitx = [k * j for j in jit]                                   # deadline beyond arrival
        self.p_late = [math.exp(-k) if j > 0 and not co else 0.0 for j, co in zip(jit, self.coord, strict=True)]
        self.p_lost = [0.0 if co else 1.0 - kp for co, kp in zip(self.coord, keep, strict=True)]
        self.q = [0.0 if co else 1.0 - kp * (1.0 - pl)
                  for co, kp, pl in zip(self.coord, keep, self.p_late, strict=True)]
        self.mem = [config.group_bytes(layout, part) for part in PARTS]
        self.params = [layout.group_params(part) for part in PARTS]
        self._max_attempts = config.max_recovery_attempts
        workers = [i for i, p in enumerate(peers) if not p.is_coordinator]
        # d(cost)/d(plr) at plr -> 0 per unit p_critical (recovery) and per second of quality stake
        self.stake_crit = sum(self.rec[i] for i in workers) / max(1, len(workers))
        self.stake_loss = float(n_in + n_out)
        self.simple = [co or (pl == 0.0 and lt == 0.0)                      # never waits beyond b_p
                       for co, pl, lt in zip(self.coord, self.p_lost, self.p_late, strict=True)]

    def terms(self, p: int, params: float, n: int, pi: float) -> Terms:
        """Peer ``p``'s terms at one sync point: ``(b, A, V, H)``.

        Args:
            p: peer index.
            params: weight parameters it holds at the sync point.
            n: groups it holds there (0: it is not waited for, all terms 0).
            pi: probability that its answer is critical (it holds a critical group there).

        Returns:
            ``b``: loss-free arrival from sending its input (s); ``A``: expected Resend attempts;
            ``V``: probability of waiting until its deadline for a lost or late non-critical
            answer; ``H``: the coordinator's stack CPU for this worker (s).
        """
        if n == 0:
            return 0.0, 0.0, 0.0, 0.0
        b = self.c[p] * params + self.base[p]
        if self.simple[p]:
            return b, 0.0, 0.0, self.hold[p]
        lost = self.p_lost[p]
        attempts = pi * lost / (1.0 - lost) if lost < 1.0 - 1e-12 else self._max_attempts
        wait = (1.0 - pi) * lost + self.p_late[p]
        return b, min(attempts, self._max_attempts), min(wait, 1.0), self.hold[p]

    def extra(self, p: int, b: float, a: float, v: float, h: float, m: float) -> float:
        """Expected seconds peer ``p``'s losses add to a sync point whose loss-free time is ``m``."""
        x = a * (b + self.rec[p] - m) if a else 0.0
        y = v * (b + self.waitx[p] - m) if v else 0.0
        return (x if x > 0.0 else 0.0) + (y if y > 0.0 else 0.0)

    def loss_free(self, terms: Sequence[Terms]) -> float:
        """Loss-free seconds ``M`` of a sync point: the last arrival, or the coordinator's CPU."""
        m = cpu = held = 0.0
        for p, (b, _, _, h) in enumerate(terms):
            if b > m:
                m = b
            if self.coord[p]:
                cpu += b
            held += h
        if held:
            cpu += held + self.sync_cpu
        return cpu if cpu > m else m

    def sync_time(self, terms: Sequence[Terms]) -> float:
        """Expected seconds of a sync point from its peers' :meth:`terms` (zeros where none held)."""
        m = self.loss_free(terms)
        total = m
        rec, waitx = self.rec, self.waitx
        for p, (b, a, v, _) in enumerate(terms):
            if a:
                x = a * (b + rec[p] - m)
                if x > 0.0:
                    total += x
            if v:
                y = v * (b + waitx[p] - m)
                if y > 0.0:
                    total += y
        return total

    def lost(self, p: int, imp_sum: float, p_none: float) -> float:
        """Expected importance peer ``p`` loses at a sync point: its groups' importance ``imp_sum``
        when its answer is lost or late and none of them is critical (probability ``p_none``)."""
        return self.q[p] * p_none * imp_sum

    def deadline(self, p: int, params: float) -> float:
        """Initial run-time deadline of worker ``p`` holding ``params`` at a sync point (s)."""
        cfg = self.config
        expect = self.c[p] * params + self.rtt[p] + self.path[p]
        return max(cfg.deadline_floor_s, (1.0 + cfg.deadline_slack) * expect + self.waitx[p])


def evaluate_plan(plan: PlacementPlan, peers: Iterable[PeerModel], stats: GroupStats | None = None,
                  config: SchedulerConfig | None = None) -> Schedule:
    """Score any plan with the cost model (the scheduler's plans and, e.g., an equal split).

    Args:
        plan: the placement; its peers must all be described in ``peers``.
        peers: the peers' models (extra peers not in the plan are ignored).
        stats: group statistics (default: :meth:`GroupStats.default`).
        config: cost-model settings.

    Raises:
        PlanError: the plan names a peer missing from ``peers`` or another coordinator.
        ConfigError: ``stats`` do not fit the plan's layout.
    """
    config = config or SchedulerConfig()
    layout = plan.layout
    stats = stats or GroupStats.default(layout)
    stats.check(layout)
    by_id = {p.peer_id: p for p in peers}
    missing = [p for p in plan.peers if p not in by_id]
    if missing:
        raise PlanError(f"plan peer(s) {missing} have no PeerModel", "describe every peer of the plan")
    if not by_id[plan.coordinator].is_coordinator:
        raise PlanError(f"plan coordinator {plan.coordinator!r} is not marked is_coordinator",
                        "mark the coordinator's PeerModel")
    models = [by_id[p] for p in plan.peers]
    cost = CostModel(layout, models, config)
    index = {p: i for i, p in enumerate(plan.peers)}
    n_peers = len(models)
    holders: list[list[list[int]]] = [[[] for _ in range(n_peers)] for _ in PARTS]
    sync_s = np.zeros((layout.n_layers, len(PARTS)))
    compute = [0.0] * n_peers
    comm = [0.0] * n_peers
    lost = [0.0] * n_peers
    deadline = [[0.0, 0.0] for _ in range(n_peers)]
    counts = [[0, 0] for _ in range(n_peers)]
    total_imp = sum(float(stats.importance[part].sum()) for part in PARTS)
    for layer in range(layout.n_layers):
        for part in PARTS:
            imp, pc = stats.importance[part][layer], stats.p_critical[part][layer]
            for h in holders[part]:
                h.clear()
            for g in range(layout.n_groups(part)):
                holders[part][index[plan.owner[GroupId(layer, part, g)]]].append(g)
            none = [float(np.prod(1.0 - pc[gs])) if gs else 1.0 for gs in holders[part]]
            terms = [cost.terms(p, cost.params[part] * len(gs), len(gs), 1.0 - none[p])
                     for p, gs in enumerate(holders[part])]
            m = cost.loss_free(terms)
            sync_s[layer, part] = cost.sync_time(terms)
            for p, gs in enumerate(holders[part]):
                if not gs:
                    continue
                params = cost.params[part] * len(gs)
                compute[p] += cost.c[p] * params
                comm[p] += terms[p][0] - cost.c[p] * params + cost.extra(p, *terms[p], m)
                counts[p][part] += len(gs)
                lost[p] += cost.lost(p, float(imp[gs].sum()), none[p])
                if not cost.coord[p]:
                    deadline[p][part] = max(deadline[p][part], cost.deadline(p, params))
    return _schedule(plan, cost, sync_s, counts, compute, comm, lost, deadline, total_imp)


def _schedule(plan: PlacementPlan, cost: CostModel, sync_s: np.ndarray, counts: list[list[int]],
              compute: list[float], comm: list[float], lost: list[float], deadline: list[list[float]],
              total_imp: float) -> Schedule:
    cfg = cost.config
    breakdown = {}
    for p, model in enumerate(cost.peers):
        n_a, n_m = counts[p]
        mem = n_a * cost.mem[ATTN] + n_m * cost.mem[MLP] + (cfg.coordinator_fixed_bytes if model.is_coordinator else 0)
        breakdown[model.peer_id] = PeerLoad(
            groups=n_a + n_m, attn_groups=n_a, mlp_groups=n_m, params=n_a * cost.params[ATTN] + n_m * cost.params[MLP],
            memory_bytes=mem, budget_bytes=model.memory_budget_bytes, compute_s=compute[p], comm_s=comm[p],
            lost_importance=lost[p], deadline_s=(deadline[p][0], deadline[p][1]))
    tpot = float(sync_s.sum())
    lost_total = float(sum(lost))
    objective = tpot + (cfg.quality_weight_s * lost_total / total_imp if total_imp > 0 else 0.0)
    deadlines = {m.peer_id: max(deadline[p]) for p, m in enumerate(cost.peers)
                 if not m.is_coordinator and any(counts[p])}
    return Schedule(plan, deadlines, tpot, lost_total, objective, breakdown, sync_s)


