"""What a session measures and records: response times (-> deadlines), each step's sync points,
and the re-plans of a split model (:class:`ReplanEvent`).

Pure: no I/O, no clock reads (times are passed in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["ReplanEvent", "ResponseTimer", "StepRecord", "SyncRecord", "mean_recall"]


class ResponseTimer:
    """Estimates one peer's response time at one sync point and derives its deadline.

    The estimator is TCP's retransmission-timer estimator (RFC 6298, section 2): smoothed mean
    ``srtt`` and mean deviation ``rttvar`` of the time from sending a layer input to receiving
    the peer's last partial; the deadline is ``srtt + k * rttvar``, at least ``floor_s``. Until
    ``warmup`` samples arrived the deadline is ``initial_s``.

    Args:
        initial_s: deadline before enough samples (seconds).
        k: deviations of slack (RFC 6298 uses 4).
        floor_s: smallest deadline (seconds).
    """

    ALPHA, BETA = 1 / 8, 1 / 4   # RFC 6298 gains

    # Karn's algorithm (RFC 6298 section 3): responses that needed a Resend or a repeated input
    # are not sampled, or recovery delays would inflate the deadline.

    def __init__(self, *, initial_s: float = 0.5, k: float = 4.0, floor_s: float = 0.002,
                 warmup: int = 3) -> None:
        self.initial_s, self.k, self.floor_s, self.warmup = initial_s, k, floor_s, warmup
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0
        self.backoff_factor = 1.0     # RFC 6298 5.5: doubled per expiry, reset by a clean sample

    def observe(self, sample_s: float) -> None:
        """Add one measured response time (seconds)."""
        if not math.isfinite(sample_s) or sample_s < 0:
            return
        self.backoff_factor = 1.0
        if self.srtt is None:
            self.srtt, self.rttvar = sample_s, sample_s / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - sample_s)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * sample_s
        self.samples += 1

    def deadline_s(self) -> float:
        """How long after sending to wait for this peer's non-critical partials (seconds)."""
        if self.srtt is None or self.samples < self.warmup:
            return self.initial_s * self.backoff_factor
        return max(self.floor_s, self.srtt + self.k * self.rttvar) * self.backoff_factor

    def backoff(self, cap: float = 64.0) -> None:
        """The deadline expired before the response (RFC 6298 section 5.5): double it until a
        response arrives in time and gives a clean sample (Karn's algorithm blocks the others,
        so without this a deadline below the true response time would never recover)."""
        self.backoff_factor = min(cap, 2 * self.backoff_factor)


@dataclass(slots=True)
class SyncRecord:
    """What happened at one sync point (for ``--json`` and the chat status line).

    Attributes:
        layer, part: the sync point.
        wait_s: time from sending the input to moving on (seconds).
        used: groups whose whole partial was summed.
        partial: groups of which only some chunks were summed.
        missing: groups of which nothing arrived in time.
        late: chunks that arrived after the coordinator moved on.
        resends: Resend requests sent for critical groups.
        critical: critical groups at this point.
        taken_over: critical MLP groups of unstable peers computed by the coordinator instead.
        recovered: answer chunks rebuilt from uplink parity (FEC).
        recall: share of the truly top-k groups (k = ``critical``, by partial norm) the policy
            marked critical; None when not measured (strict, prompts, all critical, skips).
    """

    layer: int
    part: int
    wait_s: float = 0.0
    used: int = 0
    partial: int = 0
    missing: int = 0
    late: int = 0
    resends: int = 0
    critical: int = 0
    recovered: int = 0
    recall: float | None = None
    taken_over: int = 0
    skipped_groups: list[int] = field(default_factory=list)


def mean_recall(records: Iterable[SyncRecord | StepRecord]) -> float | None:
    """Mean ``recall`` of the records that measured one (None if none did)."""
    got = [r.recall for r in records if r.recall is not None]
    return sum(got) / len(got) if got else None


@dataclass(slots=True)
class StepRecord:
    """One forward pass (a decoded token, or a prompt): its sync points.

    Attributes:
        step: the pass's number in its session (1 = the session's first).
        start_pos, n_tokens: the positions it computed.
        syncs: its sync points, in order.
        session: the session that computed it (a re-plan starts a new one; 0: not set).
        wall_s: wall time of the whole pass as the engine saw it, in seconds: its sync points'
            waits plus everything else, including a lost peer's detection and the re-plan
            and replay it caused (None until the engine sets it).
    """

    step: int
    start_pos: int
    n_tokens: int
    syncs: list[SyncRecord] = field(default_factory=list)
    session: int = 0
    wall_s: float | None = None

    @property
    def wait_s(self) -> float:
        return sum(s.wait_s for s in self.syncs)

    @property
    def skipped(self) -> int:
        """Groups not (fully) summed: missing or partial."""
        return sum(s.missing + s.partial for s in self.syncs)

    @property
    def recall(self) -> float | None:
        """Mean criticality recall over the sync points where it was measured (see :class:`SyncRecord`)."""
        return mean_recall(self.syncs)

    @property
    def late(self) -> int:
        return sum(s.late for s in self.syncs)

    def as_dict(self) -> dict[str, object]:
        return {
            "step": self.step, "session": self.session, "start_pos": self.start_pos, "n_tokens": self.n_tokens,
            "wall_ms": None if self.wall_s is None else 1000 * self.wall_s,
            "wait_ms": 1000 * self.wait_s, "skipped_groups": self.skipped, "late_chunks": self.late,
            "resends": sum(s.resends for s in self.syncs),
            "taken_over": sum(s.taken_over for s in self.syncs),
            "recovered_chunks": sum(s.recovered for s in self.syncs),
            "criticality_recall": self.recall,
            "skipped": [[s.layer, s.part, g] for s in self.syncs for g in s.skipped_groups],
        }


@dataclass(frozen=True, slots=True)
class ReplanEvent:
    """One re-plan of a split model: why, whom, and what it cost.

    Attributes:
        session: the session it started.
        record_index: index, among the engine's step records (``--json``'s ``per_token``), of
            the forward pass whose wall time includes this re-plan: the pass that lost the
            workers, or the pass that started with the returning ones.
        reason: ``"lost"`` (workers vanished or fell silent) or ``"returned"`` (lost workers are
            alive again and rejoin the plan).
        peers: the workers lost or returning.
        silent_s: for workers that fell silent, the longest silence before they were declared
            lost, in seconds (None: their links closed).
        cost_s: wall time of the re-plan, in seconds: the new plan, the workers loading their
            groups (``setup_s`` of it), and the replay of the context.
        replayed_tokens: positions replayed into the new plan's KV caches.
        setup_s: the part of ``cost_s`` until every worker of the new plan had loaded its groups.
    """

    session: int
    record_index: int
    reason: str
    peers: tuple[str, ...]
    silent_s: float | None
    cost_s: float
    replayed_tokens: int
    setup_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"session": self.session, "record_index": self.record_index, "reason": self.reason,
                "peers": list(self.peers), "silent_ms": None if self.silent_s is None else 1000 * self.silent_s,
                "cost_ms": 1000 * self.cost_s, "setup_ms": 1000 * self.setup_s,
                "replayed_tokens": self.replayed_tokens}
