"""Relaxed synchronization: collecting one sync point's partials and deciding when to stop waiting.

Pure logic (no asyncio, no clock reads: times are passed in). The coordinator creates one
:class:`SyncPoint` per (step, layer, part), feeds it the :class:`~halo_p2p.wire.messages.Partial`
chunks that arrive, and asks it what is still missing. :class:`ResponseTimer` turns measured
response times (link latency plus the worker's compute) into per-peer deadlines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from halo_p2p.errors import WireError
from halo_p2p.net.link import Channel, Link
from halo_p2p.wire import fec
from halo_p2p.wire.chunks import Reassembly, split_ranges
from halo_p2p.wire.messages import Partial, PartialParity

__all__ = ["ResponseTimer", "StepRecord", "SyncPoint", "SyncRecord", "mean_recall", "measured_lossy", "step_channel"]


def measured_lossy(link: Link) -> bool:
    """False only when ``link``'s heartbeats measured no loss (``measured_plr == 0``): the
    condition for sending FEC parity (``LayerInput`` parity chunks, ``PartialParity``) on a
    decode step. Unmeasured (``None``, e.g. in-memory links or the first seconds) counts as lossy."""
    return link.stats.measured_plr != 0


def step_channel(mode: str, n_tokens: int) -> Channel:
    """The channel a step's layer inputs and partials travel on, both ways (coordinator and worker).

    ``strict``: always the reliable channel. ``halo``: decode steps (``n_tokens == 1``) on the
    unreliable one, where a late or lost partial of a non-critical group is skipped; a prompt's
    steps (``n_tokens > 1``) on the reliable one: every group of a prompt is critical (the KV
    cache must be exact) and each partial spans dozens of packets, so SCTP's own retransmission
    repairs a burst's losses sooner than Resend round trips (namespaces, 5 % PLR: a 37-token
    SmolLM2 prompt took 34 s over the unreliable channel, 8-19 s over the reliable one;
    docs/benchmarks.md §7).
    """
    return Channel.UNRELIABLE if mode == "halo" and n_tokens == 1 else Channel.RELIABLE


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
        recovered: groups completed by rebuilding a lost chunk from uplink parity.
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
            "recovered_groups": sum(s.recovered for s in self.syncs),
            "criticality_recall": self.recall,
            "skipped": [[s.layer, s.part, g] for s in self.syncs for g in s.skipped_groups],
        }


class SyncPoint:
    """Partials of the remote groups at one (step, layer, part).

    Args:
        step, layer, part: the sync point.
        n_tokens, dim: shape of each group's partial.
        owners: group index -> peer, for the remote groups only.
        critical: group indices that must be complete before moving on.
        dtype: wire dtype of the partials.
        sent_at_s: clock time the input was sent (seconds).
    """

    def __init__(self, step: int, layer: int, part: int, *, n_tokens: int, dim: int,
                 owners: Mapping[int, str], critical: frozenset[int], dtype: str, sent_at_s: float) -> None:
        self.step, self.layer, self.part = step, layer, part
        self.n_tokens, self.dim = n_tokens, dim
        self.owners = dict(owners)
        self.critical = frozenset(g for g in critical if g in self.owners)
        self.sent_at_s = sent_at_s
        self.parts = {g: Reassembly(n_tokens * dim, dtype) for g in self.owners}
        self.done_at_s: dict[str, float] = {}          # peer -> time its last group completed
        self.retried: set[str] = set()                 # peers asked to resend (Karn: no timing sample)
        self.last_heard_s: dict[str, float] = {}       # peer -> time its last new chunk arrived
        self.parity: dict[int, PartialParity] = {}     # group -> its uplink parity, until complete
        self.moved: frozenset[int] = frozenset()       # groups taken over by the coordinator this token
        self.record = SyncRecord(layer, part, critical=len(self.critical))
        self.closed = False

    @property
    def key(self) -> tuple[int, int, int]:
        return self.step, self.layer, self.part

    def add(self, peer: str, msg: Partial, now_s: float) -> bool:
        """Add one chunk from ``peer``; returns True if it brought new elements.

        Raises:
            WireError: the group is not ``peer``'s at this point, or the chunk falls outside the
                partial or has the wrong dtype (the caller drops and counts it).
        """
        self._check_owner(peer, msg)
        if self.parts[msg.group].add(msg.offset, msg.data) == 0:
            return False
        if msg.group in self.parity:
            self._recover(msg.group)
        return self._heard(peer, now_s)

    def add_parity(self, peer: str, msg: PartialParity, now_s: float) -> bool:
        """Keep ``msg`` and rebuild its group's one lost data chunk if the others arrived.

        Returns True if that completed the group (new elements, before :meth:`close`).

        Raises:
            WireError: the group is not ``peer``'s here, ``n_data`` does not split the partial,
                or the parity has the wrong dtype or length (the caller drops and counts it).
        """
        self._check_owner(peer, msg)
        part = self.parts[msg.group]
        if not 1 <= msg.n_data <= part.total_elems:
            raise WireError(f"parity over {msg.n_data} chunks of a {part.total_elems}-element partial")
        width = -(-part.total_elems // msg.n_data)           # the longest of split_ranges' chunks
        bits = fec.parity_dtype(part.array.dtype)
        if msg.data.dtype != bits or msg.data.shape != (width,):
            raise WireError(f"parity of group {msg.group} is {msg.data.dtype}[{msg.data.size}], "
                            f"expected {bits}[{width}]")
        self.parity[msg.group] = msg
        return self._recover(msg.group) and self._heard(peer, now_s)

    def _check_owner(self, peer: str, msg: Partial | PartialParity) -> None:
        if self.owners.get(msg.group) != peer:
            raise WireError(f"{type(msg).__name__} of group {msg.group} at layer {self.layer} part {self.part} "
                            f"from {peer!r}, which does not own it", "check the peers run the same plan")

    def _heard(self, peer: str, now_s: float) -> bool:
        """New elements from ``peer`` arrived at ``now_s``; True unless this point is closed.
        A completion after :meth:`close` still sets ``done_at_s`` (a timing sample)."""
        self.last_heard_s[peer] = now_s
        if peer not in self.done_at_s and self.peer_complete(peer):
            self.done_at_s[peer] = now_s
        if self.closed:
            self.record.late += 1
        return not self.closed

    def _recover(self, group: int) -> bool:
        """Rebuild one missing data chunk of ``group`` from its parity (uplink FEC); True if done."""
        part, par = self.parts[group], self.parity[group]
        if part.complete:
            del self.parity[group]
            return False
        ranges = split_ranges(part.total_elems, par.n_data)
        have = part.received_mask
        got = {i: part.array[a:b] for i, (a, b) in enumerate(ranges) if have[a:b].all()}
        if len(got) != par.n_data - 1:
            return False                                   # nothing or more than one chunk lost
        got[par.n_data] = par.data
        chunks = fec.recover(got, par.n_data, 1, [b - a for a, b in ranges], part.array.dtype)
        if chunks is None:
            return False
        lost = next(i for i in range(par.n_data) if i not in got)
        part.add(ranges[lost][0], np.ascontiguousarray(chunks[lost]))
        del self.parity[group]
        if not self.closed:
            self.record.recovered += 1
        return True

    def complete(self, group: int) -> bool:
        return self.parts[group].complete

    def peer_complete(self, peer: str) -> bool:
        return all(self.parts[g].complete for g, p in self.owners.items() if p == peer)

    @property
    def all_complete(self) -> bool:
        return all(r.complete for r in self.parts.values())

    @property
    def critical_complete(self) -> bool:
        return all(self.parts[g].complete for g in self.critical)

    def missing_critical(self) -> dict[str, list[int]]:
        """peer -> its critical groups not yet complete."""
        out: dict[str, list[int]] = {}
        for g in sorted(self.critical):
            if not self.parts[g].complete:
                out.setdefault(self.owners[g], []).append(g)
        return out

    def missing_of(self, peer: str) -> list[int]:
        """``peer``'s groups (critical or not) not yet complete, sorted."""
        return sorted(g for g, p in self.owners.items() if p == peer and not self.parts[g].complete)

    def pending_peers(self) -> set[str]:
        """Peers with at least one incomplete group."""
        return {self.owners[g] for g, r in self.parts.items() if not r.complete}

    def close(self, now_s: float) -> np.ndarray:
        """Stop waiting: record what arrived and return the float32 ``(T, dim)`` sum of it.

        Missing elements count as zero (relaxed synchronization): a partially received group
        contributes the chunks that arrived.
        """
        self.closed = True
        rec = self.record
        rec.wait_s = now_s - self.sent_at_s
        total = np.zeros(self.n_tokens * self.dim, dtype=np.float32)
        for g, r in self.parts.items():
            if r.complete:
                rec.used += 1
            elif r.received_elems:
                rec.partial += 1
                rec.skipped_groups.append(g)
            else:
                rec.missing += 1
                rec.skipped_groups.append(g)
            if r.received_elems:
                total += r.array
        return total.reshape(self.n_tokens, self.dim)
