"""One way to build a split-model session: used by the emulated swarm, the real swarm and the CLI.

:func:`coordinator_factory` prepares once what every session of a split model shares (the trunk,
the MLP group scores, the criticality policy, the scheduler's group statistics, the per-token
takeover) and returns the :data:`~halo_p2p.session.replan.CoordinatorFactory` that plans the
peers left (``schedule`` or ``split``) and starts a
:class:`~halo_p2p.session.coordinator.Coordinator` over their links. :func:`open_split_session`
wraps it into a started :class:`~halo_p2p.session.replan.SplitEngine`.

What the planner knows of each peer: its announcement (compute rate, memory budget; a
:class:`~halo_p2p.discovery.base.PeerInfo`) and its link to the coordinator: the link's measured
heartbeat stats, or, for an emulated link, its known :class:`~halo_p2p.net.link.LinkConditions`
(a memory link measures nothing). The node layer (:mod:`halo_p2p.node.swarm`) finds and dials
the peers; this module does no I/O besides computing on the coordinator's compute thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

from halo_p2p.engine.compute import ComputeThread
from halo_p2p.errors import ConfigError
from halo_p2p.groups import PARTS, GroupLayout
from halo_p2p.model.shard import TAKEOVER_BUDGET_BYTES, GroupShard, MlpTakeover, SliceWeights, Trunk, mlp_group_scores
from halo_p2p.model.source import TensorSource
from halo_p2p.net.link import Link, LinkConditions, LinkStats
from halo_p2p.plan import PlacementPlan
from halo_p2p.predictor import Predictor, PredictorPolicy
from halo_p2p.scheduler import GroupStats, peer_models_from, schedule_for_layout
from halo_p2p.session.coordinator import UNSTABLE_PLR, Coordinator, SessionOptions
from halo_p2p.session.criticality import AllCritical, CriticalityPolicy, StaticRule
from halo_p2p.session.replan import Closeable, CoordinatorFactory, PeerHost, Rejoin, SplitEngine, release

__all__ = [
    "DEADLINE_FLOOR_S",
    "Critical",
    "PeerRecord",
    "Planner",
    "SessionSetup",
    "coordinator_factory",
    "open_split_session",
]

log = logging.getLogger(__name__)

DEADLINE_FLOOR_S = 0.02
"""Smallest initial per-worker deadline taken from the scheduler's estimate (seconds); the
deadline starts at twice the estimate until response times are measured."""


class _Choice(enum.StrEnum):
    @classmethod
    def of(cls, value: str) -> Self:
        """The member spelled ``value`` (e.g. a CLI flag's value).

        Raises:
            ConfigError: no member is spelled so.
        """
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{cls.__name__.lower()} {value!r} is unknown",
                              f"use one of {', '.join(cls)}") from None


class Planner(_Choice):
    """How groups are placed on the peers (``--planner``)."""

    SCHEDULE = "schedule"
    """The load-balancing scheduler (:mod:`halo_p2p.scheduler`): compute rates, memory budgets,
    links, criticality statistics."""
    SPLIT = "split"
    """Contiguous groups by share: the given shares, else the peers' compute rates."""


class Critical(_Choice):
    """Which groups the coordinator must wait for in ``halo`` decode steps."""

    STATIC = "static"
    """Attention groups and the top MLP groups by weight score
    (:class:`~halo_p2p.session.criticality.StaticRule`)."""
    ALL = "all"
    """Every group (:class:`~halo_p2p.session.criticality.AllCritical`)."""
    PREDICTOR = "predictor"
    """The semantic-aware predictor's top groups per token
    (:class:`~halo_p2p.predictor.PredictorPolicy`); :attr:`STATIC` when no predictor is given."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSetup:
    """How a split-model session is planned (besides :class:`SessionOptions`).

    Attributes:
        planner: :class:`Planner` (a plain string of a value is converted, see :meth:`Planner.of`).
        critical: :class:`Critical` (likewise).
        critical_fraction: share of MLP groups that are critical (static rule, predictor), in
            ``[0, 1]``.
        mlp_group_size: neurons per MLP group (default: the layout's, 24 groups per layer where
            possible).
        dynamic_placement: ``halo`` only: the coordinator computes a decode step's critical MLP
            groups of peers whose links are lossy itself
            (:class:`~halo_p2p.model.shard.MlpTakeover`).
        takeover_budget_bytes: resident bytes for taken-over groups.

    Raises:
        ConfigError: an unknown planner or criticality, or a fraction outside ``[0, 1]``.
    """

    planner: Planner = Planner.SCHEDULE
    critical: Critical = Critical.STATIC
    critical_fraction: float = 0.5
    mlp_group_size: int | None = None
    dynamic_placement: bool = False
    takeover_budget_bytes: int = TAKEOVER_BUDGET_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "planner", Planner.of(self.planner))
        object.__setattr__(self, "critical", Critical.of(self.critical))
        if not 0 <= self.critical_fraction <= 1:
            raise ConfigError(f"critical fraction {self.critical_fraction} is outside [0, 1]",
                              "use e.g. --critical-fraction 0.5")


class PeerRecord(Protocol):
    """What the planner reads of a peer's announcement (a
    :class:`~halo_p2p.discovery.base.PeerInfo` is one)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def compute_gflops(self) -> float:
        """GFLOP/s, ``>= 0`` (0: not measured)."""
        ...

    @property
    def memory_budget_bytes(self) -> int: ...


def _known_stats(conditions: LinkConditions) -> LinkStats:
    """What heartbeats would measure on an emulated link: RTT twice the one-way delay."""
    return LinkStats(rtt_ms=2000 * conditions.delay_s, jitter_ms=1000 * conditions.jitter_s,
                     measured_plr=conditions.plr)


async def coordinator_factory(source: TensorSource, options: SessionOptions, setup: SessionSetup, *,
                              compute: ComputeThread, me: PeerRecord, peers: Mapping[str, PeerRecord],
                              links: Mapping[str, Link], model_sha256: str,
                              known_links: Mapping[str, LinkConditions] | None = None,
                              shares: Mapping[str, float] | None = None, policy: CriticalityPolicy | None = None,
                              predictor: Predictor | None = None) -> CoordinatorFactory:
    """Prepare a split model's sessions; returns the factory of started coordinators.

    Args:
        source: the model (the coordinator's trunk and groups are cut from it).
        options: sync mode, wire dtype, context length, timing.
        setup: planner and criticality.
        compute: the coordinator's compute thread.
        me: the coordinator's own announcement.
        peers: worker peer id -> announcement, in plan order (a ``split`` plan gives contiguous
            groups in this order).
        links: worker peer id -> link to it (every key of ``peers``); the factory plans over the
            links it is given each time (a worker dialed again has a new one).
        model_sha256: names the model to the workers.
        known_links: worker peer id -> known conditions of its link (emulated links), used
            instead of the link's measured stats.
        shares: peer id -> relative share for the ``split`` planner (coordinator included);
            default: the peers' compute rates.
        policy: a criticality policy replacing ``setup.critical``'s (the scheduler's statistics
            still follow ``setup.critical``).
        predictor: the semantic-aware predictor of :attr:`Critical.PREDICTOR`.

    Raises:
        ConfigError: a worker without a link.
    """
    missing = [p for p in peers if p not in links]
    if missing:
        raise ConfigError(f"no link to peer(s) {', '.join(missing)}", "dial every peer before planning")
    known = dict(known_links or {})
    layout = GroupLayout.from_config(source.config, setup.mlp_group_size)
    trunk = await compute.run(Trunk, source)
    critical = setup.critical
    if critical is Critical.PREDICTOR and predictor is None:
        critical = Critical.STATIC
    scores = await compute.run(mlp_group_scores, source, layout) if critical is Critical.STATIC else None
    fraction = setup.critical_fraction
    criticality: CriticalityPolicy
    if policy is not None:
        criticality = policy
    elif critical is Critical.PREDICTOR:
        assert predictor is not None
        criticality = PredictorPolicy(predictor, fraction, attn_critical=1.0)
    elif scores is not None:
        criticality = StaticRule(scores, layout.n_attn, fraction)
    else:
        criticality = AllCritical({p: layout.n_groups(p) for p in PARTS})
    stats = GroupStats.from_mlp_scores(layout, scores, fraction) if scores is not None \
        else GroupStats.default(layout, fraction)
    weights = SliceWeights(source, layout)
    takeover = (MlpTakeover(SliceWeights(source, layout), budget_bytes=setup.takeover_budget_bytes)
                if setup.dynamic_placement and options.mode == "halo" else None)
    unstable = frozenset(p for p, c in known.items() if c.plr > UNSTABLE_PLR)

    def link_stats(peer: str, now: Mapping[str, Link]) -> LinkStats:
        return _known_stats(known[peer]) if peer in known else now[peer].stats

    async def plan_for(alive: list[str], now: Mapping[str, Link]) -> tuple[PlacementPlan, dict[str, float] | None]:
        if setup.planner is Planner.SCHEDULE:
            models = peer_models_from([me, *(peers[p] for p in alive)], {p: link_stats(p, now) for p in alive},
                                      coordinator=me.peer_id)
            sched = await asyncio.to_thread(schedule_for_layout, layout, models, stats=stats,
                                            coordinator_fixed_bytes=trunk.weight_bytes())
            log.info("scheduled: expected TPOT %.1f ms", 1000 * sched.expected_tpot_s)
            return sched.plan, {p: max(DEADLINE_FLOOR_S, 2 * d) for p, d in sched.deadline_s.items()}
        rates = [me.compute_gflops, *(max(peers[p].compute_gflops, 0.1) for p in alive)]
        names = [me.peer_id, *alive]
        weights_of = rates if shares is None else [shares[n] for n in names]
        return PlacementPlan.split(layout, names, coordinator=me.peer_id, shares=weights_of), None

    async def factory(lost: frozenset[str], session: int, now: Mapping[str, Link]) -> Coordinator:
        alive = [p for p in peers if p not in lost and not now[p].closed]
        plan, deadlines = await plan_for(alive, now)
        own = plan.groups_of(me.peer_id)
        local = await compute.run(GroupShard, weights, layout, own, max_seq_len=options.max_seq_len) if own else None
        coordinator = Coordinator(trunk=trunk, local=local, compute=compute, links={p: now[p] for p in alive},
                                  plan=plan, options=options, criticality=criticality, model_sha256=model_sha256,
                                  session=session, weights=weights, initial_deadlines=deadlines, takeover=takeover,
                                  unstable=unstable)
        try:
            await coordinator.start()
        except BaseException:
            await coordinator.aclose()
            raise
        log.info("session %d over %d peers: %s", session, len(alive) + 1, ", ".join(alive))
        return coordinator

    return factory


async def open_split_session(source: TensorSource, options: SessionOptions, setup: SessionSetup, *,
                             compute: ComputeThread, me: PeerRecord, peers: Mapping[str, PeerRecord],
                             links: Mapping[str, Link], model_sha256: str,
                             known_links: Mapping[str, LinkConditions] | None = None,
                             shares: Mapping[str, float] | None = None, policy: CriticalityPolicy | None = None,
                             predictor: Predictor | None = None, node: Closeable | None = None,
                             members: Sequence[PeerHost] = (), rejoin: Rejoin | None = None) -> SplitEngine:
    """:func:`coordinator_factory`, then a started :class:`SplitEngine` owning ``links``, ``node``
    and ``members`` (closed on failure too); ``rejoin`` dials a lost worker again (see
    :class:`SplitEngine`).

    Raises:
        PeerLost: every re-plan left out more workers than ``SplitEngine.max_replans`` allows.
        TransportError: workers did not load their groups in time.
        HaloError: anything :func:`coordinator_factory` raises.
    """
    engine: SplitEngine | None = None
    try:
        factory = await coordinator_factory(source, options, setup, compute=compute, me=me, peers=peers, links=links,
                                            model_sha256=model_sha256, known_links=known_links, shares=shares,
                                            policy=policy, predictor=predictor)
        engine = SplitEngine(factory, links=links, node=node, members=members, rejoin=rejoin,
                             silence_s=options.peer_silence_s)
        await engine.start()
    except BaseException:
        await (engine.aclose() if engine is not None else release(links, node, members))
        raise
    return engine
