"""An emulated swarm in one process: real peers joined by in-memory lossy links.

Every peer is a :class:`~halo_p2p.node.peer.PeerNode` with its own compute thread (with the
profile's slowdown) and its own shard of the model, cut from the same source; it announces itself
in an in-memory discovery (:class:`~halo_p2p.discovery.memory.MemoryDiscovery`) and accepts links
through a :class:`~halo_p2p.net.connector.MemoryConnector`, whose links to the coordinator have
the profile's PLR, one-way delay and jitter (:class:`~halo_p2p.net.link.LinkConditions`, seeded).
The first peer coordinates exactly as on a real swarm: it dials the others through its connector
and starts the session with the one session builder
(:func:`halo_p2p.node.swarm.open_split_engine`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence

from halo_p2p.discovery import MemoryDiscovery, MemoryNetwork, model_entry
from halo_p2p.engine.probe import measure_gflops
from halo_p2p.errors import ConfigError
from halo_p2p.groups import GroupLayout
from halo_p2p.model.shard import TAKEOVER_BUDGET_BYTES, GroupShard
from halo_p2p.model.source import TensorSource
from halo_p2p.net.connector import MemoryConnector
from halo_p2p.net.hub import MemoryHub
from halo_p2p.node.peer import NodeConfig, PeerNode
from halo_p2p.node.swarm import open_split_engine
from halo_p2p.plan import PlanBody
from halo_p2p.predictor import Predictor
from halo_p2p.profiles import PeerProfile
from halo_p2p.scheduler import UNLIMITED_BYTES
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.criticality import CriticalityPolicy
from halo_p2p.session.replan import SplitEngine
from halo_p2p.session.setup import Critical, Planner, SessionSetup
from halo_p2p.session.worker import ModelOpener, ShardFactory

__all__ = ["EMULATED_SHA256", "PeerProfile", "start_emulated_swarm"]

log = logging.getLogger(__name__)

EMULATED_SHA256 = "e" * 64
"""The sha256 that names an emulated swarm's shared model in its plans."""

_ADDRESS = "127.0.0.1"


def _open_shared(source: TensorSource) -> ModelOpener:
    """The workers' model opener: every plan is served from the one shared ``source``."""

    def open_model(sha256: str, body: PlanBody) -> tuple[GroupLayout, ShardFactory]:
        lay = GroupLayout.from_config(source.config, body.layout.mlp_group_size)
        return lay, lambda groups, max_seq_len: GroupShard(source, lay, groups, max_seq_len=max_seq_len)

    return open_model


class _SharedModel:
    """The :class:`~halo_p2p.node.peer.ModelProvider` of an emulated peer: one shared source."""

    def __init__(self, source: TensorSource) -> None:
        self.open_for_plan = _open_shared(source)

    def entries(self) -> tuple[str, ...]:
        return (model_entry("emulated", EMULATED_SHA256),)


async def start_emulated_swarm(source: TensorSource, peers: Sequence[PeerProfile], options: SessionOptions, *,
                               mlp_group_size: int | None = None, critical: Critical | str = Critical.STATIC,
                               critical_fraction: float = 0.5, seed: int = 0, planner: Planner | str = Planner.SPLIT,
                               compute_gflops: float | None = None, dynamic: bool = False,
                               takeover_budget_bytes: int = TAKEOVER_BUDGET_BYTES,
                               policy: CriticalityPolicy | None = None, predictor: Predictor | None = None,
                               uplink_parity: bool = True) -> SplitEngine:
    """Start ``peers`` (the first is the coordinator) as real peers over in-memory links and plan.

    Args:
        source: the model, shared by every emulated peer.
        peers: profiles; ``peers[0]`` coordinates. A profile's name is its peer id
            (``[A-Za-z0-9_-]``); its ``link`` is the link to the coordinator (ignored for the
            coordinator); ``share`` None counts as 1.
        options: session options (sync mode, wire dtype, ...).
        mlp_group_size: neurons per MLP group (default: 24 groups per layer where possible).
        critical: :class:`~halo_p2p.session.setup.Critical` (``"static"``, ``"all"``,
            ``"predictor"`` with ``predictor``).
        critical_fraction: share of MLP groups that are critical.
        seed: base seed of the links' loss and jitter (worker ``i``'s link: ``seed + i``).
        planner: ``"split"`` (contiguous groups by ``share``) or ``"schedule"`` (the
            load-balancing scheduler of :mod:`halo_p2p.scheduler`, from each peer's compute rate,
            memory budget and link conditions).
        compute_gflops: this machine's rate (default: measured once for ``"schedule"``); each
            peer announces it divided by its slowdown.
        policy: a criticality policy to use instead of ``critical``'s (e.g. a test's oracle).
        predictor: the semantic-aware predictor of ``critical="predictor"``.
        dynamic: per-token dynamic placement (``halo``): the coordinator computes the critical MLP
            groups of lossy peers itself (within ``takeover_budget_bytes``).
        uplink_parity: workers follow each answer with XOR parity on links that measured loss.

    Returns:
        The started engine; it owns the peers (closing it stops them).

    Raises:
        ConfigError: no peers, a name that is not a valid peer id, or a bad setting.
    """
    if not peers:
        raise ConfigError("an emulated swarm needs at least one peer", "give the coordinator's profile")
    setup = SessionSetup(planner=Planner.of(planner), critical=Critical.of(critical),
                         critical_fraction=critical_fraction, mlp_group_size=mlp_group_size,
                         dynamic_placement=dynamic, takeover_budget_bytes=takeover_budget_bytes)
    rate = compute_gflops or (await asyncio.to_thread(measure_gflops) if setup.planner is Planner.SCHEDULE else 1.0)
    hub, network, key = MemoryHub(seed=seed, address=_ADDRESS), MemoryNetwork(), secrets.token_bytes(32)
    model = _SharedModel(source)
    nodes: list[PeerNode] = []
    try:
        for i, p in enumerate(peers):
            config = NodeConfig(peer_id=p.name, name=p.name, address=_ADDRESS, swarm_key=key,
                                memory_budget_bytes=UNLIMITED_BYTES if p.memory_budget_bytes is None
                                else p.memory_budget_bytes, slowdown=p.slowdown, compute_gflops=rate,
                                uplink_parity=uplink_parity)
            connector = MemoryConnector(hub, p.name, swarm_key=key, conditions=p.link if i else None)
            nodes.append(PeerNode(config, model, MemoryDiscovery(network), connector=connector))
            await nodes[-1].start()
        coordinator, workers = nodes[0], nodes[1:]
        seen = coordinator.discovery.peers()
        return await open_split_engine(
            coordinator, source, EMULATED_SHA256, options, setup, peers=[seen[w.peer_id] for w in workers],
            predictor=predictor, policy=policy, known_links={p.name: p.link for p in peers[1:]},
            shares={p.name: 1.0 if p.share is None else p.share for p in peers}, own_node=True, members=workers,
            model_name="the emulated model")
    except BaseException:
        for node in nodes:
            await node.aclose()
        raise
