"""The coordinator side: run a prompt on the swarm this peer sees.

:func:`open_swarm_engine` waits (bounded) for peers offering memory to appear in discovery (those
holding the same model file, same sha256, first; ``--peer`` addresses last), then
:func:`open_split_engine` dials them all in parallel through the node's connector, within one
short deadline (:func:`dial_peers`: any failure of a dial only leaves that peer out), and starts
a session with the one session builder (:func:`halo_p2p.session.setup.open_split_session`): the
plan follows the peers' measured compute rates, memory budgets and links. The engine re-plans
without peers that refuse the plan, vanish or fall silent, and dials a silent peer again
(:data:`~halo_p2p.session.rejoin.Rejoin`) so that it rejoins once it is back. The emulated swarm
(:mod:`halo_p2p.node.emulate`) coordinates through :func:`open_split_engine` too, over in-memory
links.

A ``--peer HOST:PORT`` entry (:class:`~halo_p2p.discovery.static.StaticDiscovery`) is a
placeholder without identity or resources: it is dialed with no expected peer id, and the peer
id in its signed answer (the link's ``remote_id``) names it from then on; its resources are
those discovery announces under that id, else assumed to be this device's (compute rate) and
the default memory budget. A device seen both through mDNS and ``--peer`` is used once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from halo_p2p.discovery import PeerInfo
from halo_p2p.errors import AuthError, HaloError
from halo_p2p.model.source import TensorSource
from halo_p2p.net.connector import DialTarget
from halo_p2p.net.link import Link, LinkConditions
from halo_p2p.node.library import HeldModel
from halo_p2p.node.peer import DEFAULT_MEMORY_BUDGET_BYTES, PeerNode
from halo_p2p.predictor import Predictor
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.criticality import CriticalityPolicy
from halo_p2p.session.replan import PeerHost, SplitEngine
from halo_p2p.session.setup import Critical, SessionSetup, open_split_session

__all__ = ["DIAL_DEADLINE_S", "dial_peers", "open_split_engine", "open_swarm_engine", "wait_for_model_peers"]

log = logging.getLogger(__name__)

DIAL_DEADLINE_S: Final = 5.0
"""How long the candidate peers are dialed, all at once, in seconds: a peer that has not answered
by then (a silent or fake one) is left out, so it costs at most this once."""


async def wait_for_model_peers(node: PeerNode, held: HeldModel, *, wait_s: float, want: int | None) -> list[PeerInfo]:
    """Peers willing to compute, waiting up to ``wait_s`` seconds for ``want`` of them.

    Announced peers offering memory come first, those holding ``held`` (same sha256) before
    the others (which receive their groups' weights from the coordinator and cache them); then
    the ``--peer`` placeholders (``static``: nothing known until dialed) whose address no
    announced peer has. Observers (no memory budget) are left out.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        seen = list(node.discovery.peers().values())
        announced = {p.address for p in seen if not p.static}
        found = sorted((p for p in seen if not p.static and p.memory_budget_bytes > 0),
                       key=lambda p: (held.entry not in p.models, p.peer_id))
        found += sorted((p for p in seen if p.static and p.address not in announced), key=lambda p: p.peer_id)
        if (want is not None and len(found) >= want) or loop.time() >= deadline:
            return found
        await asyncio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class _Anyone:
    """A dial target known only by its address (a ``--peer`` placeholder): ``peer_id`` None
    expects no identity (``signaling.connect(expect_peer_id=None)``); whichever key holder
    answers there is the peer, named by its signed answer."""

    host: str
    signaling_port: int
    peer_id: None = None


def _learned(placeholder: PeerInfo, peer_id: str, node: PeerNode) -> PeerInfo:
    """The record of the peer that answered at ``placeholder``'s address as ``peer_id``.

    Raises:
        ConfigError: ``peer_id`` is not a valid peer id.
    """
    known = node.discovery.peers().get(peer_id)
    if known is not None:
        return known
    rate = node.info.compute_gflops if node.info is not None else 0.0
    return PeerInfo(peer_id=peer_id, name=peer_id, cores=1, memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,
                    compute_gflops=rate, host=placeholder.host, signaling_port=placeholder.signaling_port)


async def dial_peers(node: PeerNode, peers: Sequence[PeerInfo], *, deadline_s: float = DIAL_DEADLINE_S,
                     attempts: int = 2) -> dict[str, tuple[PeerInfo, Link]]:
    """Links to the ``peers`` that answer within ``deadline_s``, dialed all at once, in the order of ``peers``.

    Any failure of a dial (a refusal, a timeout, an exception of any kind from a crafted
    answer) makes that peer unusable: one line is logged, ``node.dial_stats`` counts it
    (``refused``: it refused this node's key or is not who discovery said, final; ``failed``:
    every attempt failed; ``timeout``: still trying at the deadline; ``duplicate``: a peer
    already dialed, or this one; ``ok``), and the other peers go on. Failures other than a refusal
    are retried (a lossy link can lose ICE/DTLS/SCTP handshake packets) up to ``attempts``
    times within the deadline. A ``--peer`` placeholder comes back under the id of its answer.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    stats = node.dial_stats

    async def dial(p: PeerInfo) -> tuple[PeerInfo, Link] | None:
        target: DialTarget = _Anyone(p.host, p.signaling_port) if p.static else p
        error: Exception | None = None
        for attempt in range(1, attempts + 1):
            left = end - loop.time()
            if left <= 0:
                break
            try:
                return p, await node.connector.dial(target, timeout_s=left)
            except AuthError as exc:            # final: retrying cannot fix a wrong key or identity
                stats["refused"] += 1
                log.warning("cannot use peer %s (%s): %s", p.name, p.address, exc)
                return None
            except Exception as exc:            # anything else, a crafted answer's too: maybe transient
                error = exc
                log.debug("dialing peer %s (%s), attempt %d/%d: %r", p.name, p.address, attempt, attempts, exc)
        outcome = "timeout" if loop.time() >= end else "failed"
        stats[outcome] += 1
        log.warning("cannot use peer %s (%s): %s", p.name, p.address,
                    f"no answer within {deadline_s:g} s" if outcome == "timeout" else f"{error!r:.300}")
        return None

    tasks = [asyncio.create_task(dial(p), name=f"dial-{p.peer_id}") for p in peers]
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, end - loop.time()))
    for task in tasks:
        task.cancel()                            # a connector that ignored its timeout
    await asyncio.gather(*tasks, return_exceptions=True)
    dialed: dict[str, tuple[PeerInfo, Link]] = {}
    answered = [(p, t.result()) for p, t in zip(peers, tasks, strict=True) if not t.cancelled()]
    for p, task in zip(peers, tasks, strict=True):
        if task.cancelled():
            stats["timeout"] += 1
            log.warning("cannot use peer %s (%s): no answer within %g s", p.name, p.address, deadline_s)
    for p, result in sorted(answered, key=lambda a: a[0].static):    # announced peers before placeholders
        if result is None:
            continue
        info, link = result
        if p.static:
            try:
                info = _learned(p, link.remote_id, node)
            except HaloError as exc:
                stats["failed"] += 1
                log.warning("cannot use peer at %s: %s", p.address, exc)
                await link.aclose()
                continue
            if info.peer_id in dialed or info.peer_id == node.peer_id:
                stats["duplicate"] += 1
                log.info("--peer %s is %s, already dialed", p.address, info.peer_id)
                await link.aclose()
                continue
        stats["ok"] += 1
        dialed[info.peer_id] = (info, link)
    return dialed


async def open_split_engine(node: PeerNode, source: TensorSource, model_sha256: str, options: SessionOptions,
                            setup: SessionSetup, *, peers: Sequence[PeerInfo],
                            dial_deadline_s: float = DIAL_DEADLINE_S, dial_attempts: int = 2,
                            predictor: Predictor | None = None,
                            policy: CriticalityPolicy | None = None,
                            known_links: Mapping[str, LinkConditions] | None = None,
                            shares: Mapping[str, float] | None = None, own_node: bool = False,
                            members: Sequence[PeerHost] = (), model_name: str | None = None) -> SplitEngine:
    """Dial ``peers`` (in plan order, see :func:`dial_peers`) and start a session over those that answer.

    Args:
        node: this peer (started); it coordinates on its compute thread.
        source, model_sha256: the model and the sha256 naming it to the workers.
        options, setup: see :func:`halo_p2p.session.setup.coordinator_factory`, as are
            ``predictor``, ``policy``, ``known_links`` and ``shares``.
        peers: the workers to use, in plan order.
        dial_deadline_s, dial_attempts: see :func:`dial_peers`; a lost worker is dialed again
            with the same deadline.
        own_node: the engine closes ``node`` when it is closed.
        members: worker peers of this process, closed with the engine (an emulated swarm).
        model_name: the model's name in messages.

    Raises:
        HaloError: ``peers`` were given but none answered (run locally instead), or the session
            could not start.
    """
    assert node.info is not None, "start() the node first"
    dialed = await dial_peers(node, peers, deadline_s=dial_deadline_s, attempts=dial_attempts)
    if peers and not dialed:
        raise HaloError(f"no peer holding {model_name or model_sha256[:16]} answered",
                        "start halo-peer join on other devices, or use --local")
    infos = {p: info for p, (info, _) in dialed.items()}

    async def rejoin(peer_id: str) -> Link:        # where discovery sees it now, else where it was
        return await node.connector.dial(node.discovery.peers().get(peer_id) or infos[peer_id],
                                         timeout_s=dial_deadline_s)

    engine = await open_split_session(
        source, options, setup, compute=node.compute, me=node.info, peers=infos,
        links={p: link for p, (_, link) in dialed.items()}, model_sha256=model_sha256, known_links=known_links,
        shares=shares, policy=policy, predictor=predictor, node=node if own_node else None, members=members,
        rejoin=rejoin)
    log.info("swarm of %d peers: %s", len(engine.plan.peers),
             ", ".join(dialed[p][0].name for p in engine.plan.workers()))
    return engine


async def open_swarm_engine(node: PeerNode, held: HeldModel, options: SessionOptions,
                            setup: SessionSetup | None = None, *, wait_s: float = 3.0, max_workers: int | None = None,
                            dial_deadline_s: float = DIAL_DEADLINE_S, dial_attempts: int = 2,
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
                                   dial_deadline_s=dial_deadline_s, dial_attempts=dial_attempts,
                                   predictor=predictor, own_node=own_node, model_name=held.name)
