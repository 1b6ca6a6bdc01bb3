"""The whole-model search: memory allocation over the sync points, then per-sync-point placement.

Memory couples the sync points: a peer's budget is shared by all layers. Two rules split it:

* **Coordinator memory** is the valuable kind: a sync point whose groups all sit on the
  coordinator costs no round trip at all. It is allocated by a multiple-choice knapsack
  (greedy on the lower convex hull of each part's cost curve, as in the LP relaxation of
  Sinha & Zoltners 1979): for each part, ``C(k)`` = objective of a representative sync point
  (the layers' statistics sorted and averaged) when the coordinator may hold at most ``k`` of
  its groups; the hull segments with the best seconds saved per byte are granted first, layer
  by layer, until the coordinator's room is spent.
* **Worker memory** is paced: by the end of sync point ``s`` a worker may hold at most
  ``room * (model bytes up to s) / (model bytes)`` plus one group, so a small budget spreads
  over all layers; when the paced room at a sync point is too small, the hard room is used.

Then each sync point is placed by :mod:`halo_p2p.scheduler.greedy` with actual statistics, and
the result is scored by :func:`~halo_p2p.scheduler.cost.evaluate_plan`. Leftover coordinator
room (knapsack granularity) may be used by any sync point as long as later reservations hold.
A re-plan passes the running plan as ``incumbent`` (ties keep groups where they are);
:func:`moved_groups` counts how many groups a re-plan moves.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from halo_p2p.errors import ConfigError, PlanError
from halo_p2p.groups import PARTS, GroupId, GroupLayout
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler.cost import CostModel, evaluate_plan
from halo_p2p.scheduler.greedy import SyncState, greedy, improve
from halo_p2p.scheduler.model import GroupStats, PeerModel, Schedule, SchedulerConfig

__all__ = ["moved_groups", "order_peers", "schedule", "schedule_for_layout"]

log = logging.getLogger(__name__)

_CURVE_POINTS = 8   # coordinator caps tried per part for the cost curve (plus 0 and n)


def order_peers(peers: Iterable[PeerModel]) -> list[PeerModel]:
    """The schedule's peer order: the coordinator, then the workers sorted by id.

    Raises:
        ConfigError: no peers, a repeated id, or not exactly one coordinator.
    """
    peers = list(peers)
    if not peers:
        raise ConfigError("no peers to schedule on", "pass at least the coordinator")
    ids = [p.peer_id for p in peers]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"peer id repeated in {ids}", "describe each peer once")
    coords = [p for p in peers if p.is_coordinator]
    if len(coords) != 1:
        raise ConfigError(f"{len(coords)} peers are marked is_coordinator", "mark exactly one coordinator")
    return coords + sorted((p for p in peers if not p.is_coordinator), key=lambda p: p.peer_id)


def _rooms(peers: list[PeerModel], config: SchedulerConfig, total: int) -> list[int]:
    """Bytes each peer may fill with groups (capped at the model size).

    Raises:
        PlanError: the coordinator's budget is below its fixed bytes, or the budgets cannot hold
            the model.
    """
    rooms = []
    for p in peers:
        room = p.memory_budget_bytes - (config.coordinator_fixed_bytes if p.is_coordinator else 0)
        if room < 0:
            raise PlanError(f"coordinator {p.peer_id!r} has a memory budget of {p.memory_budget_bytes} B, "
                            f"below the {config.coordinator_fixed_bytes} B of its embeddings and classifier",
                            "raise the coordinator's memory budget or start it on a larger device")
        rooms.append(min(room, total))
    if sum(rooms) < total:
        raise PlanError(f"the peers' memory budgets hold {sum(rooms) / 2**20:.1f} MiB of groups, the model "
                        f"needs {total / 2**20:.1f} MiB", "add peers, raise memory budgets, or use float16 "
                        "weights (bytes_per_param=2)")
    return rooms


def _representative(stats: GroupStats, part: int) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's groups sorted by stake (``p_critical * importance``), averaged over layers."""
    pc, imp = stats.p_critical[part], stats.importance[part]
    order = np.argsort(-(pc * imp), axis=1, kind="stable")
    return (np.take_along_axis(pc, order, axis=1).mean(axis=0),
            np.take_along_axis(imp, order, axis=1).mean(axis=0))


def _coordinator_caps(cost: CostModel, stats: GroupStats, rooms: list[int], total: int,
                      lam: float) -> list[list[int]]:
    """Most groups the coordinator may hold per (layer, part): the knapsack over cost curves.

    Raises:
        PlanError: the workers' rooms cannot take what the coordinator cannot hold.
    """
    layout, n_layers = cost.layout, cost.layout.n_layers
    curves, kmin, kfree = {}, {}, {}
    for part in PARTS:
        n = layout.n_groups(part)
        caps_w = [min(n, int(r * n / total) + 1) for r in rooms[1:]]
        pc, imp = _representative(stats, part)
        step = max(1, math.ceil(n / _CURVE_POINTS))
        ks = sorted({*range(0, n + 1, step), n})
        points: list[tuple[int, float, int]] = []
        for k in ks:
            if k + sum(caps_w) < n:
                continue
            s = SyncState(cost, part, pc, imp, lam)
            greedy(s, [k, *caps_w], [-1] * n)
            value = s.objective()
            if points and value >= points[-1][1]:
                continue                      # more room never has to cost more: keep the better
            points.append((k, value, s.n[0]))
        if not points:
            raise PlanError(f"the workers' memory cannot take the {'attention' if part == 0 else 'MLP'} groups the "
                            "coordinator cannot hold", "raise memory budgets or add peers")
        kmin[part], kfree[part] = points[0][0], points[-1][2]
        curves[part] = _lower_hull(points)
    room0 = rooms[0]
    caps = [[kfree[part] for part in PARTS] for _ in range(n_layers)]
    if n_layers * sum(kfree[part] * cost.mem[part] for part in PARTS) <= room0:
        return caps                           # the coordinator holds all it wants
    left = room0 - n_layers * sum(kmin[part] * cost.mem[part] for part in PARTS)
    if left < 0:
        raise PlanError("the workers' memory cannot take the groups the coordinator cannot hold",
                        "raise memory budgets or add peers")
    caps = [[kmin[part] for part in PARTS] for _ in range(n_layers)]
    segments = sorted(((saved / ((k1 - k0) * cost.mem[part]), part, k0, k1)
                       for part in PARTS for (k0, k1, saved) in curves[part]), key=lambda t: (-t[0], t[1], t[2]))
    stuck: set[int] = set()
    for _, part, k0, k1 in segments:
        if part in stuck:
            continue
        need = (k1 - k0) * cost.mem[part]
        for layer in range(n_layers):
            if caps[layer][part] == k0 and left >= need:
                caps[layer][part] = k1
                left -= need
        if any(caps[layer][part] == k0 for layer in range(n_layers)):
            stuck.add(part)                   # later segments of this part start where not all layers are
    return caps


def _lower_hull(points: list[tuple[int, float, int]]) -> list[tuple[int, int, float]]:
    """Segments ``(k0, k1, seconds saved)`` of the lower convex hull of a decreasing cost curve."""
    hull: list[tuple[int, float]] = []
    for k, value, _ in points:
        while len(hull) >= 2:
            (k0, v0), (k1, v1) = hull[-2], hull[-1]
            if (v0 - v1) * (k - k1) <= (v1 - value) * (k1 - k0):   # hull[-1] is not on the hull
                hull.pop()
            else:
                break
        hull.append((k, value))
    return [(k0, k1, v0 - v1) for (k0, v0), (k1, v1) in itertools.pairwise(hull)]


def moved_groups(old: PlacementPlan, new: PlacementPlan) -> int:
    """Number of groups whose owner differs between ``old`` and ``new``.

    Raises:
        PlanError: the plans are for different layouts.
    """
    if old.layout != new.layout:
        raise PlanError("cannot compare plans of different model layouts", "compare plans of one model")
    return sum(1 for g, p in new.owner.items() if old.owner[g] != p)


def schedule(layout: GroupLayout, peers: Iterable[PeerModel], stats: GroupStats | None = None,
             config: SchedulerConfig | None = None, *, incumbent: PlacementPlan | None = None) -> Schedule:
    """Place every group of ``layout`` on ``peers`` minimizing the expected objective.

    Args:
        layout: the model's groups.
        peers: the peers (exactly one ``is_coordinator``); any number from 1.
        stats: group statistics (default :meth:`GroupStats.default`).
        config: cost-model and search settings.
        incumbent: the plan currently running: ties go to its owners (fewer groups move).

    Returns:
        The :class:`~halo_p2p.scheduler.model.Schedule`, scored by
        :func:`~halo_p2p.scheduler.cost.evaluate_plan`.

    Raises:
        ConfigError: bad peers or statistics.
        PlanError: the memory budgets cannot hold the model (the message names the fix).
    """
    config = config or SchedulerConfig()
    stats = stats or GroupStats.default(layout)
    stats.check(layout)
    ordered = order_peers(peers)
    cost = CostModel(layout, ordered, config)
    n_g = [layout.n_groups(part) for part in PARTS]
    total = layout.n_layers * sum(n * m for n, m in zip(n_g, cost.mem, strict=True))
    rooms = _rooms(ordered, config, total)
    total_imp = sum(float(stats.importance[part].sum()) for part in PARTS)
    lam = config.quality_weight_s / total_imp if total_imp > 0 else 0.0
    caps0 = _coordinator_caps(cost, stats, rooms, total, lam)
    reserved = sum(caps0[layer][part] * cost.mem[part] for layer in range(layout.n_layers) for part in PARTS)
    index = {p.peer_id: i for i, p in enumerate(ordered)}
    same = incumbent is not None and incumbent.layout == layout
    used = [0] * len(ordered)
    owner: dict[GroupId, str] = {}
    memo: dict[tuple[Any, ...], list[int]] = {}
    done, slack = 0, max(cost.mem)
    for layer in range(layout.n_layers):
        for part in PARTS:
            gm, n = cost.mem[part], n_g[part]
            done += n * gm
            reserved -= caps0[layer][part] * gm
            hard = [min(n, (r - u) // gm) for r, u in zip(rooms, used, strict=True)]
            fits = [max(0, min(hard[0], (rooms[0] - used[0] - reserved) // gm))]
            fits += [min(h, max(0, int((r * done / total + slack - u) // gm)))
                     for h, r, u in zip(hard[1:], rooms[1:], used[1:], strict=True)]
            if sum(fits) < n:
                fits = [fits[0], *hard[1:]]
            if sum(fits) < n:
                fits = hard
            if sum(hard) < n:
                raise PlanError(f"no room left for the groups of layer {layer} (the memory budgets are within a "
                                "few groups of the model size)", "raise a memory budget or add a peer")
            # mypy: same is False when incumbent is None
            inc = [index.get(incumbent.owner[GroupId(layer, part, g)], -1) if same else -1  # type: ignore[union-attr]
                   for g in range(n)]
            pc, imp = stats.p_critical[part][layer], stats.importance[part][layer]
            key = (part, pc.tobytes(), imp.tobytes(), tuple(fits), tuple(inc))
            where = memo.get(key)
            if where is None:
                s = SyncState(cost, part, pc, imp, lam)
                greedy(s, fits, inc)
                improve(s, fits, inc, config.improve_rounds)
                where = memo[key] = s.where
            for g, p in enumerate(where):
                owner[GroupId(layer, part, g)] = ordered[p].peer_id
                used[p] += gm
    plan = PlacementPlan(layout, ordered[0].peer_id, tuple(p.peer_id for p in ordered), owner)
    result = evaluate_plan(plan, ordered, stats, config)
    log.debug("scheduled %d groups on %d peers: TPOT %.2f ms, lost importance %.4f", len(owner), len(ordered),
              1e3 * result.expected_tpot_s, result.expected_lost_importance)
    return result


def schedule_for_layout(layout: GroupLayout, peers: Iterable[PeerModel], *, stats: GroupStats | None = None,
                        bytes_per_param: float = 4.0, coordinator_fixed_bytes: int = 0,
                        incumbent: PlacementPlan | None = None, **config: Any) -> Schedule:
    """:func:`schedule` with the common settings as keywords (others: :class:`SchedulerConfig` fields).

    Raises:
        ConfigError, PlanError: as :func:`schedule`; ConfigError also for unknown settings.
    """
    try:
        cfg = SchedulerConfig(bytes_per_param=bytes_per_param, coordinator_fixed_bytes=coordinator_fixed_bytes,
                              **config)
    except TypeError as exc:
        raise ConfigError(f"unknown scheduler setting ({exc})", "use SchedulerConfig's field names") from None
    return schedule(layout, peers, stats, cfg, incumbent=incumbent)
