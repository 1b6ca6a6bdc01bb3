"""Re-planning with hysteresis: a new placement only when it is needed or clearly better.

Re-planning is not free: workers load other rows of the weights and the session restarts
(the coordinator replays the context). :class:`Replanner` therefore keeps the current schedule
and replaces it only when

* a peer of the plan left, the coordinator changed, or the plan no longer fits a peer's memory
  budget (the plan cannot go on: always re-planned), or
* something moved beyond a threshold since the current plan was made (a peer joined; a link's
  PLR, RTT or jitter; a peer's compute rate or budget; see :class:`ReplanPolicy`) **and** the new
  plan's objective beats the current plan's, both scored by the same model under the new
  conditions, by more than ``min_gain``.

The new plan is searched with the current one as incumbent (ties keep groups where they are);
:func:`moved_groups` counts how many groups a re-plan moves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from halo_p2p.errors import ConfigError, PlanError
from halo_p2p.groups import GroupLayout
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler.cost import evaluate_plan
from halo_p2p.scheduler.model import GroupStats, PeerModel, Schedule, SchedulerConfig
from halo_p2p.scheduler.search import schedule

__all__ = ["ReplanPolicy", "Replanner", "moved_groups"]

log = logging.getLogger(__name__)


def moved_groups(old: PlacementPlan, new: PlacementPlan) -> int:
    """Number of groups whose owner differs between ``old`` and ``new``.

    Raises:
        PlanError: the plans are for different layouts.
    """
    if old.layout != new.layout:
        raise PlanError("cannot compare plans of different model layouts", "compare plans of one model")
    return sum(1 for g, p in new.owner.items() if old.owner[g] != p)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplanPolicy:
    """Thresholds of :class:`Replanner` (changes measured against the current plan's conditions).

    Attributes:
        plr_delta: absolute PLR change of a link that counts (0.02 = 2 points).
        rtt_rel, rtt_abs_ms: an RTT or jitter change counts if it exceeds both ``rtt_rel`` of
            the old value and ``rtt_abs_ms`` milliseconds.
        rate_rel: relative change of a peer's compute time or memory budget that counts.
        min_gain: a triggered re-plan is adopted only if it lowers the objective by more than
            this fraction (0.10 = 10 %).
    """

    plr_delta: float = 0.02
    rtt_rel: float = 0.5
    rtt_abs_ms: float = 1.0
    rate_rel: float = 0.25
    min_gain: float = 0.10

    def __post_init__(self) -> None:
        for name in ("plr_delta", "rtt_rel", "rtt_abs_ms", "rate_rel", "min_gain"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigError(f"ReplanPolicy.{name} = {value!r} is invalid", "use a finite number >= 0")

    def changed(self, old: PeerModel, new: PeerModel) -> str | None:
        """What moved beyond a threshold between two models of one peer, or ``None``."""
        if abs(new.plr - old.plr) > self.plr_delta:
            return f"PLR {old.plr:.3f} -> {new.plr:.3f}"
        for name in ("rtt_ms", "jitter_ms"):
            a, b = getattr(old, name), getattr(new, name)
            if abs(b - a) > max(self.rtt_abs_ms, self.rtt_rel * a):
                return f"{name} {a:.1f} -> {b:.1f}"
        for name in ("seconds_per_gparam", "memory_budget_bytes"):
            a, b = getattr(old, name), getattr(new, name)
            if abs(b - a) > self.rate_rel * a:
                return f"{name} {a:.3g} -> {b:.3g}"
        return None


class Replanner:
    """Holds the current schedule and decides when a new one is worth it.

    Args:
        layout: the model's groups.
        peers: the peers at the start.
        stats: group statistics (default :meth:`GroupStats.default`).
        config: cost-model settings.
        policy: re-planning thresholds.

    Raises:
        ConfigError, PlanError: as :func:`~halo_p2p.scheduler.greedy.schedule`.
    """

    def __init__(self, layout: GroupLayout, peers: Iterable[PeerModel], stats: GroupStats | None = None,
                 config: SchedulerConfig | None = None, policy: ReplanPolicy | None = None) -> None:
        self.layout = layout
        self.stats = stats or GroupStats.default(layout)
        self.config = config or SchedulerConfig()
        self.policy = policy or ReplanPolicy()
        peers = list(peers)
        self.schedule = schedule(layout, peers, self.stats, self.config)
        self._ref = {p.peer_id: p for p in peers}
        self.last_reason: str | None = "initial"
        self.last_moved = 0

    def _must(self, peers: dict[str, PeerModel]) -> str | None:
        plan = self.schedule.plan
        gone = [p for p in plan.peers if p not in peers]
        if gone:
            return f"peer(s) {', '.join(gone)} left"
        coords = [p for p, m in peers.items() if m.is_coordinator]
        if coords != [plan.coordinator]:
            return f"coordinator is now {coords}"
        return None

    def _trigger(self, peers: dict[str, PeerModel]) -> str | None:
        joined = [p for p in peers if p not in self._ref]
        if joined:
            return f"peer(s) {', '.join(sorted(joined))} joined"
        for pid, model in peers.items():
            why = self.policy.changed(self._ref[pid], model)
            if why:
                return f"{pid}: {why}"
        return None

    def update(self, peers: Iterable[PeerModel], stats: GroupStats | None = None, *,
               force: bool = False) -> Schedule | None:
        """Re-plan if needed or clearly better; return the new schedule, or ``None`` to keep it.

        Args:
            peers: the peers now, with fresh measurements.
            stats: new group statistics (kept for later calls; they trigger nothing by themselves).
            force: re-plan as if a threshold were crossed (still subject to ``min_gain``).

        Raises:
            ConfigError, PlanError: as :func:`~halo_p2p.scheduler.greedy.schedule` (e.g. the
                remaining peers cannot hold the model).
        """
        if stats is not None:
            stats.check(self.layout)
            self.stats = stats
        now = {p.peer_id: p for p in peers}
        reason = self._must(now)
        current = None
        if reason is None:
            current = evaluate_plan(self.schedule.plan, now.values(), self.stats, self.config)
            over = current.over_budget()
            if over:
                reason = f"plan exceeds the memory budget of {', '.join(over)}"
        trigger = reason or self._trigger(now) or ("forced" if force else None)
        if trigger is None:
            return None
        new = schedule(self.layout, now.values(), self.stats, self.config, incumbent=self.schedule.plan)
        moved = moved_groups(self.schedule.plan, new.plan)
        if reason is None and current is not None:
            gain = (current.objective - new.objective) / current.objective if current.objective > 0 else 0.0
            if gain <= self.policy.min_gain:
                log.debug("re-plan for %s not adopted: objective %.2f -> %.2f ms (%.1f %% <= %.1f %%)", trigger,
                          1e3 * current.objective, 1e3 * new.objective, 100 * gain, 100 * self.policy.min_gain)
                return None
        log.info("re-planned (%s): %d groups move, expected TPOT %.1f ms", trigger, moved,
                 1e3 * new.expected_tpot_s)
        self.schedule, self._ref = new, now
        self.last_reason, self.last_moved = trigger, moved
        return new
