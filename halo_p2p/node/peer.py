"""A peer of the swarm: discoverable, accepting authenticated links, serving as a worker.

``halo-peer join`` runs one :class:`PeerNode` until interrupted. Every peer is a worker: each
coordinator that connects gets its own :class:`~halo_p2p.session.worker.Worker` over its own
link (two prompts from two peers are two workers here, sharing this peer's compute thread). The
peer where a prompt arrives runs a node too and coordinates (see :mod:`halo_p2p.node.swarm`).
Links come from a :class:`~halo_p2p.net.connector.Connector`: signed signaling and WebRTC by
default, in-memory links in an emulated swarm (:mod:`halo_p2p.node.emulate`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from halo_p2p.discovery import Discovery, PeerInfo
from halo_p2p.engine.compute import ComputeThread
from halo_p2p.engine.probe import measure_gflops
from halo_p2p.errors import ConfigError
from halo_p2p.groups import GroupLayout
from halo_p2p.net.connector import Connector, WebRtcConnector
from halo_p2p.net.link import Link
from halo_p2p.paths import user_config_dir
from halo_p2p.plan import PlanBody
from halo_p2p.session.worker import ShardFactory, Worker

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ModelProvider",
    "NodeConfig",
    "NodeStatus",
    "PeerNode",
    "ServedStatus",
    "choose_address",
    "config_dir",
    "load_peer_id",
]

log = logging.getLogger(__name__)

_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")]


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/halo-p2p`` (default ``~/.config/halo-p2p``): swarm key and peer id
    (:func:`halo_p2p.paths.user_config_dir`)."""
    return user_config_dir()


def load_peer_id(path: Path | None = None) -> str:
    """This device's peer id, created once (``peer-`` and 12 hex digits) and kept in ``path``."""
    path = path or config_dir() / "peer-id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    peer_id = f"peer-{secrets.token_hex(6)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(peer_id + "\n")
    return peer_id


def choose_address(candidates: list[str]) -> str:
    """The address to advertise: the first private-range (RFC 1918 / link-local) IPv4 address.

    A LAN peer's mDNS and WebRTC traffic stays on private networks; with none, 127.0.0.1 (the
    peers of this one machine).
    """
    for addr in candidates:
        ip = ipaddress.ip_address(addr)
        if ip.version == 4 and any(ip in net for net in _PRIVATE):
            return addr
    return "127.0.0.1"


DEFAULT_MEMORY_BUDGET_BYTES = 2 << 30
"""Memory a peer offers for weights unless its profile says otherwise (bytes)."""


class ModelProvider(Protocol):
    """The models a peer offers (:class:`~halo_p2p.node.library.ModelLibrary`, or the one shared
    model of an emulated swarm)."""

    def entries(self) -> tuple[str, ...]:
        """``name@sha16`` of each model, as announced in discovery."""
        ...

    def open_for_plan(self, sha256: str, body: PlanBody) -> tuple[GroupLayout, ShardFactory]:
        """The :data:`~halo_p2p.session.worker.ModelOpener` of this peer's workers."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """How a peer presents itself.

    Attributes:
        peer_id: unique id on the LAN.
        name: display name.
        address: IPv4 address to listen on and advertise (mDNS, signaling, ICE host candidate).
        port: signaling TCP port (0: any free port).
        swarm_key: the shared secret authenticating signaling.
        memory_budget_bytes: memory this peer offers for weights.
        slowdown: emulated compute slowdown (profiles of slower devices).
        emulated_plr: loss emulated inside this peer's links (loopback swarms without namespaces).
        compute_gflops: this device's compute rate in GFLOP/s (the announced rate is this divided
            by ``slowdown``); ``None`` measures it at start
            (:func:`~halo_p2p.engine.probe.measure_gflops`, ~0.1 s; an emulated swarm measures
            once and passes it to every peer).
        uplink_parity: workers follow answers with XOR parity on links that measured loss
            (see :class:`~halo_p2p.session.worker.Worker`).
    """

    peer_id: str
    name: str
    address: str
    swarm_key: bytes = field(repr=False)
    port: int = 0
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    slowdown: float = 1.0
    emulated_plr: float = 0.0
    compute_gflops: float | None = None
    uplink_parity: bool = True


@dataclass(slots=True)
class ServedSession:
    """A coordinator this peer works for."""

    coordinator: str
    link: Link
    worker: Worker
    task: asyncio.Task[None]
    since_s: float


@dataclass(frozen=True, slots=True)
class ServedStatus:
    """One coordinator this peer works for, as its link and worker count it.

    Attributes:
        coordinator: the coordinator's peer id.
        groups: groups this peer computes for it.
        rtt_ms, jitter_ms, plr: the link's heartbeat measurements (None until measured).
        bytes_sent, bytes_received: payload bytes on both channels, this end.
        counters: the worker's dropped / malformed / stale message counts.
        tpot_ms: intervals between its last decode steps, in milliseconds.
    """

    coordinator: str
    groups: int
    rtt_ms: float | None
    jitter_ms: float | None
    plr: float | None
    bytes_sent: int
    bytes_received: int
    counters: Mapping[str, int]
    tpot_ms: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A snapshot of a peer for the live view (``halo-peer join``).

    Attributes:
        peer_id, name: this peer.
        address, port: where other peers dial it.
        models: ``name@sha16`` of the models it offers.
        peers: the other peers discovery shows, by name.
        served: the coordinators it works for.
        refused: the connector's counters (``accepted``, ``refused_<reason>``, ...).
    """

    peer_id: str
    name: str
    address: str
    port: int
    models: tuple[str, ...]
    peers: tuple[PeerInfo, ...]
    served: tuple[ServedStatus, ...]
    refused: Mapping[str, int]


class PeerNode:
    """One peer: registered in discovery, accepting links, running a worker per coordinator.

    Args:
        config: identity and address.
        library: the models this peer holds.
        discovery: how peers find each other (mDNS, static, or in memory for tests).
        connector: how links are made (default: a
            :class:`~halo_p2p.net.connector.WebRtcConnector` on ``config``'s address, port, swarm
            key and emulated PLR; a :class:`~halo_p2p.net.connector.MemoryConnector` in an
            emulated swarm).

    Attributes:
        dial_stats: outcomes of this node's dials as a coordinator (``ok``, ``refused``,
            ``failed``, ``timeout``, ``duplicate``; see :func:`halo_p2p.node.swarm.dial_peers`).
    """

    def __init__(self, config: NodeConfig, library: ModelProvider, discovery: Discovery, *,
                 connector: Connector | None = None) -> None:
        self.config, self.library, self.discovery = config, library, discovery
        self.compute = ComputeThread(f"halo-{config.peer_id}", slowdown=config.slowdown)
        self.connector: Connector = connector or WebRtcConnector(
            config.peer_id, config.name, config.swarm_key, host=config.address, port=config.port,
            emulated_plr=config.emulated_plr)
        self.sessions: dict[int, ServedSession] = {}
        self.info: PeerInfo | None = None
        self.dial_stats: Counter[str] = Counter()
        self._next = 0

    @property
    def peer_id(self) -> str:
        return self.config.peer_id

    async def start(self) -> PeerInfo:
        """Listen for links and register in discovery.

        Raises:
            ConfigError: the address is not an IPv4 address, or the announcement is invalid
                (e.g. a peer id outside ``[A-Za-z0-9_-]``).
            TransportError: the signaling port cannot be bound.
            DiscoveryError: the peer id is taken on this LAN.
        """
        try:
            ipaddress.IPv4Address(self.config.address)
        except ValueError:
            raise ConfigError(f"address {self.config.address!r} is not an IPv4 address",
                              "pass --address A.B.C.D or --interface NAME") from None
        port = await self.connector.listen(self._on_link)
        given = self.config.compute_gflops
        gflops = given / self.config.slowdown if given is not None else \
            round(await asyncio.to_thread(measure_gflops) / self.config.slowdown, 1)
        self.info = PeerInfo(peer_id=self.peer_id, name=self.config.name, models=self.library.entries(),
                             cores=os.cpu_count() or 1, memory_budget_bytes=self.config.memory_budget_bytes,
                             compute_gflops=gflops, host=self.connector.address, signaling_port=port)
        await self.discovery.start(self.info)
        log.info("peer %s (%s) joined at %s:%d", self.peer_id, self.config.name, self.connector.address, port)
        return self.info

    async def _on_link(self, link: Link, remote_id: str) -> None:
        worker = Worker(self.peer_id, link, self.library.open_for_plan, self.compute,
                        uplink_parity=self.config.uplink_parity)
        key = self._next = self._next + 1
        task = asyncio.create_task(self._serve(key, worker, link), name=f"serve-{remote_id}")
        self.sessions[key] = ServedSession(remote_id, link, worker, task, time.monotonic())

    async def _serve(self, key: int, worker: Worker, link: Link) -> None:
        try:
            await worker.run()
        except Exception:
            log.exception("worker for %s failed", link.remote_id)
        finally:
            await link.aclose()
            self.sessions.pop(key, None)
            log.info("session with %s ended", link.remote_id)

    def weight_bytes(self) -> int:
        """Resident weight bytes of the groups this peer computes for its coordinators."""
        return sum(s.worker.shard.weight_bytes() for s in self.sessions.values() if s.worker.shard is not None)

    def status(self) -> NodeStatus:
        """A snapshot for the live view."""
        served = []
        for s in self.sessions.values():
            st = s.link.stats
            held = 0
            if s.worker.shard is not None and s.worker.layout is not None:
                lay = s.worker.layout
                held = sum(len(s.worker.shard.groups_at(layer, part)) for layer in range(lay.n_layers)
                           for part in (0, 1))
            served.append(ServedStatus(
                coordinator=s.coordinator, groups=held, rtt_ms=st.rtt_ms, jitter_ms=st.jitter_ms,
                plr=st.measured_plr, bytes_sent=st.reliable.bytes_sent + st.unreliable.bytes_sent,
                bytes_received=st.reliable.bytes_delivered + st.unreliable.bytes_delivered,
                counters=dict(s.worker.counters), tpot_ms=tuple(1000 * t for t in s.worker.step_intervals_s)))
        return NodeStatus(peer_id=self.peer_id, name=self.config.name, address=self.connector.address,
                          port=self.connector.port, models=self.library.entries(),
                          peers=tuple(sorted(self.discovery.peers().values(), key=lambda p: p.name)),
                          served=tuple(served), refused=dict(self.connector.stats))

    async def aclose(self) -> None:
        """Leave discovery, stop listening, end the served sessions, stop the compute thread; idempotent."""
        await self.discovery.aclose()
        await self.connector.aclose()
        for s in list(self.sessions.values()):
            s.task.cancel()
        await asyncio.gather(*(s.task for s in self.sessions.values()), return_exceptions=True)
        await asyncio.to_thread(self.compute.close)
