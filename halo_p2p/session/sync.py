"""Relaxed synchronization: collecting one sync point's answers and deciding when to stop waiting.

Pure logic (no asyncio, no clock reads: times are passed in). The coordinator creates one
:class:`SyncPoint` per (step, layer, part), asks each worker for an :class:`Answer` (its groups'
partials summed into one row, or two: :func:`answer_layout`), feeds the point the
:class:`~halo_p2p.wire.messages.Partial` chunks that arrive, and asks :func:`decide` what to do
next: wait (until a time, or an arrival), send ``Resend`` to some workers first, stop (done), or
give up (stall, or a lost worker in ``strict``); it applies each decision through the point's
methods (:meth:`SyncPoint.arm`, :meth:`SyncPoint.resent`). :class:`ResponseTimer` turns measured
response times (link latency plus the worker's compute) into per-peer deadlines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from halo_p2p.errors import WireError
from halo_p2p.session.frames import (
    NORM_EVERY_STEPS,
    UNSTABLE_PLR,
    Answer,
    answer_layout,
    measured_lossy,
    sends_norms,
    step_channel,
)
from halo_p2p.session.records import ResponseTimer, StepRecord, SyncRecord, mean_recall
from halo_p2p.wire.messages import Partial
from halo_p2p.wire.quant import WireFormat
from halo_p2p.wire.vector import ChunkedVector, default_parity

__all__ = ["NORM_EVERY_STEPS", "UNSTABLE_PLR", "Action", "Answer", "Decision", "ResendOrder", "ResponseTimer",
           "StepRecord", "SyncPoint", "SyncRecord", "WaitRules", "answer_layout", "decide", "mean_recall",
           "measured_lossy", "sends_norms", "step_channel"]


_ROW0: tuple[int, ...] = (0,)


class _Peer:
    """One worker's answer at a sync point, as it arrives, and how long to wait for it."""

    __slots__ = ("answer", "critical_rows", "deadline_s", "last_resend_s", "n_data", "next_resend_s", "norms", "rows",
                 "timer", "vector")

    def __init__(self, answer: Answer, n_data: int, critical: frozenset[int]) -> None:
        self.answer, self.n_data = answer, n_data
        rows = self.rows = answer.rows()
        self.critical_rows: tuple[int, ...] = (       # rows holding a critical group
            (_ROW0 if not critical.isdisjoint(rows[0]) else ()) if len(rows) == 1
            else tuple(i for i, r in enumerate(rows) if not critical.isdisjoint(r)))
        self.vector: ChunkedVector | None = None      # created by the first chunk (it says whether parity follows)
        self.norms: np.ndarray | None = None
        self.timer: ResponseTimer | None = None       # set by SyncPoint.arm
        self.deadline_s = self.next_resend_s = math.inf
        self.last_resend_s: float | None = None


class SyncPoint:
    """The workers' answers at one (step, layer, part).

    Args:
        step, layer, part: the sync point.
        n_tokens, dim: shape of one row of an answer.
        answers: peer -> the rows it was asked for (its groups at this point).
        chunks: peer -> the data chunks its answer takes (:func:`~halo_p2p.session.frames.answer_chunk_count`);
            a chunk announcing another count is refused.
        critical: group indices that must be complete before moving on.
        fmt: the session's wire format.
        sent_at_s: clock time the input was sent (seconds).
        moved: critical groups the coordinator computes itself this token (per-token dynamic
            placement; not asked of their owners), counted in ``record.taken_over``.
    """

    def __init__(self, step: int, layer: int, part: int, *, n_tokens: int, dim: int,
                 answers: Mapping[str, Answer], chunks: Mapping[str, int], critical: frozenset[int], fmt: WireFormat,
                 sent_at_s: float, moved: frozenset[int] = frozenset()) -> None:
        self.step, self.layer, self.part = step, layer, part
        self.n_tokens, self.dim, self.fmt = n_tokens, dim, fmt
        self.owners = {g: p for p, a in answers.items() for g in a.groups}
        self.critical = frozenset(g for g in critical if g in self.owners)
        self.peers = {p: _Peer(a, chunks[p], self.critical) for p, a in answers.items()}
        self.sent_at_s = sent_at_s
        self.done_at_s: dict[str, float] = {}          # peer -> time its answer completed
        self.retried: set[str] = set()                 # peers asked to resend (Karn: no timing sample)
        self.last_heard_s: dict[str, float] = {}       # peer -> time its last new chunk arrived
        self.moved = moved
        self.record = SyncRecord(layer, part, critical=len(self.critical), taken_over=len(moved))
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

    # -- waiting: the state decide() reads, changed only through these methods ---------------------

    def arm(self, timers: Mapping[str, ResponseTimer]) -> None:
        """Start waiting: each peer's deadline (and first Resend) is ``sent_at_s`` plus its
        timer's :meth:`ResponseTimer.deadline_s`; ``timers``: peer -> its timer at this part."""
        for peer, state in self.peers.items():
            timer = state.timer = timers[peer]
            state.deadline_s = state.next_resend_s = self.sent_at_s + timer.deadline_s()

    def resent(self, order: ResendOrder, now_s: float) -> None:
        """Record that ``order`` (from :func:`decide`) was sent at ``now_s``: the peer's next
        Resend is due at ``order.next_s``, it gives no timing sample (Karn), and its timer backs
        off if nothing had arrived by its deadline."""
        state = self.peers[order.peer]
        if order.backoff and state.timer is not None:
            state.timer.backoff()
        self.record.resends += 1
        self.retried.add(order.peer)
        state.last_resend_s, state.next_resend_s = now_s, order.next_s

    def input_repeated(self, peer: str) -> None:
        """``peer`` asked for its input again (NeedInput): its response gives no timing sample."""
        self.retried.add(peer)

    def answered(self, peer: str) -> bool:
        """Whether ``peer``'s whole answer arrived (now, or late)."""
        return peer in self.done_at_s

    def response_sample_s(self, peer: str) -> float | None:
        """Time from sending the input to ``peer``'s complete answer, if it is a clean sample for
        its :class:`ResponseTimer`: a decode step, no Resend or repeated input (Karn's rule)."""
        done = self.done_at_s.get(peer)
        if done is None or self.n_tokens != 1 or peer in self.retried:
            return None
        return done - self.sent_at_s

    def measure_recall(self, critical: frozenset[int], known: Mapping[int, float], n_groups: int) -> float | None:
        """Record and return the share of the truly top-k groups (by partial norm, k =
        ``len(critical)``) among ``critical``: the criticality policy's live recall. ``known``:
        norms of the groups not answered here (the coordinator's own and taken-over groups);
        the others come from the answers' norms. None unless every group's norm is known."""
        norms = np.full(n_groups, np.nan)
        for g, n in known.items():
            norms[g] = n
        for g, n in self.norms().items():
            norms[g] = n
        if np.isnan(norms).any():
            return None
        k = len(critical)
        self.record.recall = len(critical & set(np.argsort(norms)[-k:].tolist())) / k
        return self.record.recall

    def _row_done(self, state: _Peer, row: int) -> bool:
        n = self.n_tokens * self.dim
        return state.vector is not None and state.vector.covers(row * n, (row + 1) * n)

    def _missing_critical(self, state: _Peer) -> bool:
        """Whether a row of ``state``'s answer holding a critical group is incomplete."""
        v = state.vector
        if v is not None and v.complete:
            return False
        return any(not self._row_done(state, i) for i in state.critical_rows)

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


# -- the wait decision ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitRules:
    """How the coordinator waits at a sync point (from its session options).

    Attributes:
        halo: relaxed synchronization: once no critical group is missing, an answer is waited
            for only until its owner's deadline.
        strict: a worker lost while its answer is pending fails the step (``PeerLost``);
            otherwise its groups count as missing.
        stall_timeout_s: give up after this long without an arrival.
        resend_interval_s: smallest interval between two Resends to one worker.
        silence_gap_s: an answer's burst of chunks silent this long has lost its rest.
    """

    halo: bool
    strict: bool
    stall_timeout_s: float
    resend_interval_s: float
    silence_gap_s: float = 0.02


class Action(IntEnum):
    """What :func:`decide` tells the waiting loop to do."""

    WAIT = 0    # send Decision.resend (if any), then sleep until Decision.until_s or an arrival
    DONE = 1    # stop waiting and sum what arrived
    STALL = 2   # nothing arrived for stall_timeout_s: give up (Decision.peers: those pending)
    LOST = 3    # strict: workers with pending answers are gone (Decision.peers)


class ResendOrder(NamedTuple):
    """Ask ``peer`` for ``chunks`` of its answer again (a ``Resend``); apply with :meth:`SyncPoint.resent`.

    Attributes:
        peer: the worker.
        chunks: the data chunks of its answer still missing.
        next_s: when to ask again if they are still missing (exponential back-off, x64 at most).
        backoff: nothing had arrived from it by its deadline: back its timer off (RFC 6298 5.5).
    """

    peer: str
    chunks: tuple[int, ...]
    next_s: float
    backoff: bool


class Decision(NamedTuple):
    """The outcome of :func:`decide` (see :class:`Action`)."""

    action: Action
    until_s: float = 0.0
    resend: tuple[ResendOrder, ...] = ()
    peers: tuple[str, ...] = ()


_DONE = Decision(Action.DONE)


def decide(sp: SyncPoint, now_s: float, rules: WaitRules, *, unreliable: bool, dead: Set[str],
           progress_s: float) -> Decision:
    """What to do at sync point ``sp`` (armed with :meth:`SyncPoint.arm`) at time ``now_s``.

    Pure: reads ``sp`` (answers so far, deadlines, Resend history) and changes nothing.

    * Every answer complete: ``DONE``.
    * ``strict`` and a pending worker in ``dead``: ``LOST``.
    * ``halo`` and no critical group missing (among live workers): ``DONE`` once every pending
      live worker's deadline passed, else ``WAIT`` until the next deadline.
    * Otherwise ``WAIT`` for arrivals; on the unreliable channel, a live worker missing a
      critical row is due a Resend at its deadline, or once its burst of chunks went silent for
      ``max(silence_gap_s, interval)`` after the last Resend's ``interval``, where ``interval =
      max(resend_interval_s, 2 srtt)`` grows x2 per Resend at this point (x64 at most); due
      workers are listed in ``resend`` and the wait ends at the next due time.
    * Nothing arrived since ``progress_s`` for ``stall_timeout_s``: ``STALL``.

    Args:
        unreliable: the step travels on the unreliable channel (reliable answers just arrive).
        dead: workers whose link closed.
        progress_s: time of the last arrival (or of the start of waiting).
    """
    pending = lost = critical = False
    all_due, soonest = True, math.inf
    for peer, state in sp.peers.items():
        v = state.vector
        if v is not None and v.complete:
            continue
        pending = True
        if peer in dead:
            lost = True
            continue
        if not critical and sp._missing_critical(state):
            critical = True
        if now_s < state.deadline_s:
            all_due = False
            soonest = min(soonest, state.deadline_s)
    if not pending:
        return _DONE
    if lost and rules.strict:
        return Decision(Action.LOST, now_s, (), tuple(sorted(p for p in sp.pending_peers() if p in dead)))
    resend: tuple[ResendOrder, ...] = ()
    if rules.halo and not critical:
        if all_due:
            return _DONE
        until = soonest
    else:
        until = now_s + rules.stall_timeout_s
        if unreliable:
            until, resend = _resends(sp, now_s, rules, dead, until)
    if now_s - progress_s > rules.stall_timeout_s:
        return Decision(Action.STALL, now_s, (), tuple(sorted(sp.pending_peers())))
    return Decision(Action.WAIT, until, resend)


def _resends(sp: SyncPoint, now_s: float, rules: WaitRules, dead: Set[str],
             until: float) -> tuple[float, tuple[ResendOrder, ...]]:
    """The Resends due now (see :func:`decide`) and the earliest next due time (at most ``until``)."""
    orders: tuple[ResendOrder, ...] = ()
    sent = sp.record.resends
    for peer, state in sp.peers.items():
        if peer in dead or not sp._missing_critical(state):
            continue
        srtt = state.timer.srtt if state.timer is not None else None
        interval = max(rules.resend_interval_s, 2 * (srtt or 0.0))
        due = state.next_resend_s
        heard = sp.last_heard_s.get(peer)
        if heard is not None:
            due = min(due, max(heard + max(rules.silence_gap_s, interval), (state.last_resend_s or 0.0) + interval))
        if now_s >= due:
            sent += 1
            backoff = state.last_resend_s is None and heard is None
            due = now_s + interval * min(64, 2 ** (sent - 1))
            orders += (ResendOrder(peer, sp.missing_chunks(peer), due, backoff),)
        until = min(until, due)
    return until, orders
