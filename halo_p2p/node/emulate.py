"""An emulated swarm in one process: a coordinator and workers joined by in-memory lossy links.

Every peer gets its own compute thread (with an optional slowdown factor) and its own shard of
the model, loaded from the same file; each worker's link to the coordinator has its own PLR,
one-way delay and jitter (:class:`~halo_p2p.net.link.LinkConditions`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from halo_p2p.engine.compute import ComputeThread
from halo_p2p.engine.probe import measure_gflops
from halo_p2p.groups import PARTS, GroupLayout
from halo_p2p.model.shard import TAKEOVER_BUDGET_BYTES, GroupShard, MlpTakeover, SliceWeights, Trunk, mlp_group_scores
from halo_p2p.model.source import TensorSource
from halo_p2p.net.link import Link, LinkConditions
from halo_p2p.net.memory import memory_link_pair
from halo_p2p.plan import PlacementPlan, PlanBody
from halo_p2p.scheduler import UNLIMITED_BYTES, GroupStats, PeerModel, schedule_for_layout
from halo_p2p.session.coordinator import UNSTABLE_PLR, Coordinator, SessionOptions
from halo_p2p.session.criticality import AllCritical, CriticalityPolicy, StaticRule
from halo_p2p.session.replan import ReplanningEngine, ReplanningFacade
from halo_p2p.session.worker import ShardFactory, Worker

__all__ = ["EmulatedSwarm", "PeerProfile", "start_emulated_swarm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerProfile:
    """One emulated peer.

    Attributes:
        name: peer id.
        share: relative share of the neuron groups (uneven shares allowed; 0 holds none).
        slowdown: compute slowdown factor (1 = this machine's speed).
        link: conditions of its link to the coordinator, each direction (ignored for the coordinator).
        memory_budget_bytes: memory for weights (the scheduler respects it; ``None``: unlimited).
    """

    name: str
    share: float = 1.0
    slowdown: float = 1.0
    link: LinkConditions = field(default_factory=LinkConditions)
    memory_budget_bytes: int | None = None


@dataclass(slots=True)
class EmulatedSwarm(ReplanningFacade):
    """A running emulated swarm; an :class:`~halo_p2p.engine.protocol.Engine` that re-plans when
    a worker is lost (see :class:`~halo_p2p.session.replan.ReplanningEngine`)."""

    engine: ReplanningEngine
    workers: list[Worker]
    threads: list[ComputeThread]
    tasks: list[asyncio.Task[None]]
    links: dict[str, Link]

    @property
    def plan(self) -> PlacementPlan:
        return self.coordinator.plan

    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes per peer (the coordinator's includes the trunk)."""
        c = self.coordinator
        out = {c.plan.coordinator: c.trunk.weight_bytes() + (c.local.weight_bytes() if c.local else 0)}
        for w in self.workers:
            out[w.peer_id] = w.shard.weight_bytes() if w.shard else 0
        return out

    async def aclose(self) -> None:
        await self.engine.aclose()
        for link in self.links.values():
            await link.aclose()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for thread in self.threads:
            await asyncio.to_thread(thread.close)


async def start_emulated_swarm(source: TensorSource, peers: Sequence[PeerProfile], options: SessionOptions, *,
                               mlp_group_size: int | None = None, critical: str = "static",
                               critical_fraction: float = 0.5, seed: int = 0, planner: str = "split",
                               compute_gflops: float | None = None, dynamic: bool = False,
                               takeover_budget_bytes: int = TAKEOVER_BUDGET_BYTES,
                               policy: CriticalityPolicy | None = None, uplink_parity: bool = True) -> EmulatedSwarm:
    """Start ``peers`` (the first is the coordinator) and send them the plan.

    Args:
        source: the model, shared by every emulated peer.
        peers: profiles; ``peers[0]`` coordinates.
        options: session options (sync mode, wire dtype, ...).
        mlp_group_size: neurons per MLP group (default: 24 groups per layer where possible).
        critical: ``"static"`` (attention + top MLP groups by weight score) or ``"all"``.
        critical_fraction: share of MLP groups that are critical under ``"static"``.
        seed: base seed of the links' loss and jitter.
        planner: ``"split"`` (contiguous groups by ``share``) or ``"schedule"`` (the load-balancing
            scheduler of :mod:`halo_p2p.scheduler`, from each peer's compute rate, memory budget
            and link conditions).
        compute_gflops: this machine's rate for the scheduler (default: measured once).
        policy: a criticality policy to use instead of ``critical`` (e.g. the semantic-aware
            predictor's :class:`~halo_p2p.predictor.PredictorPolicy`).
        dynamic: per-token dynamic placement: the coordinator computes the critical MLP groups of
            lossy peers itself (:class:`~halo_p2p.model.shard.MlpTakeover`, within
            ``takeover_budget_bytes``).
        uplink_parity: workers follow each group's partial with an XOR parity frame
            (:class:`~halo_p2p.wire.messages.PartialParity`) on the unreliable channel.
    """
    layout = GroupLayout.from_config(source.config, mlp_group_size)
    names = [p.name for p in peers]
    shares = {p.name: p.share for p in peers}
    threads = [ComputeThread(f"halo-{p.name}", slowdown=p.slowdown) for p in peers]
    coordinator_thread = threads[0]
    trunk = await coordinator_thread.run(Trunk, source)
    criticality: CriticalityPolicy
    scores = await coordinator_thread.run(mlp_group_scores, source, layout) if critical == "static" else None
    if policy is not None:
        criticality = policy
    elif scores is not None:
        criticality = StaticRule(scores, layout.n_attn, critical_fraction)
    else:
        criticality = AllCritical({p: layout.n_groups(p) for p in PARTS})

    def open_model(sha256: str, body: PlanBody) -> tuple[GroupLayout, ShardFactory]:
        lay = GroupLayout.from_config(source.config, body.layout.mlp_group_size)
        return lay, lambda groups, max_seq_len: GroupShard(source, lay, groups, max_seq_len=max_seq_len)

    links: dict[str, Link] = {}
    workers, tasks = [], []
    for i, (profile, thread) in enumerate(zip(peers[1:], threads[1:], strict=True), start=1):
        a, b = memory_link_pair(names[0], profile.name, a_to_b=profile.link, b_to_a=profile.link, seed=seed + i)
        links[profile.name] = a
        worker = Worker(profile.name, b, open_model, thread, uplink_parity=uplink_parity)
        workers.append(worker)
        tasks.append(asyncio.create_task(worker.run(), name=f"worker-{profile.name}"))

    profiles = {p.name: p for p in peers}
    unstable = frozenset(p.name for p in peers[1:] if p.link.plr > UNSTABLE_PLR)
    takeover = MlpTakeover(SliceWeights(source, layout), budget_bytes=takeover_budget_bytes) if dynamic else None
    stats = (GroupStats.from_mlp_scores(layout, scores, critical_fraction) if critical == "static"
             else GroupStats.default(layout))
    rate = compute_gflops or (await asyncio.to_thread(measure_gflops) if planner == "schedule" else 1.0)

    async def factory(lost: frozenset[str], session: int) -> Coordinator:
        alive = [n for n in names if n not in lost]
        deadlines: dict[str, float] | None = None
        if planner == "schedule":
            models = [PeerModel.from_gflops(
                n, rate / profiles[n].slowdown, memory_budget_bytes=profiles[n].memory_budget_bytes or UNLIMITED_BYTES,
                rtt_ms=2000 * profiles[n].link.delay_s if n != names[0] else 0.0,
                jitter_ms=1000 * profiles[n].link.jitter_s if n != names[0] else 0.0,
                plr=profiles[n].link.plr if n != names[0] else 0.0, is_coordinator=n == names[0]) for n in alive]
            sched = schedule_for_layout(layout, models, stats=stats, coordinator_fixed_bytes=trunk.weight_bytes())
            plan = sched.plan
            deadlines = {p: max(0.02, 2 * d) for p, d in sched.deadline_s.items()}
        else:
            plan = PlacementPlan.split(layout, alive, coordinator=names[0], shares=[shares[n] for n in alive])
        own = plan.groups_of(names[0])
        local = None
        if own:
            local = await coordinator_thread.run(GroupShard, source, layout, own, max_seq_len=options.max_seq_len)
        coordinator = Coordinator(trunk=trunk, local=local, compute=coordinator_thread,
                                  links={n: links[n] for n in alive[1:]}, plan=plan, options=options,
                                  criticality=criticality, session=session, initial_deadlines=deadlines,
                                  takeover=takeover, unstable=unstable)
        await coordinator.start()
        return coordinator

    swarm = EmulatedSwarm(ReplanningEngine(factory), workers, threads, tasks, links)
    try:
        await swarm.engine.start()
    except BaseException:
        await swarm.aclose()
        raise
    return swarm
