"""The coordinator side: run a prompt on the swarm this peer sees.

It waits (bounded) for peers holding the same model file (same sha256) to appear in discovery,
opens an authenticated WebRTC link to each, and builds a plan whose shares follow the peers'
measured compute rates (the coordinator included). The engine re-plans without peers that
refuse the plan or vanish (:class:`~halo_p2p.session.replan.ReplanningEngine`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from halo_p2p.discovery import PeerInfo
from halo_p2p.errors import AuthError, HaloError
from halo_p2p.groups import PARTS, GroupLayout
from halo_p2p.model.shard import GroupShard, MlpTakeover, SliceWeights, Trunk, mlp_group_scores
from halo_p2p.net.link import Link
from halo_p2p.net.signaling import connect
from halo_p2p.node.library import HeldModel
from halo_p2p.node.peer import PeerNode
from halo_p2p.plan import PlacementPlan
from halo_p2p.predictor import PredictorPolicy, load_predictor_for
from halo_p2p.scheduler import GroupStats, peer_models_from, schedule_for_layout
from halo_p2p.session.coordinator import Coordinator, SessionOptions
from halo_p2p.session.criticality import AllCritical, CriticalityPolicy, StaticRule
from halo_p2p.session.replan import ReplanningEngine, ReplanningFacade

__all__ = ["SwarmEngine", "open_swarm_engine", "wait_for_model_peers"]

log = logging.getLogger(__name__)


async def wait_for_model_peers(node: PeerNode, held: HeldModel, *, wait_s: float, want: int | None) -> list[PeerInfo]:
    """Peers willing to compute (a memory budget), waiting up to ``wait_s`` seconds for ``want``.

    Those holding ``held`` (same sha256) come first: they load their groups from their own file;
    the others receive their groups' weights from the coordinator (and cache them).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        found = [p for p in node.discovery.peers().values() if p.memory_budget_bytes > 0]   # not observers
        if (want is not None and len(found) >= want) or loop.time() >= deadline:
            return sorted(found, key=lambda p: (held.entry not in p.models, p.peer_id))
        await asyncio.sleep(0.1)


@dataclass(slots=True)
class SwarmEngine(ReplanningFacade):
    """An :class:`~halo_p2p.engine.protocol.Engine` over WebRTC workers (closes its links)."""

    engine: ReplanningEngine
    links: dict[str, Link]
    peers: dict[str, PeerInfo] = field(default_factory=dict)

    async def aclose(self) -> None:
        await self.engine.aclose()
        await asyncio.gather(*(link.aclose() for link in self.links.values()), return_exceptions=True)


async def open_swarm_engine(node: PeerNode, held: HeldModel, options: SessionOptions, *, wait_s: float = 3.0,
                            max_workers: int | None = None, critical_fraction: float = 0.5,
                            connect_timeout_s: float = 10.0, dial_attempts: int = 2,
                            planner: str = "schedule", dynamic_placement: bool = False) -> SwarmEngine:
    """Connect to the peers holding ``held`` and start a session over them.

    ``planner="schedule"`` places groups with the load-balancing scheduler (peers' measured
    compute rates and memory budgets, links' heartbeat RTT/jitter/PLR, the criticality
    statistics); ``"split"`` shares groups by compute rate only. ``dynamic_placement`` (``halo``
    only): the coordinator computes a decode step's critical MLP groups of peers whose links
    measured loss itself (:class:`~halo_p2p.model.shard.MlpTakeover`), at the cost of its own CPU;
    off by default since answers carry FEC (docs/benchmarks.md §10).

    Raises:
        HaloError: no peer holding the model answered (run locally instead).
    """
    found = await wait_for_model_peers(node, held, wait_s=wait_s, want=max_workers)
    found = found[:max_workers] if max_workers else found
    cfg = node.config

    async def dial(p: PeerInfo) -> tuple[PeerInfo, Link] | None:
        for attempt in range(1, dial_attempts + 1):   # a lossy link can lose ICE/DTLS/SCTP handshake packets
            try:
                link = await connect(p.host, p.signaling_port, peer_id=cfg.peer_id, name=cfg.name,
                                     swarm_key=cfg.swarm_key, timeout_s=connect_timeout_s, expect_peer_id=p.peer_id)
                return p, link
            except AuthError as exc:                # a refusal is final: retrying cannot fix a wrong key
                log.warning("cannot use peer %s (%s): %s", p.name, p.address, exc)
                return None
            except HaloError as exc:
                log.warning("cannot use peer %s (%s), attempt %d/%d: %s", p.name, p.address, attempt,
                            dial_attempts, exc)
        return None

    dialed = [d for d in await asyncio.gather(*(dial(p) for p in found)) if d is not None]
    if not dialed:
        raise HaloError(f"no peer holding {held.name} answered",
                        "start halo-peer join on other devices, or use --local")
    links = {p.peer_id: link for p, link in dialed}
    infos = {p.peer_id: p for p, _ in dialed}
    source = held.model.source
    layout = GroupLayout.from_config(source.config)
    trunk = await node.compute.run(Trunk, source)
    criticality: CriticalityPolicy
    scores = await node.compute.run(mlp_group_scores, source, layout) if options.mode == "halo" else None
    predictor = await asyncio.to_thread(load_predictor_for, held.sha256) if options.mode == "halo" else None
    if predictor is not None:           # semantic-aware: the critical MLP groups change per token
        criticality = PredictorPolicy(predictor, critical_fraction, attn_critical=1.0)
    elif scores is not None:
        criticality = StaticRule(scores, layout.n_attn, critical_fraction)
    else:
        criticality = AllCritical({p: layout.n_groups(p) for p in PARTS})
    own_rate = node.info.compute_gflops if node.info else 1.0
    weights = SliceWeights(source, layout)
    takeover = MlpTakeover(SliceWeights(source, layout)) if options.mode == "halo" and dynamic_placement else None

    stats = (GroupStats.from_mlp_scores(layout, scores, critical_fraction) if scores is not None and predictor is None
             else GroupStats.default(layout, critical_fraction))

    async def factory(lost: frozenset[str], session: int) -> Coordinator:
        alive = [pid for pid in links if pid not in lost and not links[pid].closed]
        names = [cfg.peer_id, *alive]
        deadlines = None
        if planner == "schedule" and node.info is not None:
            models = peer_models_from([node.info, *(infos[p] for p in alive)], {p: links[p].stats for p in alive},
                                      coordinator=cfg.peer_id)
            sched = await asyncio.to_thread(schedule_for_layout, layout, models, stats=stats,
                                            coordinator_fixed_bytes=trunk.weight_bytes())
            plan, deadlines = sched.plan, {p: max(0.02, 2 * d) for p, d in sched.deadline_s.items()}
            log.info("scheduled: expected TPOT %.1f ms", 1000 * sched.expected_tpot_s)
        else:
            shares = [own_rate, *(max(infos[p].compute_gflops, 0.1) for p in alive)]
            plan = PlacementPlan.split(layout, names, coordinator=cfg.peer_id, shares=shares)
        own = plan.groups_of(cfg.peer_id)
        local = None
        if own:
            local = await node.compute.run(GroupShard, weights, layout, own, max_seq_len=options.max_seq_len)
        coordinator = Coordinator(trunk=trunk, local=local, compute=node.compute, links={p: links[p] for p in alive},
                                  plan=plan, options=options, criticality=criticality,
                                  model_sha256=held.sha256, session=session, weights=weights,
                                  initial_deadlines=deadlines, takeover=takeover)
        try:
            await coordinator.start()
        except BaseException:
            await coordinator.aclose()
            raise
        log.info("session %d over %d peers: %s", session, len(names), ", ".join(infos[p].name for p in alive))
        return coordinator

    engine = SwarmEngine(ReplanningEngine(factory), links, infos)
    try:
        await engine.engine.start()
    except BaseException:
        await engine.aclose()
        raise
    return engine
