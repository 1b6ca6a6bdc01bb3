"""The coordinator side: run a prompt on the swarm this peer sees.

:func:`open_swarm_engine` waits (bounded) for peers offering memory to appear in discovery (those
holding the same model file, same sha256, first), then :func:`open_split_engine` dials each
through the node's connector and starts a session with the one session builder
(:func:`halo_p2p.session.setup.open_split_session`): the plan follows the peers' measured compute
rates, memory budgets and links. The engine re-plans without peers that refuse the plan or
vanish. The emulated swarm (:mod:`halo_p2p.node.emulate`) coordinates through
:func:`open_split_engine` too, over in-memory links.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from halo_p2p.discovery import PeerInfo
from halo_p2p.errors import AuthError, HaloError
from halo_p2p.model.source import TensorSource
from halo_p2p.net.link import Link, LinkConditions
from halo_p2p.node.library import HeldModel
from halo_p2p.node.peer import PeerNode
from halo_p2p.predictor import Predictor
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.criticality import CriticalityPolicy
from halo_p2p.session.replan import PeerHost, SplitEngine
from halo_p2p.session.setup import Critical, SessionSetup, open_split_session

__all__ = ["dial_peers", "open_split_engine", "open_swarm_engine", "wait_for_model_peers"]

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


async def dial_peers(node: PeerNode, peers: Sequence[PeerInfo], *, timeout_s: float = 10.0,
                     attempts: int = 2) -> dict[str, tuple[PeerInfo, Link]]:
    """Links to the ``peers`` that answer, through ``node``'s connector, in the order of ``peers``.

    A peer that refuses this node's credentials is skipped at once; other failures are retried
    (a lossy link can lose ICE/DTLS/SCTP handshake packets) up to ``attempts`` times.
    """
    async def dial(p: PeerInfo) -> tuple[PeerInfo, Link] | None:
        for attempt in range(1, attempts + 1):
            try:
                return p, await node.connector.dial(p, timeout_s=timeout_s)
            except AuthError as exc:                # a refusal is final: retrying cannot fix a wrong key
                log.warning("cannot use peer %s (%s): %s", p.name, p.address, exc)
                return None
            except HaloError as exc:
                log.warning("cannot use peer %s (%s), attempt %d/%d: %s", p.name, p.address, attempt, attempts, exc)
        return None

    dialed = await asyncio.gather(*(dial(p) for p in peers))
    return {d[0].peer_id: d for d in dialed if d is not None}


async def open_split_engine(node: PeerNode, source: TensorSource, model_sha256: str, options: SessionOptions,
                            setup: SessionSetup, *, peers: Sequence[PeerInfo], connect_timeout_s: float = 10.0,
                            dial_attempts: int = 2, predictor: Predictor | None = None,
                            policy: CriticalityPolicy | None = None,
                            known_links: Mapping[str, LinkConditions] | None = None,
                            shares: Mapping[str, float] | None = None, own_node: bool = False,
                            members: Sequence[PeerHost] = (), model_name: str | None = None) -> SplitEngine:
    """Dial ``peers`` (in plan order) and start a session over those that answer.

    Args:
        node: this peer (started); it coordinates on its compute thread.
        source, model_sha256: the model and the sha256 naming it to the workers.
        options, setup: see :func:`halo_p2p.session.setup.coordinator_factory`, as are
            ``predictor``, ``policy``, ``known_links`` and ``shares``.
        peers: the workers to use, in plan order.
        own_node: the engine closes ``node`` when it is closed.
        members: worker peers of this process, closed with the engine (an emulated swarm).
        model_name: the model's name in messages.

    Raises:
        HaloError: ``peers`` were given but none answered (run locally instead), or the session
            could not start.
    """
    assert node.info is not None, "start() the node first"
    dialed = await dial_peers(node, peers, timeout_s=connect_timeout_s, attempts=dial_attempts)
    if peers and not dialed:
        raise HaloError(f"no peer holding {model_name or model_sha256[:16]} answered",
                        "start halo-peer join on other devices, or use --local")
    engine = await open_split_session(
        source, options, setup, compute=node.compute, me=node.info, peers={p: info for p, (info, _) in dialed.items()},
        links={p: link for p, (_, link) in dialed.items()}, model_sha256=model_sha256, known_links=known_links,
        shares=shares, policy=policy, predictor=predictor, node=node if own_node else None, members=members)
    log.info("swarm of %d peers: %s", len(engine.plan.peers),
             ", ".join(dialed[p][0].name for p in engine.plan.workers()))
    return engine


async def open_swarm_engine(node: PeerNode, held: HeldModel, options: SessionOptions,
                            setup: SessionSetup | None = None, *, wait_s: float = 3.0, max_workers: int | None = None,
                            connect_timeout_s: float = 10.0, dial_attempts: int = 2,
                            predictor: Predictor | None = None, own_node: bool = False) -> SplitEngine:
    """Connect to the peers of the swarm and start a session of ``held`` over them.

    ``setup`` chooses the planner and the criticality (default: the load-balancing scheduler over
    the peers' measured compute rates and memory budgets, the links' heartbeat RTT/jitter/PLR and
    the criticality statistics; in ``halo`` the ``predictor`` if given, else the static rule;
    every group critical otherwise);
    ``dynamic_placement`` (``halo`` only) makes the coordinator compute a decode step's critical
    MLP groups of peers whose links measured loss itself, at the cost of its own CPU (off by
    default since answers carry FEC, docs/benchmarks.md §10).

    Raises:
        HaloError: no peer holding the model answered (run locally instead).
    """
    found = await wait_for_model_peers(node, held, wait_s=wait_s, want=max_workers)
    found = found[:max_workers] if max_workers else found
    if not found:
        raise HaloError(f"no peer holding {held.name} answered",
                        "start halo-peer join on other devices, or use --local")
    setup = setup or SessionSetup(critical=Critical.PREDICTOR if options.mode == "halo" else Critical.ALL)
    return await open_split_engine(node, held.model.source, held.sha256, options, setup, peers=found,
                                   connect_timeout_s=connect_timeout_s, dial_attempts=dial_attempts,
                                   predictor=predictor, own_node=own_node, model_name=held.name)
