"""Relaxed synchronization: collecting one sync point's partials and deciding when to stop waiting.

Pure logic (no asyncio, no clock reads: times are passed in). The coordinator creates one
:class:`SyncPoint` per (step, layer, part), asks each worker for an :class:`Answer` (its groups'
partials summed into one row, or two: :func:`answer_layout`), feeds the point the
:class:`~halo_p2p.wire.messages.Partial` chunks that arrive, and asks it what is still missing.
:class:`ResponseTimer` turns measured response times (link latency plus the worker's compute) into per-peer deadlines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from halo_p2p.errors import WireError
from halo_p2p.net.link import Channel, Link
from halo_p2p.wire.messages import Partial
from halo_p2p.wire.quant import WireFormat
from halo_p2p.wire.vector import ChunkedVector, default_parity

__all__ = ["NORM_EVERY_STEPS", "Answer", "ResponseTimer", "StepRecord", "SyncPoint", "SyncRecord", "answer_layout",
           "mean_recall", "measured_lossy", "sends_norms", "step_channel"]


def measured_lossy(link: Link) -> bool:
    """False only when ``link``'s heartbeats measured no loss (``measured_plr == 0``): the
    condition for sending FEC parity (``LayerInput`` parity chunks, ``PartialParity``) on a
    decode step. Unmeasured (``None``, e.g. in-memory links or the first seconds) counts as lossy."""
    return link.stats.measured_plr != 0


NORM_EVERY_STEPS = 4
"""A ``halo`` decode step whose number is a multiple of this sends its groups' partial norms."""


def sends_norms(mode: str, n_tokens: int, step: int) -> bool:
    """Whether the answers of ``step`` carry their groups' partial norms (``Partial.norms``): the
    live criticality recall is measured from them. Forming per-group partials costs about a
    quarter more compute than one summed product (GroupShard.answer), so one ``halo`` decode step
    in :data:`NORM_EVERY_STEPS` measures; both ends apply this rule (it sizes the answer's frames)."""
    return mode == "halo" and n_tokens == 1 and step % NORM_EVERY_STEPS == 0


def step_channel(mode: str, n_tokens: int) -> Channel:
    """The channel a step's layer inputs and partials travel on, both ways (coordinator and worker).

    ``strict``: always the reliable channel. ``halo`` and ``strict-unreliable``: decode steps
    (``n_tokens == 1``) on the unreliable one (halo skips a late or lost answer holding only
    non-critical groups; both repair losses with FEC and Resend); a prompt's
    steps (``n_tokens > 1``) on the reliable one: every group of a prompt is critical (the KV
    cache must be exact) and each partial spans dozens of packets, so SCTP's own retransmission
    repairs a burst's losses sooner than Resend round trips (namespaces, 5 % PLR: a 37-token
    SmolLM2 prompt took 34 s over the unreliable channel, 8-19 s over the reliable one;
    docs/benchmarks.md §7).
    """
    return Channel.UNRELIABLE if mode != "strict" and n_tokens == 1 else Channel.RELIABLE


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
    """One forward pass (a decoded token, or a prompt): its sync points."""

    step: int
    start_pos: int
    n_tokens: int
    syncs: list[SyncRecord] = field(default_factory=list)

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
            "step": self.step, "start_pos": self.start_pos, "n_tokens": self.n_tokens,
            "wait_ms": 1000 * self.wait_s, "skipped_groups": self.skipped, "late_chunks": self.late,
            "resends": sum(s.resends for s in self.syncs),
            "taken_over": sum(s.taken_over for s in self.syncs),
            "recovered_chunks": sum(s.recovered for s in self.syncs),
            "criticality_recall": self.recall,
            "skipped": [[s.layer, s.part, g] for s in self.syncs for g in s.skipped_groups],
        }


def answer_layout(groups: Iterable[int], critical: frozenset[int], *, split: bool) -> Answer:
    """What one worker sends back at a sync point: one sum, or a sum of its critical groups and
    a sum of the others.

    One sum per worker is the floor of frames (a summed partial is as large as one group's); a
    second row costs as many frames again and lets the coordinator use the critical sum when
    the other is lost. Measured on this stack it does not pay with uplink FEC (a one-frame sum
    sent twice is lost with probability ``q**2``, the critical row of a split answer with
    ``~2 q**2``; docs/benchmarks.md §10), so the session splits only when asked
    (``SessionOptions.split_critical``).

    Args:
        groups: the worker's groups at this point (the ones it must send).
        critical: the critical groups of the point.
        split: make two rows when both kinds are present.
    """
    held = sorted(groups)
    crit = [g for g in held if g in critical]
    rest = [g for g in held if g not in critical]
    if split and crit and rest:
        return Answer((*crit, *rest), (len(crit), len(rest)))
    return Answer(tuple(held), (len(held),))


@dataclass(frozen=True, slots=True)
class Answer:
    """The rows a worker sends at one sync point (``LayerInput.groups`` / ``segments``).

    Attributes:
        groups: group indices, row by row.
        segments: groups per row; row ``s`` sums the next ``segments[s]`` groups.
    """

    groups: tuple[int, ...]
    segments: tuple[int, ...]

    def rows(self) -> list[tuple[int, ...]]:
        """The groups of each row."""
        out, i = [], 0
        for n in self.segments:
            out.append(self.groups[i:i + n])
            i += n
        return out


class _Peer:
    """One worker's answer at a sync point, as it arrives."""

    __slots__ = ("answer", "n_data", "norms", "rows", "vector")

    def __init__(self, answer: Answer, n_data: int) -> None:
        self.answer, self.n_data = answer, n_data
        self.rows = answer.rows()
        self.vector: ChunkedVector | None = None      # created by the first chunk (it says whether parity follows)
        self.norms: np.ndarray | None = None


class SyncPoint:
    """The workers' answers at one (step, layer, part).

    Args:
        step, layer, part: the sync point.
        n_tokens, dim: shape of one row of an answer.
        answers: peer -> the rows it was asked for (its groups at this point).
        chunks: peer -> the data chunks its answer takes (:func:`~halo_p2p.session.frames.answer_chunks`);
            a chunk announcing another count is refused.
        critical: group indices that must be complete before moving on.
        fmt: the session's wire format.
        sent_at_s: clock time the input was sent (seconds).
    """

    def __init__(self, step: int, layer: int, part: int, *, n_tokens: int, dim: int,
                 answers: Mapping[str, Answer], chunks: Mapping[str, int], critical: frozenset[int], fmt: WireFormat,
                 sent_at_s: float) -> None:
        self.step, self.layer, self.part = step, layer, part
        self.n_tokens, self.dim, self.fmt = n_tokens, dim, fmt
        self.peers = {p: _Peer(a, chunks[p]) for p, a in answers.items()}
        self.owners = {g: p for p, a in answers.items() for g in a.groups}
        self.critical = frozenset(g for g in critical if g in self.owners)
        self.sent_at_s = sent_at_s
        self.done_at_s: dict[str, float] = {}          # peer -> time its answer completed
        self.retried: set[str] = set()                 # peers asked to resend (Karn: no timing sample)
        self.last_heard_s: dict[str, float] = {}       # peer -> time its last new chunk arrived
        self.moved: frozenset[int] = frozenset()       # groups taken over by the coordinator this token
        self.record = SyncRecord(layer, part, critical=len(self.critical))
        self.closed = False

    @property
    def key(self) -> tuple[int, int, int]:
        return self.step, self.layer, self.part

    def add(self, peer: str, msg: Partial, now_s: float) -> bool:
        """Add one chunk (data or parity) of ``peer``'s answer; True if it brought new elements.

        Raises:
            WireError: ``peer`` was not asked for an answer here, or the chunk does not fit the
                answer (counts, offset, payload) — the caller drops and counts it.
        """
        state = self.peers.get(peer)
        if state is None:
            raise WireError(f"Partial at layer {self.layer} part {self.part} from {peer!r}, which was not asked "
                            "for one", "check the peers run the same plan")
        if msg.norms.size and msg.norms.size != len(state.answer.groups):
            raise WireError(f"Partial from {peer!r} has {msg.norms.size} norms for {len(state.answer.groups)} groups")
        vector = state.vector
        if msg.n_data != state.n_data or msg.n_parity not in (0, default_parity(state.n_data)):
            raise WireError(f"Partial from {peer!r} announces {msg.n_data}+{msg.n_parity} chunks; its answer takes "
                            f"{state.n_data} data chunks and 0 or {default_parity(state.n_data)} parity chunks")
        if vector is None:                  # kept only if the chunk fits it
            vector = ChunkedVector(self.fmt, len(state.rows) * self.n_tokens * self.dim, msg.n_data, msg.n_parity)
        elif not vector.matches(msg.n_data, msg.n_parity):
            raise WireError(f"Partial from {peer!r} announces {msg.n_parity} parity chunks, earlier ones "
                            f"{vector.n_parity}")
        had = len(vector.missing_chunks())
        new = vector.add(msg.chunk, msg.offset, msg.data)
        state.vector = vector
        if not new:
            return False
        if msg.norms.size:
            state.norms = msg.norms
        rebuilt = had - len(vector.missing_chunks()) - (msg.chunk < vector.n_data)
        if rebuilt > 0 and not self.closed:
            self.record.recovered += rebuilt
        self.last_heard_s[peer] = now_s
        if peer not in self.done_at_s and vector.complete:
            self.done_at_s[peer] = now_s
        if self.closed:
            self.record.late += 1
        return not self.closed

    def _row_done(self, state: _Peer, row: int) -> bool:
        n = self.n_tokens * self.dim
        return state.vector is not None and state.vector.covers(row * n, (row + 1) * n)

    def complete(self, group: int) -> bool:
        """Whether ``group``'s row has arrived whole."""
        state = self.peers[self.owners[group]]
        return self._row_done(state, next(i for i, r in enumerate(state.rows) if group in r))

    def peer_complete(self, peer: str) -> bool:
        v = self.peers[peer].vector
        return v is not None and v.complete

    @property
    def all_complete(self) -> bool:
        return all(self.peer_complete(p) for p in self.peers)

    def missing_critical(self) -> dict[str, list[int]]:
        """peer -> its critical groups not yet complete."""
        out: dict[str, list[int]] = {}
        for g in sorted(self.critical):
            if not self.complete(g):
                out.setdefault(self.owners[g], []).append(g)
        return out

    def missing_chunks(self, peer: str) -> tuple[int, ...]:
        """Data chunks of ``peer``'s answer still missing."""
        state = self.peers[peer]
        return tuple(range(state.n_data)) if state.vector is None else tuple(state.vector.missing_chunks())

    def pending_peers(self) -> set[str]:
        """Peers whose answer is incomplete."""
        return {p for p in self.peers if not self.peer_complete(p)}

    def norms(self) -> dict[int, float]:
        """group -> norm of its partial, for the workers that sent norms."""
        return {g: float(n) for s in self.peers.values() if s.norms is not None
                for g, n in zip(s.answer.groups, s.norms, strict=True)}

    def close(self, now_s: float) -> np.ndarray:
        """Stop waiting: record what arrived and return the float32 ``(T, dim)`` sum of it.

        Missing elements count as zero (relaxed synchronization): a row of which only some
        chunks arrived contributes those chunks.
        """
        self.closed = True
        rec = self.record
        rec.wait_s = now_s - self.sent_at_s
        n = self.n_tokens * self.dim
        total = np.zeros(n, dtype=np.float32)
        for state in self.peers.values():
            v = state.vector
            values = v.values() if v is not None and v.received else None
            for i, row in enumerate(state.rows):
                if self._row_done(state, i):
                    rec.used += len(row)
                elif v is not None and v.touches(i * n, (i + 1) * n):
                    rec.partial += len(row)
                    rec.skipped_groups.extend(row)
                else:
                    rec.missing += len(row)
                    rec.skipped_groups.extend(row)
                if values is not None:
                    total += values[i * n:(i + 1) * n]
        return total.reshape(self.n_tokens, self.dim)
