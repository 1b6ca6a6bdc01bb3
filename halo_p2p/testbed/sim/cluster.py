"""Device and link models of a simulated cluster, and presets with their sources.

A :class:`Cluster` is a coordinator and workers, each worker joined to the coordinator by a
:class:`LinkModel` (one switch hop, the same conditions both ways). A :class:`Device` computes a
sync point in ``sync_overhead_s[part] + params * seconds_per_param`` and spends the CPU of its
network stack (:class:`~halo_p2p.testbed.sim.cpu.StackCost`: per frame, per vector, per sync point) on
the same CPU, one job at a time (``Cluster.stack_on_compute``).

Presets (every number's derivation is in ``benchmarks/projection.md``):

* :func:`rpi4b`, :func:`rpi5`: seconds per parameter from distributed-llama's single-node
  ms/token divided by the model's matrix-vector parameters (Q40 weights, 4 threads): Raspberry
  Pi 4B 8 GB, Llama 2 7B, 1312.50 ms/token; Raspberry Pi 5 8 GB, Llama 3 8B, 564 ms/token
  (b4rtaz/distributed-llama README, quoted in ``/work/shared/notes/anchors.md`` §2); the stack
  cost of halo-p2p's Python stack measured on this machine, scaled to the Pi's core
  (:data:`~halo_p2p.testbed.sim.cpu.RPI4_STACK`, :data:`~halo_p2p.testbed.sim.cpu.RPI5_STACK`).
* :func:`gbe_link`: 1 GbE through one switch: 125 MB/s line rate (a Raspberry Pi 4B saturates it,
  949 Mbit/s of TCP payload, tomcore.io "Raspberry PI 4B Network Performance"), 0.173 ms ping RTT
  through gigabit switches (Linux Magazine 165, "High-resolution network monitoring with ping"),
  RTO 200 ms (Linux ``TCP_RTO_MIN = HZ/5``, include/net/tcp.h); aiortc's SCTP uses 1 s
  (``network-facts.md`` §5).

Also here: the simulator's queueing and transport primitives (:class:`Port`, a FIFO server;
:class:`ReliableStream`, in-order delivery) and the scheduler glue (:func:`place`,
:func:`mlp_scores`); the wire framing is :mod:`halo_p2p.testbed.sim.framing`.

Pure module: no I/O.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from halo_p2p.errors import ConfigError
from halo_p2p.groups import GroupLayout
from halo_p2p.net.link import SCTP_FRAGMENT_BYTES
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler import GroupStats, PeerModel, Schedule, SchedulerConfig, evaluate_plan, schedule_for_layout
from halo_p2p.testbed.sim.cpu import FREE_STACK, RPI4_STACK, RPI5_STACK, StackCost
from halo_p2p.testbed.sim.shapes import LLAMA2_7B, LLAMA3_8B, ModelShape

__all__ = [
    "COORDINATOR_ID",
    "Q40_BYTES_PER_PARAM",
    "Cluster",
    "Device",
    "LinkModel",
    "Port",
    "ReliableStream",
    "gbe_link",
    "mlp_scores",
    "place",
    "rpi4b",
    "rpi5",
    "uniform_cluster",
]

log = logging.getLogger(__name__)

COORDINATOR_ID = "c"
"""Peer id of the coordinator in every simulated cluster (workers are ``w01``, ``w02``, ...)."""

Q40_BYTES_PER_PARAM = 18 / 32
"""distributed-llama's Q40 block: 32 4-bit weights plus one float16 scale = 18 bytes."""

def _check(owner: str, name: str, value: float, low: float = 0.0, high: float = math.inf) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ConfigError(f"{owner}.{name} = {value!r} is out of range", f"use a number in [{low}, {high}]")


@dataclass(frozen=True, slots=True)
class Device:
    """One device's compute and network-stack cost.

    Attributes:
        name: device kind, e.g. ``"rpi4b"``.
        seconds_per_param: seconds of matrix-vector work per weight parameter for one token.
        memory_bytes: bytes the device may use for weights.
        stack: CPU its network stack spends per frame, vector and sync point (default: free).
        sync_overhead_s: fixed seconds per sync point at which it computes groups, for attention
            and MLP sync points (dispatch, thread hand-off, RoPE and the KV cache).
    """

    name: str
    seconds_per_param: float
    memory_bytes: int
    stack: StackCost = FREE_STACK
    sync_overhead_s: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        _check("Device", "seconds_per_param", self.seconds_per_param)
        if not isinstance(self.stack, StackCost):
            raise ConfigError(f"Device.stack = {self.stack!r}", "give a halo_p2p.testbed.sim.cpu.StackCost")
        if len(self.sync_overhead_s) != 2:
            raise ConfigError(f"Device.sync_overhead_s = {self.sync_overhead_s!r}", "give (attention, mlp) seconds")
        for value in self.sync_overhead_s:
            _check("Device", "sync_overhead_s", value)
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < 0:
            raise ConfigError(f"Device.memory_bytes = {self.memory_bytes!r} is invalid", "use an integer >= 0")


@dataclass(frozen=True, slots=True)
class LinkModel:
    """The path between the coordinator and one worker (each direction alike).

    Attributes:
        one_way_s: propagation, switching and stack latency of one packet, seconds.
        bandwidth_bytes_per_s: line rate of each device's port (the coordinator's port is shared
            by all its workers), bytes per second; ``None`` is infinitely fast.
        plr: probability that one packet is lost, per transmission, in ``[0, 1)``.
        jitter_s: extra delay per burst of frames, uniform in ``[0, jitter_s]``, seconds.
        rto_s: retransmission timeout of the reliable transport (strict), doubling per
            consecutive loss of a packet, seconds.
        rto_max_s: cap of the doubled timeout, seconds.
        fast_retransmit: the reliable transport recovers a lost packet followed by three more
            packets of the same burst one RTT after the third (duplicate ACKs, RFC 5681 §3.2);
            only tail losses and lost retransmissions wait for the RTO. ``False``: every loss
            waits for the RTO (the in-memory link's model).
        tail_probe_s: with a value, a tail loss (fewer than three packets after it) is recovered
            this long after the burst's last packet left, plus one RTT (RACK-TLP, RFC 8985:
            probe timeout ``2 SRTT``; Linux adds a 2-jiffy floor), and so is a lost retransmission
            (RACK detects those); ``None``: both wait for the RTO.
        packet_bytes: payload bytes per packet (aiortc SCTP user data: 1160).
        overhead_bytes: wire bytes per packet beyond the payload: Ethernet 38 (header, FCS,
            preamble, inter-frame gap), IPv4 20, UDP 8, DTLS 1.2 AES-GCM 29, SCTP 12 + 16 = 123.
    """

    one_way_s: float
    bandwidth_bytes_per_s: float | None = None
    plr: float = 0.0
    jitter_s: float = 0.0
    rto_s: float = 0.2
    rto_max_s: float = 60.0
    fast_retransmit: bool = False
    tail_probe_s: float | None = None
    packet_bytes: int = SCTP_FRAGMENT_BYTES
    overhead_bytes: int = 123

    def __post_init__(self) -> None:
        _check("LinkModel", "one_way_s", self.one_way_s)
        _check("LinkModel", "plr", self.plr, high=0.999)
        _check("LinkModel", "jitter_s", self.jitter_s)
        _check("LinkModel", "rto_s", self.rto_s, low=1e-6)
        _check("LinkModel", "rto_max_s", self.rto_max_s, low=self.rto_s)
        if self.tail_probe_s is not None:
            _check("LinkModel", "tail_probe_s", self.tail_probe_s)
        if self.bandwidth_bytes_per_s is not None:
            _check("LinkModel", "bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, low=1.0)
        if self.packet_bytes < 1 or self.overhead_bytes < 0:
            raise ConfigError("LinkModel packet sizes out of range", "use packet_bytes >= 1, overhead_bytes >= 0")

    @property
    def rtt_s(self) -> float:
        """Round-trip time of a small packet, seconds."""
        return 2 * self.one_way_s

    def wire_s(self, nbytes: int) -> float:
        """Seconds one packet of ``nbytes`` payload occupies a port (0 without a bandwidth)."""
        if self.bandwidth_bytes_per_s is None:
            return 0.0
        return (nbytes + self.overhead_bytes) / self.bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True)
class Cluster:
    """A coordinator and its workers.

    Attributes:
        coordinator: the device serving the prompt (trunk, classifier, and groups).
        workers: the worker devices, named ``w01``, ``w02``, ... in this order.
        links: the link of each worker to the coordinator.
        stack_on_compute: a device's network stack runs on the same CPU as its model compute,
            one job at a time in arrival order (the Python event loop and the compute threads
            share the Pi's cores, and distributed-llama's rate is measured with all four busy);
            ``False``: on a core of its own, in parallel with compute.
        shared_stack: every device's network stack is one CPU (an in-process emulation whose
            single event loop handles every peer's frames); implies a stack apart from compute.
        stack_per_message: the stack's CPU cost is per message, not per packet (an in-process
            emulation, where a reliable message is one Python call however many packets it spans).
        trunk_s: seconds the coordinator computes before each sync point's input goes out
            (RMSNorm and thread hand-offs; negligible natively).
    """

    coordinator: Device
    workers: tuple[Device, ...]
    links: tuple[LinkModel, ...]
    stack_on_compute: bool = True
    shared_stack: bool = False
    stack_per_message: bool = False
    trunk_s: float = 0.0

    def __post_init__(self) -> None:
        if len(self.workers) != len(self.links):
            raise ConfigError(f"{len(self.workers)} workers but {len(self.links)} links", "give one link per worker")
        _check("Cluster", "trunk_s", self.trunk_s)

    @property
    def n_devices(self) -> int:
        return 1 + len(self.workers)

    @property
    def worker_ids(self) -> list[str]:
        return [f"w{i + 1:02d}" for i in range(len(self.workers))]

    def with_plr(self, plr: float, lossy: Sequence[int] | None = None) -> Cluster:
        """The same cluster with packet loss ``plr`` on the links of workers ``lossy`` (indices;
        default every worker) and lossless links elsewhere."""
        chosen = set(range(len(self.links)) if lossy is None else lossy)
        links = tuple(replace(link, plr=plr if i in chosen else 0.0) for i, link in enumerate(self.links))
        return replace(self, links=links)

    def peer_models(self) -> list[PeerModel]:
        """The scheduler's view: coordinator first, then the workers with their link's RTT and PLR.

        The RTT includes the wire time of one full packet each way; jitter is reported as its
        mean absolute deviation (a uniform ``[0, J]`` delay deviates ``J / 4`` on average).
        """
        c = self.coordinator
        out = [PeerModel(COORDINATOR_ID, c.seconds_per_param * 1e9, c.memory_bytes, is_coordinator=True)]
        for pid, dev, link in zip(self.worker_ids, self.workers, self.links, strict=True):
            rtt = link.rtt_s + 2 * link.wire_s(link.packet_bytes)
            out.append(PeerModel(pid, dev.seconds_per_param * 1e9, dev.memory_bytes, rtt_ms=rtt * 1e3,
                                 jitter_ms=link.jitter_s * 250.0, plr=link.plr))
        return out


def rpi4b(*, stack: StackCost = RPI4_STACK, memory_bytes: int = 6 << 30) -> Device:
    """Raspberry Pi 4B 8 GB at distributed-llama's measured rate (6 GiB for weights by default).

    1312.50 ms/token for Llama 2 7B on one node (Q40, 4 threads) over its 6.607e9 matrix-vector
    parameters: 1.99e-10 s per parameter (0.199 s per billion). ``stack``: halo-p2p's Python stack
    on a Pi 4B core (:data:`~halo_p2p.testbed.sim.cpu.RPI4_STACK`).
    """
    return Device("rpi4b", 1.3125 / LLAMA2_7B.matvec_params, memory_bytes, stack)


def rpi5(*, stack: StackCost = RPI5_STACK, memory_bytes: int = 6 << 30) -> Device:
    """Raspberry Pi 5 8 GB at distributed-llama's measured rate (6 GiB for weights by default).

    564 ms/token for Llama 3 8B on one node (Q40, 4 threads) over its 7.505e9 matrix-vector
    parameters: 7.52e-11 s per parameter. ``stack``: :data:`~halo_p2p.testbed.sim.cpu.RPI5_STACK`.
    """
    return Device("rpi5", 0.564 / LLAMA3_8B.matvec_params, memory_bytes, stack)


def gbe_link(plr: float = 0.0, *, rto_s: float = 0.2, jitter_s: float = 1e-4, linux_tcp: bool = False) -> LinkModel:
    """1 GbE through one switch: 125 MB/s per port, 0.0865 ms one way (0.173 ms ping RTT), up to
    0.1 ms of jitter per burst (p95 minus median of a 1 KB round trip, ``network-facts.md`` §2).

    ``linux_tcp``: the reliable transport also has SACK fast retransmit and RACK-TLP tail loss
    probes (probe timeout ``2 * RTT + 2 ms``, Linux's floor at HZ=1000); otherwise every lost
    packet waits for the RTO, as the brief and the in-memory link model strict.
    """
    one_way = 86.5e-6
    return LinkModel(one_way_s=one_way, bandwidth_bytes_per_s=125e6, plr=plr, jitter_s=jitter_s, rto_s=rto_s,
                     fast_retransmit=linux_tcp, tail_probe_s=4 * one_way + 2e-3 if linux_tcp else None)


def uniform_cluster(device: Device, n_devices: int, link: LinkModel, *, lossy: Sequence[int] | None = None,
                    stack_on_compute: bool = True) -> Cluster:
    """``n_devices`` identical devices (one coordinator, ``n_devices - 1`` workers).

    Args:
        device: every device's model.
        n_devices: devices including the coordinator, ``>= 1``.
        link: every worker's link; its ``plr`` applies to the workers in ``lossy`` (indices;
            default all), the others are lossless.
        stack_on_compute: see :attr:`Cluster.stack_on_compute`.

    Raises:
        ConfigError: ``n_devices < 1``.
    """
    if n_devices < 1:
        raise ConfigError(f"{n_devices} devices", "use at least one device")
    cluster = Cluster(device, (device,) * (n_devices - 1), (link,) * (n_devices - 1), stack_on_compute)
    return cluster.with_plr(link.plr, lossy)


class Port:
    """A FIFO server (a device's egress or ingress port, or its compute): one job at a time.

    Attributes:
        free_at: time the last accepted job ends (seconds).
    """

    __slots__ = ("free_at",)

    def __init__(self) -> None:
        self.free_at = 0.0

    def serve(self, arrival: float, service: float) -> float:
        """Accept a job arriving at ``arrival`` that needs ``service`` seconds; return its end."""
        start = arrival if arrival > self.free_at else self.free_at
        self.free_at = start + service
        return self.free_at


class ReliableStream:
    """In-order delivery on one direction of a reliable channel (TCP, SCTP ordered).

    A message is complete when its last packet arrived; it is delivered when it and every
    message sent before it on the stream are complete (head-of-line blocking).
    """

    __slots__ = ("_done", "_handlers", "_next", "_sent", "last_at")

    def __init__(self) -> None:
        self._sent = 0                     # messages opened so far
        self._next = 0                     # next message to deliver
        self._done: dict[int, float] = {}
        self._handlers: dict[int, object] = {}
        self.last_at = 0.0                 # time of the latest delivery (seconds)

    def open(self, handler: object = None) -> int:
        """Register a message sent now (in send order) and what to do on delivery; its number."""
        seq = self._sent
        self._sent += 1
        self._handlers[seq] = handler
        return seq

    def complete(self, seq: int, at: float) -> list[tuple[object, float]]:
        """Message ``seq`` has all its packets at ``at``; the ``(handler, time)`` of the messages
        delivered by it, in order (empty while an earlier message is incomplete)."""
        self._done[seq] = at
        out = []
        while self._next in self._done:
            at = max(self._done.pop(self._next), self.last_at)
            self.last_at = at
            out.append((self._handlers.pop(self._next), at))
            self._next += 1
        return out


def mlp_scores(layout: GroupLayout, seed: int = 0) -> np.ndarray:
    """Synthetic static MLP scores ``(n_layers, n_mlp)``: log-normal (sigma 0.5), seeded. They stand
    in for :func:`~halo_p2p.model.shard.mlp_group_scores` of a model whose weights are not at hand."""
    return np.random.default_rng(seed).lognormal(0.0, 0.5, (layout.n_layers, layout.n_mlp))


def place(shape: ModelShape, cluster: Cluster, *, mode: str, scores: np.ndarray, critical_fraction: float = 0.5,
          bytes_per_param: float = Q40_BYTES_PER_PARAM, wire_dtype: str = "q8_0", fec: bool = True,
          deadline_k: float = 4.0, deadline_floor_s: float = 0.002, stack_aware: bool = False,
          plan: PlacementPlan | None = None) -> Schedule:
    """The scheduler's placement of ``shape`` on ``cluster`` (or ``plan``, scored by its cost model).

    Statistics: :meth:`GroupStats.from_mlp_scores` with ``critical_fraction`` in ``halo``, every
    group critical in ``strict`` and ``strict-unreliable`` (what each mode waits for). The
    coordinator's fixed memory is the embeddings and the classifier; the peers' rates, budgets,
    RTT and PLR come from :meth:`Cluster.peer_models`; the frames from ``wire_dtype`` (parity on
    lossy links when ``fec``). ``stack_aware``: the cost model also knows the network stack's CPU
    (the coordinator's :attr:`Device.stack`, taken for every device); off by default, as in the
    node (``halo_p2p.node.swarm`` schedules with ``SchedulerConfig``'s free stack).
    """
    layout = shape.layout()
    stats = GroupStats.from_mlp_scores(layout, scores, critical_fraction if mode == "halo" else 1.0)
    st = cluster.coordinator.stack
    settings: dict[str, Any] = {
                "bytes_per_param": bytes_per_param, "deadline_k": deadline_k, "deadline_floor_s": deadline_floor_s,
                "wire_dtype": wire_dtype, "n_parity": 1 if fec and mode != "strict" else 0}
    if stack_aware:
        settings.update(frame_tx_cpu_s=st.frame_tx_s, frame_rx_cpu_s=st.frame_rx_s, vector_tx_cpu_s=st.vector_tx_s,
                        vector_rx_cpu_s=st.vector_rx_s, sync_cpu_s=st.sync_s)
    if plan is not None:
        return evaluate_plan(plan, cluster.peer_models(), stats, SchedulerConfig(**settings))
    trunk = shape.classifier_params * (1 if shape.tied_embeddings else 2)
    return schedule_for_layout(layout, cluster.peer_models(), stats=stats,
                               coordinator_fixed_bytes=int(trunk * bytes_per_param), **settings)
