"""Placement of one sync point's groups: greedy list scheduling, re-dealing, local improvement.

Given how many groups each peer may still take at this sync point (from the memory allocation
of :mod:`halo_p2p.scheduler.search`):

1. **Greedy** (list scheduling as in LPT, Graham 1969): the groups, by stake descending (how
   much a lossy owner would cost them: ``p_critical`` for recovery time, ``importance *
   (1 - p_critical)`` for quality), go one by one to the peer with the smallest increase of
   the sync point's objective (expected time plus weighted expected lost importance); ties go
   to the current owner (re-plans), then to the earliest loss-free arrival (LPT's rule), then
   to the first peer (coordinator first, then workers by id). For identical groups and costs
   that grow with the group count this is exact for the makespan (min-max of separable
   non-decreasing costs); a lossy peer's expected recovery makes it expensive for critical groups.
2. **Re-deal**: the greedy's group counts are kept and the groups dealt again, highest stake to
   the most reliable peer (rearrangement inequality), if that is not worse.
3. **Local improvement**: moving a group off the bottleneck peer and swapping a more critical
   (or more important) group on a lossier peer with a less critical one on a more reliable peer,
   each applied only if it lowers the objective by more than 1 ns.
4. With a current plan: returning groups to their current owner where that costs nothing.

Deterministic: fixed orders, no randomness.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from halo_p2p.errors import PlanError
from halo_p2p.scheduler.cost import CostModel, Terms

__all__ = ["SyncState", "greedy", "improve"]

log = logging.getLogger(__name__)

_EPS_S = 1e-9    # an improvement must exceed this (seconds) to be applied
_TIE_S = 1e-12   # objective differences below this (seconds) are ties
_CRIT = 1.0 - 1e-12

Change = dict[int, tuple[tuple[int, ...], tuple[int, ...]]]
"""peer -> (groups added, groups removed)."""


class SyncState:
    """The groups of one sync point and who holds them during the search.

    Per peer it keeps the group count, and what its answer's criticality and quality depend on
    (one answer per worker): how many of its groups are surely critical, the log-probability that
    none of the others is, and the sum of its groups' weighted importance.

    Args:
        cost: the cost model.
        part: ATTN or MLP.
        pc, imp: the groups' ``p_critical`` and importance.
        lam: quality weight per unit importance (seconds).
    """

    def __init__(self, cost: CostModel, part: int, pc: np.ndarray, imp: np.ndarray, lam: float) -> None:
        self.cost, self.part = cost, part
        self.pc: list[float] = pc.tolist()
        self.xi: list[float] = (imp * lam).tolist()                # seconds if the group is skipped
        self.x: list[float] = (imp * (1.0 - pc) * lam).tolist()   # quality stake (ordering heuristic)
        self.stake = [c * cost.stake_crit + x * cost.stake_loss for c, x in zip(self.pc, self.x, strict=True)]
        self.sure = [c >= _CRIT for c in self.pc]
        self.lc = [0.0 if c >= _CRIT else math.log1p(-c) for c in self.pc]
        self.w = cost.params[part]
        n_peers = len(cost.peers)
        self.n = [0] * n_peers
        self.zc = [0] * n_peers          # groups surely critical
        self.lp = [0.0] * n_peers        # log P(none of the others is critical)
        self.big_x = [0.0] * n_peers     # sum of xi
        self.t: list[Terms] = [(0.0, 0.0, 0.0, 0.0)] * n_peers
        self.where = [-1] * len(self.pc)

    def _terms(self, p: int, n: int, zc: int, lp: float) -> Terms:
        return self.cost.terms(p, self.w * n, n, 1.0 if zc else -math.expm1(lp))

    def _lost(self, p: int, zc: int, lp: float, big_x: float) -> float:
        return 0.0 if zc or not big_x else self.cost.q[p] * math.exp(lp) * big_x

    def _after(self, p: int, add: tuple[int, ...] = (), rem: tuple[int, ...] = ()) -> tuple[int, int, float, float]:
        n, zc, lp, big_x = self.n[p], self.zc[p], self.lp[p], self.big_x[p]
        for g in add:
            n, zc, lp, big_x = n + 1, zc + self.sure[g], lp + self.lc[g], big_x + self.xi[g]
        for g in rem:
            n, zc, lp, big_x = n - 1, zc - self.sure[g], lp - self.lc[g], big_x - self.xi[g]
        return (n, zc, lp, big_x) if n else (0, 0, 0.0, 0.0)

    def change(self, moves: Change) -> tuple[dict[int, Terms], float]:
        """The terms of the peers in ``moves`` after them, and the change of weighted lost importance."""
        over, dq = {}, 0.0
        for p, (add, rem) in moves.items():
            n, zc, lp, big_x = self._after(p, add, rem)
            over[p] = self._terms(p, n, zc, lp)
            dq += self._lost(p, zc, lp, big_x) - self._lost(p, self.zc[p], self.lp[p], self.big_x[p])
        return over, dq

    def put(self, g: int, p: int) -> None:
        old = self.where[g]
        if old >= 0:
            self.n[old], self.zc[old], self.lp[old], self.big_x[old] = self._after(old, rem=(g,))
            self.t[old] = self._terms(old, self.n[old], self.zc[old], self.lp[old])
        self.where[g] = p
        self.n[p], self.zc[p], self.lp[p], self.big_x[p] = self._after(p, add=(g,))
        self.t[p] = self._terms(p, self.n[p], self.zc[p], self.lp[p])

    def time(self, over: dict[int, Terms] | None = None) -> float:
        """Expected seconds of the sync point, with the terms of some peers replaced by ``over``."""
        if not over:
            return self.cost.sync_time(self.t)
        t = list(self.t)
        for p, tp in over.items():
            t[p] = tp
        return self.cost.sync_time(t)

    def lost(self) -> float:
        """Weighted expected lost importance (seconds)."""
        return sum(self._lost(p, self.zc[p], self.lp[p], self.big_x[p]) for p in range(len(self.n)))

    def objective(self) -> float:
        return self.time() + self.lost()


def greedy(s: SyncState, fits: Sequence[int], inc: Sequence[int]) -> None:
    """Place every group of ``s``; ``fits[p]``: most groups peer ``p`` may hold here.

    Raises:
        PlanError: the peers' room here is smaller than the group count.
    """
    cost, pc, n = s.cost, s.pc, s.n
    c, base, hold, coord, w, extra = cost.c, cost.base, cost.hold, cost.coord, s.w, cost.extra
    sync_cpu = cost.sync_cpu
    m = total = ext = 0.0          # loss-free time, expected time, sum of the extras
    cb = hs = 0.0                  # the coordinator's compute, its stack CPU for the workers
    order = sorted(range(len(pc)), key=lambda g: (-s.stake[g], -pc[g], g))
    for g in order:
        best, bd, bb = -1, 0.0, 0.0
        for p in range(len(n)):
            k = n[p] + 1
            if k > fits[p]:
                continue
            b = c[p] * w * k + base[p]
            t_old = s.t[p]
            e_old = extra(p, *t_old, m) if t_old[1] or t_old[2] else 0.0
            over, dq = s.change({p: ((g,), ())})
            if best >= 0:                        # prune: losses add time, a higher M may hide others'
                low = (b - m - ext if b > m else -e_old) + dq
                if low > bd + _TIE_S:
                    continue
            tp = over[p]
            if coord[p]:
                cpu = b + hs + (sync_cpu if hs else 0.0)
            else:
                held = hs + (hold[p] if not n[p] else 0.0)
                cpu = cb + held + (sync_cpu if held else 0.0)
            # M unchanged: O(1)
            new = total - e_old + extra(p, *tp, m) if b <= m and cpu <= m else s.time(over)
            d = new - total + dq
            if best < 0 or d < bd - _TIE_S:
                best, bd, bb = p, d, b
            elif d <= bd + _TIE_S:
                mine, theirs = p != inc[g], best != inc[g]
                if mine < theirs or (mine == theirs and b < bb):
                    best, bd, bb = p, d, b
        if best < 0:
            raise PlanError("no peer has memory left for a group", "raise memory budgets or add peers")
        s.put(g, best)
        m = cost.loss_free(s.t)
        total = s.time()
        ext = total - m
        cb = sum(t[0] for p, t in enumerate(s.t) if coord[p])
        hs = sum(t[3] for t in s.t)
    _deal(s, inc)


def _deal(s: SyncState, inc: Sequence[int]) -> None:
    """Keep the greedy's group counts, re-deal the groups: highest stake to the most reliable peer.

    The rearrangement inequality makes this optimal when a group's cost on a peer is its stake
    times the peer's loss probability; kept only if the exact objective does not get worse.
    """
    if any(v >= 0 for v in inc):
        return                                 # re-plans keep the greedy's owner-preserving ties
    q = s.cost.q
    before, old = s.objective(), list(s.where)
    peers = sorted((p for p in range(len(s.n)) if s.n[p]), key=lambda p: (q[p], p))
    slots = [p for p in peers for _ in range(s.n[p])]
    for g, p in zip(sorted(range(len(s.pc)), key=lambda g: (-s.stake[g], -s.pc[g], g)), slots, strict=True):
        s.put(g, p)
    if s.objective() > before:
        for g, p in enumerate(old):
            s.put(g, p)


def improve(s: SyncState, fits: Sequence[int], inc: Sequence[int], rounds: int) -> None:
    """Local improvement of one sync point; ``fits[p]``: most groups ``p`` may hold here.

    Each round moves the best group off the bottleneck peer (if that helps), then sweeps the
    peer pairs once, applying every improving swap at once (first improvement). Every candidate
    is scored exactly (:meth:`SyncState.change`: one answer per worker makes a group's lost
    importance depend on the other groups of its peer).
    """
    q, pc, x = s.cost.q, s.pc, s.x
    n_peers = len(s.n)
    on: list[list[int]] = [[] for _ in range(n_peers)]
    for g, p in enumerate(s.where):
        on[p].append(g)
    ends: dict[int, tuple[int, int, int, int]] = {}      # peer -> most/least critical, most/least stake

    def extremes(p: int) -> tuple[int, int, int, int]:
        if p not in ends:
            gs = on[p]
            ends[p] = (max(gs, key=lambda g: (pc[g], -g)), min(gs, key=lambda g: (pc[g], g)),
                       max(gs, key=lambda g: (x[g], -g)), min(gs, key=lambda g: (x[g], g)))
        return ends[p]

    def move(g: int, t: int) -> None:
        p = s.where[g]
        on[p].remove(g)
        on[t].append(g)
        ends.pop(p, None)
        ends.pop(t, None)
        s.put(g, t)

    reliable = sorted(range(n_peers), key=lambda p: (q[p], p))
    for _ in range(rounds):
        changed = False
        now = s.time()
        bott = max(range(n_peers), key=lambda p: (s.t[p][0], -p))
        cands = sorted({extremes(bott)[0], extremes(bott)[1]}) if on[bott] else []
        best: tuple[float, int, int] | None = None
        for t in range(n_peers):           # move off the bottleneck
            if t == bott or s.n[t] >= fits[t]:
                continue
            for g in cands:
                over, dq = s.change({bott: ((), (g,)), t: ((g,), ())})
                delta = s.time(over) - now + dq
                if delta < -_EPS_S and (best is None or (delta, g) < best[:2]):
                    best = (delta, g, t)
        if best is not None:
            move(best[1], best[2])
            changed = True
            now = s.time()
        for p in reversed(reliable):        # swaps: stakes toward the more reliable peer
            for t in reliable:
                if q[t] >= q[p]:
                    break
                if not on[p] or not on[t]:
                    continue
                hp, ht = extremes(p), extremes(t)
                for g, h in ((hp[0], ht[1]), (hp[2], ht[3])):
                    if pc[g] <= pc[h] and x[g] <= x[h]:
                        continue
                    over, dq = s.change({p: ((h,), (g,)), t: ((g,), (h,))})
                    if s.time(over) - now + dq < -_EPS_S:
                        move(g, t)
                        move(h, p)
                        changed = True
                        now = s.time()
                        break
        if not changed:
            break
    if any(v >= 0 for v in inc):
        _stabilize(s, fits, inc)


def _stabilize(s: SyncState, fits: Sequence[int], inc: Sequence[int]) -> None:
    """Return groups to their current owner where that costs nothing (fewer moves on re-plans).

    A group goes home by a move if its owner has room, else by a swap with a group there that
    is not at home either.
    """
    for g in range(len(s.where)):
        home, p = inc[g], s.where[g]
        if home < 0 or home == p:
            continue
        now = s.objective()
        if s.n[home] < fits[home]:
            over, dq = s.change({p: ((), (g,)), home: ((g,), ())})
            if s.time(over) + s.lost() + dq - now <= _TIE_S:
                s.put(g, home)
                continue
        for h in sorted((h for h, w in enumerate(s.where) if w == home and inc[h] != home),
                        key=lambda h: (inc[h] != p, h)):
            over, dq = s.change({p: ((h,), (g,)), home: ((g,), (h,))})
            if s.time(over) + s.lost() + dq - now <= _TIE_S:
                s.put(h, p)
                s.put(g, home)
                break
