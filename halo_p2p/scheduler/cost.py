"""The scheduler's cost model (pure: no I/O, no asyncio, no torch).

Everything the placement search optimizes is computed here, by one function per quantity, so
that a plan made by the scheduler and any other plan (an equal split, the plan currently
running) are scored by the same model: :func:`evaluate_plan`. The model and its assumptions are
written out in ``docs/scheduler.md``; in short, per token and per sync point ``s``:

* peer ``p`` holding ``W_p`` weight parameters there answers, if nothing is lost, at
  ``b_p = c_p * W_p + rtt_p + jw * jit_p`` (the coordinator: ``c_0 * W_0``);
* a lost critical partial costs Resend attempts (expected ``A_p = P/(1-P)``, ``P`` the
  probability that the input or a critical partial of ``p`` is lost), each ending one round trip
  after the deadline: ``b_p + R_p``, ``R_p = rtt_p + k * jit_p``; a lost or late non-critical
  partial (probability ``V_p``) makes the coordinator wait until the deadline ``b_p + k * jit_p``;
* the sync point takes ``T_s = M + sum_p A_p (b_p + R_p - M)^+ + V_p (b_p + k jit_p - M)^+`` with
  ``M = max_p b_p`` (first order in loss events: one late peer at a time), and loses
  ``sum_g importance_g * (1 - p_crit_g) * q_p`` of importance (``q_p``: probability that one
  partial of worker ``p`` is lost or late).

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

__all__ = ["CostModel", "evaluate_plan"]

log = logging.getLogger(__name__)


def _input_loss(plr: float, n_data: int, n_parity: int) -> float:
    """Probability that a layer input of ``n_data`` chunks plus XOR parity cannot be rebuilt.

    One XOR parity chunk recovers one lost chunk of its stripe; the model treats ``n_parity``
    parities as recovering any ``n_parity`` losses (exact for one parity).
    """
    n_parity = min(n_parity, n_data)   # as the coordinator sends it
    n = n_data + n_parity
    ok = sum(math.comb(n, i) * plr ** i * (1 - plr) ** (n - i) for i in range(n_parity + 1))
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
        n_in = max(1, math.ceil(layout.dim / config.input_chunk_elems))
        self.f_out = max(1, math.ceil(layout.dim / config.partial_chunk_elems))
        self.coord = [p.is_coordinator for p in peers]
        self.c = [p.seconds_per_gparam * 1e-9 for p in peers]                 # seconds per parameter
        jit = [0.0 if p.is_coordinator else p.jitter_ms / 1e3 for p in peers]
        rtt = [0.0 if p.is_coordinator else p.rtt_ms / 1e3 for p in peers]
        plr = [0.0 if p.is_coordinator else min(p.plr, 1.0 - 1e-9) for p in peers]
        self.rtt = rtt
        self.base = [r + config.jitter_weight * j for r, j in zip(rtt, jit, strict=True)]
        self.rec = [r + k * j for r, j in zip(rtt, jit, strict=True)]      # one Resend attempt
        self.waitx = [k * j for j in jit]                                   # deadline beyond arrival
        log_keep = [math.log1p(-x) for x in plr]                            # log P(one frame arrives)
        self.keep_in = [1.0 - _input_loss(x, n_in, config.n_parity) for x in plr]
        self.p_late = [math.exp(-k) if j > 0 and not co else 0.0 for j, co in zip(jit, self.coord, strict=True)]
        self.q = [0.0 if co else 1.0 - ki * math.exp(lk * self.f_out) * (1.0 - pl)
                  for co, ki, lk, pl in zip(self.coord, self.keep_in, log_keep, self.p_late, strict=True)]
        self.mem = [config.group_bytes(layout, part) for part in PARTS]
        self.params = [layout.group_params(part) for part in PARTS]
        self._max_attempts = config.max_recovery_attempts
        workers = [i for i, p in enumerate(peers) if not p.is_coordinator]
        # d(cost)/d(plr) at plr -> 0 per unit p_critical (recovery) and per second of quality stake
        self.stake_crit = self.f_out * sum(self.rec[i] for i in workers) / max(1, len(workers))
        self.stake_loss = float(n_in + self.f_out)
        self.simple = [co or (lk == 0.0 and pl == 0.0)                      # never waits beyond b_p
                       for co, lk, pl in zip(self.coord, log_keep, self.p_late, strict=True)]
        self._lkf = [lk * self.f_out for lk in log_keep]

    def terms(self, p: int, params: float, n: int, kappa: float) -> tuple[float, float, float]:
        """Peer ``p``'s terms at one sync point: ``(b, A, V)``.

        Args:
            p: peer index.
            params: weight parameters it holds at the sync point.
            n: groups it holds there (0: it is not waited for, all terms 0).
            kappa: expected number of its groups there that are critical.

        Returns:
            ``b``: loss-free arrival from sending its input (s); ``A``: expected Resend attempts;
            ``V``: probability of waiting until its deadline for a non-critical partial.
        """
        if n == 0:
            return 0.0, 0.0, 0.0
        b = self.c[p] * params + self.base[p]
        if self.simple[p]:
            return b, 0.0, 0.0
        keep_in, lkf = self.keep_in[p], self._lkf[p]
        keep_crit = keep_in if kappa >= 1.0 else (keep_in ** kappa if kappa > 0.0 else 1.0)
        keep_crit *= math.exp(lkf * kappa)
        attempts = (1.0 - keep_crit) / keep_crit if keep_crit > 1e-12 else self._max_attempts
        wait = keep_crit - keep_in * math.exp(lkf * n)     # some non-critical partial lost, none critical
        wait = (wait if wait > 0.0 else 0.0) + self.p_late[p]
        return b, min(attempts, self._max_attempts), min(wait, 1.0)

    def extra(self, p: int, b: float, a: float, v: float, m: float) -> float:
        """Expected seconds peer ``p``'s losses add to a sync point whose loss-free time is ``m``."""
        x = a * (b + self.rec[p] - m) if a else 0.0
        y = v * (b + self.waitx[p] - m) if v else 0.0
        return (x if x > 0.0 else 0.0) + (y if y > 0.0 else 0.0)

    def sync_time(self, terms: Sequence[tuple[float, float, float]]) -> float:
        """Expected seconds of a sync point from its peers' :meth:`terms` (zeros where none held)."""
        m = 0.0
        for b, _, _ in terms:
            if b > m:
                m = b
        total = m
        rec, waitx = self.rec, self.waitx
        for p, (b, a, v) in enumerate(terms):
            if a:
                x = a * (b + rec[p] - m)
                if x > 0.0:
                    total += x
            if v:
                y = v * (b + waitx[p] - m)
                if y > 0.0:
                    total += y
        return total

    def deadline(self, p: int, params: float) -> float:
        """Initial run-time deadline of worker ``p`` holding ``params`` at a sync point (s)."""
        cfg = self.config
        expect = self.c[p] * params + self.rtt[p]
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
            terms = [cost.terms(p, cost.params[part] * len(gs), len(gs), float(sum(pc[g] for g in gs)))
                     for p, gs in enumerate(holders[part])]
            m = max(t[0] for t in terms)
            sync_s[layer, part] = cost.sync_time(terms)
            for p, gs in enumerate(holders[part]):
                if not gs:
                    continue
                params = cost.params[part] * len(gs)
                compute[p] += cost.c[p] * params
                comm[p] += terms[p][0] - cost.c[p] * params + cost.extra(p, *terms[p], m)
                counts[p][part] += len(gs)
                lost[p] += cost.q[p] * float(sum(imp[g] * (1.0 - pc[g]) for g in gs))
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
                 if not m.is_coordinator and sum(counts[p])}
    return Schedule(plan, deadlines, tpot, lost_total, objective, breakdown, sync_s)


