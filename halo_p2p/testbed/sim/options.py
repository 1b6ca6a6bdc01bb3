"""The settings and results of a simulation (:func:`halo_p2p.testbed.sim.des.simulate`).

Pure module: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from halo_p2p.errors import ConfigError
from halo_p2p.scheduler import Schedule
from halo_p2p.testbed.sim.cluster import Q40_BYTES_PER_PARAM
from halo_p2p.wire.messages import SYNC_MODES, WIRE_DTYPES

__all__ = ["SimOptions", "SimResult", "SyncTrace"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimOptions:
    """Settings of one simulation (defaults: ``SessionOptions`` and the coordinator's constants).

    Attributes:
        mode: ``"strict"``, ``"strict-unreliable"`` or ``"halo"``.
        tokens: decoded tokens simulated; TPOT is their mean.
        seed: seeds packet loss, jitter and the synthetic MLP scores.
        critical_fraction: share of each layer's MLP groups halo waits for (top by score;
            attention groups always), as :class:`StaticRule` and the scheduler assume.
        wire_dtype: activation format on the wire (``SessionOptions.wire_dtype``).
        fec: XOR parity on links with loss (``SessionOptions.fec``; unreliable modes).
        bytes_per_param: resident bytes per weight for the scheduler's memory budgets (Q40).
        deadline_k, deadline_floor_s: :class:`ResponseTimer` slack (deviations) and floor (s).
        initial_deadline_s: deadline before three responses are measured (s; ``SessionOptions``'
            0.5); ``None``: the scheduler's per-worker ``deadline_s``.
        stack_aware: the scheduler's cost model knows the network stack's CPU (off: as the node
            schedules today, :func:`~halo_p2p.testbed.sim.cluster.place`).
        resend_interval_s, silence_gap_s: the coordinator's Resend pacing and silent gap (s).
        input_gap_s: a worker's wait for missing input chunks before ``NeedInput`` (s).
        drops: packets to lose, ``(token, layer, part, worker id, "in" | "out", index)``: the
            input to that worker or its answer, index = position of the packet in that send; a
            key listed twice also loses the packet in the next send of that direction
            (hand-computed scenarios; on top of the links' PLR).
        trace: keep a :class:`SyncTrace` per sync point.
        max_token_s: stop when one token has taken this long (simulated seconds): a resend storm
            or a saturated port makes the run diverge; the result is then marked ``diverged``.
    """

    mode: str = "halo"
    tokens: int = 64
    seed: int = 0
    critical_fraction: float = 0.5
    wire_dtype: str = "q8_0"
    fec: bool = True
    bytes_per_param: float = Q40_BYTES_PER_PARAM
    deadline_k: float = 4.0
    deadline_floor_s: float = 0.002
    initial_deadline_s: float | None = 0.5
    stack_aware: bool = False
    resend_interval_s: float = 0.005
    silence_gap_s: float = 0.02
    input_gap_s: float = 0.02
    drops: tuple[tuple[int, int, int, str, str, int], ...] = ()
    trace: bool = False
    max_token_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in SYNC_MODES or self.wire_dtype not in WIRE_DTYPES or self.tokens < 1 \
                or not 0 <= self.critical_fraction <= 1 or not self.max_token_s > 0:
            raise ConfigError(f"bad simulation options: mode {self.mode!r}, wire {self.wire_dtype!r}, {self.tokens} "
                              f"tokens, critical fraction {self.critical_fraction}",
                              f"use a mode of {', '.join(SYNC_MODES)}, tokens >= 1, a fraction in [0, 1]")


@dataclass(frozen=True, slots=True)
class SyncTrace:
    """One sync point: when its input went out, when the coordinator moved on, and when each remote
    group's answer (its worker's) became complete (seconds; absent: never)."""

    token: int
    layer: int
    part: int
    sent_at_s: float
    closed_at_s: float
    group_done_s: dict[int, float]


@dataclass(frozen=True, slots=True)
class SimResult:
    """What a simulation measured (counts are means per token).

    Attributes:
        mode: the sync mode.
        token_s: seconds of each token, in order.
        compute_s: loss-free compute on the critical path of a token (slowest holder of each sync
            point, plus the classifier), seconds.
        skipped_groups: remote groups not summed (their worker's answer was incomplete).
        lost_importance: share of a token's total group importance that was skipped.
        resends, need_inputs: Resend / NeedInput messages (unreliable modes).
        retransmissions: packet retransmissions (strict).
        late_chunks: answer packets that arrived after the coordinator moved on.
        schedule: the placement, with the scheduler's own prediction.
        predicted_lost_importance: the scheduler's expected lost importance as a share of a
            token's total.
        diverged: a token exceeded ``max_token_s``: ``token_s`` holds the tokens done and the
            unfinished one's elapsed time (a lower bound).
        traces: one per sync point, if asked for.
        stack_s: CPU seconds per token the devices' network stacks spent (all devices).
        frames: packets sent per token, both ways (retransmissions not counted).
    """

    mode: str
    token_s: tuple[float, ...]
    compute_s: float
    skipped_groups: float
    lost_importance: float
    resends: float
    need_inputs: float
    retransmissions: float
    late_chunks: float
    schedule: Schedule
    predicted_lost_importance: float = 0.0
    diverged: bool = False
    traces: tuple[SyncTrace, ...] = ()
    stack_s: float = 0.0
    frames: float = 0.0

    @property
    def tpot_s(self) -> float:
        """Mean seconds per output token."""
        return float(np.mean(self.token_s))

    def as_dict(self) -> dict[str, float | str | bool]:
        """JSON-ready summary (milliseconds where a time)."""
        return {"mode": self.mode, "tpot_ms": 1e3 * self.tpot_s, "compute_ms": 1e3 * self.compute_s,
                "tpot_p95_ms": 1e3 * float(np.percentile(self.token_s, 95)), "skipped_groups": self.skipped_groups,
                "lost_importance": self.lost_importance, "resends": self.resends, "need_inputs": self.need_inputs,
                "retransmissions": self.retransmissions, "late_chunks": self.late_chunks,
                "stack_ms": 1e3 * self.stack_s, "frames": self.frames,
                "workers_used": len(self.schedule.deadline_s),
                "scheduler_tpot_ms": 1e3 * self.schedule.expected_tpot_s,
                "scheduler_lost_importance": self.predicted_lost_importance, "diverged": self.diverged}
