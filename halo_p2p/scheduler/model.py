"""The scheduler's inputs and outputs, and the node's adapter (pure: no I/O, no asyncio, no torch).

* :class:`PeerModel`: one peer's compute rate, memory budget and link (RTT, jitter, PLR).
* :class:`GroupStats`: per group, its mean importance and its probability of being critical.
* :class:`SchedulerConfig`: bytes per parameter, fixed coordinator bytes, cost-model settings.
* :class:`Schedule` and :class:`PeerLoad`: a placement with its predicted cost, per peer.
* :func:`peer_models_from`: :class:`~halo_p2p.discovery.info.PeerInfo` records and
  :class:`~halo_p2p.net.link.LinkStats` -> :class:`PeerModel` s.

The cost model itself is :mod:`halo_p2p.scheduler.cost`.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN, MLP, PARTS, GroupLayout
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler.frames import wire_chunk_elems
from halo_p2p.wire.messages import WIRE_DTYPES

__all__ = [
    "UNLIMITED_BYTES",
    "GroupStats",
    "PeerLoad",
    "PeerModel",
    "Schedule",
    "SchedulerConfig",
    "peer_models_from",
]

log = logging.getLogger(__name__)

UNLIMITED_BYTES = sys.maxsize
"""Memory budget standing for "unknown / unlimited" (bytes)."""


def _real(owner: str, name: str, value: object, low: float = 0.0, high: float = math.inf) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:  # type: ignore[operator]  # value is object: ok means it is a real number
        raise ConfigError(f"{owner}.{name} = {value!r} is out of range",
                          f"use a finite number in [{low}, {high}]")
    return float(value)  # type: ignore[arg-type]  # value is object: ok means it is a real number


@dataclass(frozen=True, slots=True)
class PeerModel:
    """What the scheduler knows about one peer.

    Attributes:
        peer_id: the peer's id.
        seconds_per_gparam: seconds to do one billion weight parameters of matrix-vector work
            for one token (two FLOP per parameter; see :meth:`from_gflops`), ``>= 0``.
        memory_budget_bytes: bytes the peer may use for group weights (and KV caches),
            ``>= 0``; :data:`UNLIMITED_BYTES` if unknown.
        rtt_ms: round-trip time to the coordinator in milliseconds (ignored for the coordinator).
        jitter_ms: round-trip time variation in milliseconds (ignored for the coordinator).
        plr: packet-loss rate of the link to the coordinator, in ``[0, 1]`` (ignored for the
            coordinator).
        is_coordinator: this peer serves the prompt; exactly one peer per schedule.

    Raises:
        ConfigError: a field is out of range.
    """

    peer_id: str
    seconds_per_gparam: float
    memory_budget_bytes: int
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    plr: float = 0.0
    is_coordinator: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ConfigError(f"PeerModel.peer_id = {self.peer_id!r} is invalid", "use a non-empty string")
        _real("PeerModel", "seconds_per_gparam", self.seconds_per_gparam)
        _real("PeerModel", "rtt_ms", self.rtt_ms)
        _real("PeerModel", "jitter_ms", self.jitter_ms)
        _real("PeerModel", "plr", self.plr, high=1.0)
        budget = self.memory_budget_bytes
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ConfigError(f"PeerModel.memory_budget_bytes = {budget!r} is invalid",
                              "use an integer number of bytes >= 0")

    @classmethod
    def from_gflops(cls, peer_id: str, gflops: float, memory_budget_bytes: int, **kwargs: Any) -> PeerModel:
        """A peer computing ``gflops`` GFLOP/s: ``seconds_per_gparam = 2 / gflops``.

        A matrix-vector product does one multiply and one add per weight, so a billion
        parameters cost 2 GFLOP. ``kwargs`` are the other fields.

        Raises:
            ConfigError: ``gflops`` is not a positive finite number.
        """
        if not isinstance(gflops, int | float) or not math.isfinite(gflops) or gflops <= 0:
            raise ConfigError(f"compute rate {gflops!r} GFLOP/s of peer {peer_id!r} is invalid",
                              "measure the peer's rate or give a positive default")
        return cls(peer_id, 2.0 / gflops, memory_budget_bytes, **kwargs)


@dataclass(frozen=True, eq=False)
class GroupStats:
    """Per-group statistics of criticality, from a predictor or a default.

    Attributes:
        importance: part -> ``(n_layers, n_groups(part))`` float array, ``>= 0``: the mean
            predicted importance of each group (e.g. the mean norm of its partial).
        p_critical: part -> same-shape array in ``[0, 1]``: probability that the group is among
            the critical ones of a token.

    Raises:
        ConfigError: a missing part, a wrong shape, or values out of range.
    """

    importance: Mapping[int, np.ndarray]
    p_critical: Mapping[int, np.ndarray]

    def __post_init__(self) -> None:
        shapes = {part: self.importance[part].shape for part in PARTS if part in self.importance}
        for name, arrays, high in (("importance", self.importance, math.inf), ("p_critical", self.p_critical, 1.0)):
            fixed = {}
            for part in PARTS:
                if part not in arrays:
                    raise ConfigError(f"GroupStats.{name} misses part {part}", "give arrays for ATTN and MLP")
                a = np.array(arrays[part], dtype=np.float64)
                if a.ndim != 2 or a.shape != shapes.get(part) or not np.all(np.isfinite(a)) \
                        or a.min(initial=0.0) < 0 or a.max(initial=0.0) > high:
                    raise ConfigError(f"GroupStats.{name}[{part}] has shape {a.shape} or values out of "
                                      f"[0, {high}]", "give finite (n_layers, n_groups) arrays in range")
                a.setflags(write=False)
                fixed[part] = a
            object.__setattr__(self, name, fixed)

    @classmethod
    def default(cls, layout: GroupLayout, mlp_critical_fraction: float = 0.5) -> GroupStats:
        """No predictor yet: attention groups are always critical, MLP groups uniformly likely.

        Every group has importance 1; MLP groups are critical with probability
        ``mlp_critical_fraction`` (the share :class:`~halo_p2p.session.criticality.StaticRule`
        marks critical).
        """
        p = _real("GroupStats", "mlp_critical_fraction", mlp_critical_fraction, high=1.0)
        shape = {part: (layout.n_layers, layout.n_groups(part)) for part in PARTS}
        return cls({part: np.ones(shape[part]) for part in PARTS},
                   {ATTN: np.ones(shape[ATTN]), MLP: np.full(shape[MLP], p)})

    @classmethod
    def from_mlp_scores(cls, layout: GroupLayout, mlp_scores: np.ndarray, fraction: float = 0.5) -> GroupStats:
        """Statistics matching :class:`~halo_p2p.session.criticality.StaticRule`.

        The top ``fraction`` of each layer's MLP groups by ``mlp_scores`` ``(n_layers, n_mlp)``
        are critical (``p_critical = 1``), the rest never (``0``); MLP importance is the score,
        attention groups are critical with importance equal to the largest score of their layer.
        """
        scores = np.asarray(mlp_scores, dtype=np.float64)
        if scores.shape != (layout.n_layers, layout.n_mlp):
            raise ConfigError(f"MLP scores of shape {scores.shape}, layout needs {(layout.n_layers, layout.n_mlp)}",
                              "compute the scores for this model's layout")
        k = round(_real("GroupStats", "fraction", fraction, high=1.0) * layout.n_mlp)
        order = np.argsort(-scores, axis=1, kind="stable")
        p_mlp = np.zeros_like(scores)
        np.put_along_axis(p_mlp, order[:, :k], 1.0, axis=1)
        top = scores.max(axis=1, keepdims=True) if layout.n_mlp else np.ones((layout.n_layers, 1))
        attn = np.repeat(top, layout.n_attn, axis=1)
        return cls({ATTN: attn, MLP: scores}, {ATTN: np.ones_like(attn), MLP: p_mlp})

    def check(self, layout: GroupLayout) -> None:
        """Raise :class:`ConfigError` unless the arrays fit ``layout``."""
        for part in PARTS:
            if self.importance[part].shape != (layout.n_layers, layout.n_groups(part)):
                raise ConfigError(f"group statistics of shape {self.importance[part].shape} for part {part}, "
                                  f"layout has {(layout.n_layers, layout.n_groups(part))}",
                                  "build the statistics for this model's layout")


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Settings of the cost model and the search.

    Attributes:
        bytes_per_param: resident bytes per weight parameter (float32 = 4, float16 = 2).
        coordinator_fixed_bytes: bytes the coordinator needs besides its groups (embeddings,
            norms, classifier), counted against its budget.
        kv_cache_tokens: tokens of KV cache per attention group to count against memory
            (``2 * head_dim * tokens * bytes_per_param`` bytes per group); 0 ignores caches.
        quality_weight_s: seconds of TPOT worth losing all of a token's importance; the
            objective is ``TPOT + quality_weight_s * lost_importance / total_importance``.
        jitter_weight: jitter margins added to a worker's loss-free arrival.
        deadline_k: deviations of slack in the run-time deadline (RFC 6298's 4), also the
            wait (in jitters) when a partial is lost or late.
        deadline_slack: relative slack of the initial deadline over the expected response.
        deadline_floor_s: smallest deadline (seconds), as in ``SessionOptions``.
        wire_dtype: activation format on the wire (``Plan.wire_dtype``): ``"q8_0"`` (default),
            ``"float16"`` or ``"float32"``; sets the three fields below when they are ``None``.
        wire_bytes_per_elem: bytes per activation element on the wire (Q8_0: 34 / 32 = 1.0625).
        input_chunk_elems, partial_chunk_elems: elements per LayerInput / Partial frame on the
            unreliable channel (one SCTP packet): ``codec.payload_budget`` of the real frame
            templates (``session.frames``; a worker answering for 8 groups, norms included),
            rounded down to whole units (Q8_0 blocks); 1024 and 1024 for Q8_0.
        n_parity: fewest XOR parity chunks per vector on a lossy link; a vector of ``n`` data
            chunks gets ``min(n, max(n_parity, ceil(n / 4)))`` (``wire.vector.default_parity``
            for 1); 0 disables FEC. Links with PLR 0 get none (the session sends parity only
            where heartbeats measured loss).
        frame_tx_cpu_s, frame_rx_cpu_s, vector_tx_cpu_s, vector_rx_cpu_s, sync_cpu_s: CPU
            seconds of the network stack (every peer alike) per frame sent / received, per
            vector sent / received and per sync point a peer takes part in
            (``halo_p2p.testbed.sim.cpu.StackCost``); the coordinator spends them for every worker it
            waits for, serially with its own compute. 0 (default): a free stack.
        max_recovery_attempts: cap of the expected Resend attempts ``P/(1-P)``.
        improve_rounds: local-improvement rounds per sync point.

    Raises:
        ConfigError: a value out of range.
    """

    bytes_per_param: float = 4.0
    coordinator_fixed_bytes: int = 0
    kv_cache_tokens: int = 0
    quality_weight_s: float = 1.0
    jitter_weight: float = 1.0
    deadline_k: float = 4.0
    deadline_slack: float = 0.5
    deadline_floor_s: float = 0.002
    wire_dtype: str = "q8_0"
    wire_bytes_per_elem: float | None = None
    input_chunk_elems: int | None = None
    partial_chunk_elems: int | None = None
    n_parity: int = 1
    frame_tx_cpu_s: float = 0.0
    frame_rx_cpu_s: float = 0.0
    vector_tx_cpu_s: float = 0.0
    vector_rx_cpu_s: float = 0.0
    sync_cpu_s: float = 0.0
    max_recovery_attempts: float = 100.0
    improve_rounds: int = 8

    def __post_init__(self) -> None:
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"SchedulerConfig.wire_dtype = {self.wire_dtype!r} is unknown",
                              f"use one of {', '.join(WIRE_DTYPES)}")
        derived = wire_chunk_elems(self.wire_dtype)
        for name, value in zip(("wire_bytes_per_elem", "input_chunk_elems", "partial_chunk_elems"), derived,
                               strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("bytes_per_param", "quality_weight_s", "jitter_weight", "deadline_k", "deadline_slack",
                     "deadline_floor_s", "max_recovery_attempts", "frame_tx_cpu_s", "frame_rx_cpu_s",
                     "vector_tx_cpu_s", "vector_rx_cpu_s", "sync_cpu_s"):
            _real("SchedulerConfig", name, getattr(self, name))
        _real("SchedulerConfig", "wire_bytes_per_elem", self.wire_bytes_per_elem, low=1e-3)
        for name, low in (("coordinator_fixed_bytes", 0), ("kv_cache_tokens", 0),
                          ("input_chunk_elems", 1), ("partial_chunk_elems", 1), ("n_parity", 0),
                          ("improve_rounds", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"SchedulerConfig.{name} = {value!r} is invalid", f"use an integer >= {low}")

    def group_bytes(self, layout: GroupLayout, part: int) -> int:
        """Resident bytes of one group of ``part`` (weights, plus KV cache for attention)."""
        extra = 2 * layout.head_dim * self.kv_cache_tokens * self.bytes_per_param if part == ATTN else 0
        return math.ceil(layout.group_params(part) * self.bytes_per_param + extra)


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """One peer's share of a schedule (per token where a time).

    Attributes:
        groups: groups held; attn_groups, mlp_groups: of which attention / MLP.
        params: weight parameters held.
        memory_bytes: resident bytes (groups, plus the fixed bytes on the coordinator).
        budget_bytes: the peer's memory budget.
        compute_s: seconds of group compute per token.
        comm_s: seconds per token of round trips, jitter margins and expected loss waits.
        lost_importance: expected importance lost per token at this peer.
        deadline_s: initial deadline per part (ATTN, MLP) in seconds (0 where it holds none).
    """

    groups: int
    attn_groups: int
    mlp_groups: int
    params: int
    memory_bytes: int
    budget_bytes: int
    compute_s: float
    comm_s: float
    lost_importance: float
    deadline_s: tuple[float, float]


@dataclass(frozen=True, eq=False)
class Schedule:
    """A placement with its predicted cost.

    Attributes:
        plan: the placement (validated).
        deadline_s: worker peer id -> initial deadline for its ``ResponseTimer`` (seconds), for
            every worker holding groups.
        expected_tpot_s: predicted seconds per token spent in the ``2 * n_layers`` sync points.
        expected_lost_importance: predicted importance lost per token (non-critical partials
            lost or late).
        objective: ``expected_tpot_s + quality_weight_s * lost / total importance``.
        breakdown: peer id -> :class:`PeerLoad`, every peer of the plan.
        sync_s: ``(n_layers, 2)`` predicted seconds of each sync point.
    """

    plan: PlacementPlan
    deadline_s: Mapping[str, float]
    expected_tpot_s: float
    expected_lost_importance: float
    objective: float
    breakdown: Mapping[str, PeerLoad]
    sync_s: np.ndarray = field(repr=False)

    def over_budget(self) -> list[str]:
        """Peers whose memory use exceeds their budget (never for a plan made by the scheduler)."""
        return [p for p, load in self.breakdown.items() if load.memory_bytes > load.budget_bytes]

    def shares(self) -> dict[str, float]:
        """Fraction of the groups' weight parameters per peer."""
        total = sum(load.params for load in self.breakdown.values()) or 1
        return {p: load.params / total for p, load in self.breakdown.items()}


def peer_models_from(infos: Iterable[Any], link_stats: Mapping[str, Any], *, coordinator: str,
                     default_gflops: float | None = None, default_rtt_ms: float = 1.0,
                     default_plr: float = 0.0, unknown_memory_bytes: int = UNLIMITED_BYTES) -> list[PeerModel]:
    """Build :class:`PeerModel` s from discovery records and link measurements (the node's adapter).

    Args:
        infos: :class:`~halo_p2p.discovery.info.PeerInfo` records of every peer taking part,
            the coordinator's own included (read: ``peer_id``, ``compute_gflops``,
            ``memory_budget_bytes``, ``static``).
        link_stats: worker peer id -> :class:`~halo_p2p.net.link.LinkStats` of the link to it
            (read: ``rtt_ms``, ``jitter_ms``, ``measured_plr``, each ``None`` until measured).
        coordinator: the coordinator's peer id (its link fields are ignored).
        default_gflops: rate of peers announcing 0 (not measured); ``None``: the median of the
            measured peers, or 1 GFLOP/s if none is measured.
        default_rtt_ms, default_plr: link values used until measured (jitter defaults to 0).
        unknown_memory_bytes: budget of static placeholders (their budget is unknown, announced
            as 0); a non-static peer announcing 0 offers no memory and holds no groups.

    Returns:
        The models in the order of ``infos``.

    Raises:
        ConfigError: ``coordinator`` is not among ``infos``, or a value is out of range.
    """
    infos = list(infos)
    if coordinator not in {i.peer_id for i in infos}:
        raise ConfigError(f"coordinator {coordinator!r} has no PeerInfo", "pass the coordinator's own record")
    measured = [float(i.compute_gflops) for i in infos if i.compute_gflops > 0]
    fallback = default_gflops or (statistics.median(measured) if measured else 1.0)
    out = []
    for info in infos:
        gflops = float(info.compute_gflops) if info.compute_gflops > 0 else fallback
        budget = unknown_memory_bytes if getattr(info, "static", False) and not info.memory_budget_bytes \
            else int(info.memory_budget_bytes)
        if info.compute_gflops <= 0:
            log.info("peer %s announces no compute rate: assuming %.1f GFLOP/s", info.peer_id, gflops)
        if info.peer_id == coordinator:
            out.append(PeerModel.from_gflops(info.peer_id, gflops, budget, is_coordinator=True))
            continue
        ls = link_stats.get(info.peer_id)

        def val(name: str, default: float, ls: Any = ls) -> float:
            v = getattr(ls, name, None) if ls is not None else None
            return default if v is None else float(v)

        out.append(PeerModel.from_gflops(info.peer_id, gflops, budget, rtt_ms=val("rtt_ms", default_rtt_ms),
                                         jitter_ms=val("jitter_ms", 0.0), plr=val("measured_plr", default_plr)))
    return out
