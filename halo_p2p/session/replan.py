"""The engine of a split model: one :class:`~halo_p2p.engine.protocol.Engine` that owns its links.

:class:`SplitEngine` runs the current session's :class:`~halo_p2p.session.coordinator.Coordinator`
and survives lost workers: when a worker's link closes, a ``strict`` or ``strict-unreliable``
coordinator raises :class:`~halo_p2p.errors.PeerLost` at once; a ``halo`` coordinator counts the worker's groups as
missing from the next deadline on and finishes the token. Either way the engine then builds a new
coordinator (new session id, new plan without the lost peers), recomputes the KV caches of the
new plan by replaying the ids forwarded so far, and carries on, so no generation hangs.

It owns what the session runs on: the links to the workers, the node it coordinates from and, in
an emulated swarm, the worker peers of this process; :meth:`SplitEngine.aclose` closes them all.
:meth:`SplitEngine.status` is the typed snapshot the CLI (``--json``, the chat status line) and
the benchmarks read. Build one with :func:`halo_p2p.session.setup.open_split_session`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from halo_p2p.errors import PeerLost, TransportError
from halo_p2p.model.config import ModelConfig
from halo_p2p.net.link import Link, LinkStats
from halo_p2p.plan import PlacementPlan
from halo_p2p.session.coordinator import Coordinator
from halo_p2p.session.sync import StepRecord, mean_recall

__all__ = [
    "Closeable",
    "CoordinatorFactory",
    "LinkStatus",
    "PeerHost",
    "RecordsSummary",
    "SplitEngine",
    "SplitStatus",
    "release",
]

log = logging.getLogger(__name__)

CoordinatorFactory = Callable[[frozenset[str], int], Awaitable[Coordinator]]
"""Builds and starts a coordinator for a session id without the given lost peers."""

_REPLAY_CHUNK = 256


class Closeable(Protocol):
    """Something a :class:`SplitEngine` closes with itself (the node it coordinates from)."""

    async def aclose(self) -> None: ...


class PeerHost(Protocol):
    """A worker peer running in this process (an emulated swarm's
    :class:`~halo_p2p.node.peer.PeerNode`), closed with the engine."""

    @property
    def peer_id(self) -> str: ...

    def weight_bytes(self) -> int:
        """Resident weight bytes of the groups it computes."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """One link as the coordinator's end counts it (both channels)."""

    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    rtt_ms: float | None
    jitter_ms: float | None
    measured_plr: float | None

    @classmethod
    def of(cls, stats: LinkStats) -> LinkStatus:
        r, u = stats.reliable, stats.unreliable
        return cls(r.bytes_sent + u.bytes_sent, r.bytes_delivered + u.bytes_delivered,
                   r.messages_sent + u.messages_sent, r.messages_delivered + u.messages_delivered,
                   stats.rtt_ms, stats.jitter_ms, stats.measured_plr)


@dataclass(frozen=True, slots=True)
class RecordsSummary:
    """Means over the decode steps of a session (every step if only the prompt ran).

    Attributes:
        steps: forward passes recorded (the prompt included).
        mean_wait_ms: wait for answers per step, in milliseconds.
        mean_skipped_groups: groups not (fully) summed per step.
        criticality_recall: the criticality policy's measured recall over every step that
            measured one (None if none did).
    """

    steps: int
    mean_wait_ms: float
    mean_skipped_groups: float
    criticality_recall: float | None

    @classmethod
    def of(cls, records: Sequence[StepRecord]) -> RecordsSummary:
        decode = records[1:] or records
        n = max(1, len(decode))
        return cls(len(records), sum(1000 * r.wait_s for r in decode) / n, sum(r.skipped for r in decode) / n,
                   mean_recall(records))


@dataclass(frozen=True, slots=True)
class SplitStatus:
    """A snapshot of a split model.

    Attributes:
        session: the current session id (one more per re-plan).
        plan: the current placement (its peers, coordinator first, and their groups).
        mode: sync mode (``strict``, ``strict-unreliable``, ``halo``).
        wire_dtype: activation format on the wire.
        links: worker peer id -> its link's counters, for the workers of the current plan.
        counters: the coordinator's dropped / malformed / late / stale message counts.
        records: the current session's step records (the prompt first).
        summary: means over ``records``.
        replans: re-plans so far (a lost worker, a refused plan).
        moved_groups: groups that changed owner over all re-plans.
        lost: peers left out.
        weight_bytes: peer id -> resident weight bytes (the coordinator's includes the trunk),
            when every worker runs in this process (an emulated swarm); else None.
    """

    session: int
    plan: PlacementPlan
    mode: str
    wire_dtype: str
    links: Mapping[str, LinkStatus]
    counters: Mapping[str, int]
    records: tuple[StepRecord, ...]
    summary: RecordsSummary
    replans: int
    moved_groups: int
    lost: frozenset[str]
    weight_bytes: Mapping[str, int] | None

    @property
    def peers(self) -> tuple[str, ...]:
        """Every peer of the plan, the coordinator first."""
        return self.plan.peers

    @property
    def emulated(self) -> bool:
        """Whether every worker runs in this process."""
        return self.weight_bytes is not None

    def shares(self) -> dict[str, float]:
        """Share of the groups' weights per peer of the plan."""
        return {p: self.plan.share(p) for p in self.plan.peers}


async def release(links: Mapping[str, Link], node: Closeable | None, members: Sequence[PeerHost]) -> None:
    """Close ``links``, then ``node``, then ``members`` (what a :class:`SplitEngine` owns)."""
    await asyncio.gather(*(link.aclose() for link in links.values()), return_exceptions=True)
    if node is not None:
        await node.aclose()
    for member in members:
        await member.aclose()


class SplitEngine:
    """:class:`~halo_p2p.engine.protocol.Engine` of a split model over a sequence of coordinators.

    Args:
        factory: builds a started coordinator excluding some peers (see
            :func:`halo_p2p.session.setup.coordinator_factory`).
        links: worker peer id -> link, every peer the factory may plan on; owned.
        node: what the coordinator runs on (its :class:`~halo_p2p.node.peer.PeerNode`); closed
            after the links, if given.
        members: worker peers running in this process (an emulated swarm); closed last.
        max_replans: give up (raise TransportError) after this many re-plans in one session.
    """

    def __init__(self, factory: CoordinatorFactory, *, links: Mapping[str, Link], node: Closeable | None = None,
                 members: Sequence[PeerHost] = (), max_replans: int = 8) -> None:
        self._factory = factory
        self._links = dict(links)
        self._node = node
        self._members = tuple(members)
        self.max_replans = max_replans
        self._coordinator: Coordinator | None = None
        self.lost: set[str] = set()
        self.replans = 0
        self.moved_groups = 0          # groups that changed owner over all re-plans
        self.session = 0
        self._history: list[int] = []    # ids at positions [0, len) as last forwarded

    @property
    def coordinator(self) -> Coordinator:
        """The current session's coordinator (for diagnostics and tests; generate through
        :meth:`forward`, read figures from :meth:`status`)."""
        assert self._coordinator is not None, "start() the engine first"
        return self._coordinator

    @property
    def plan(self) -> PlacementPlan:
        """The current placement."""
        return self.coordinator.plan

    @property
    def links(self) -> Mapping[str, Link]:
        """The links this engine owns, by worker peer id (lost peers' included)."""
        return self._links

    @property
    def members(self) -> tuple[PeerHost, ...]:
        """The worker peers running in this process (an emulated swarm; empty otherwise)."""
        return self._members

    async def start(self) -> None:
        """Build the first coordinator; workers that refuse the plan are left out (PeerLost)."""
        while True:
            self.session += 1
            try:
                self._coordinator = await self._factory(frozenset(self.lost), self.session)
                return
            except PeerLost as exc:
                self.replans += 1
                if self.replans > self.max_replans:
                    raise
                log.warning("leaving out %s: %s", ", ".join(exc.peers), exc)
                self.lost.update(exc.peers)

    @property
    def config(self) -> ModelConfig:
        return self.coordinator.config

    @property
    def max_seq_len(self) -> int:
        return self.coordinator.max_seq_len

    async def forward(self, token_ids: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """See :meth:`Coordinator.forward`; re-plans and retries when a worker is lost."""
        del self._history[start_pos:]
        self._history.extend(int(t) for t in token_ids)
        while True:
            coordinator = self.coordinator
            try:
                out = await coordinator.forward(token_ids, start_pos, all_logits=all_logits)
            except PeerLost as exc:
                await self._replan(exc.peers, replay_upto=start_pos)
                continue
            if coordinator.dead:          # halo finished the token without them
                await self._replan(sorted(coordinator.dead), replay_upto=start_pos + len(token_ids))
            return out

    async def _replan(self, peers: list[str], *, replay_upto: int) -> None:
        self.replans += 1
        if self.replans > self.max_replans:
            raise TransportError(f"re-planned {self.max_replans} times in one session",
                                 "the swarm is unstable; check the peers' links")
        self.lost.update(peers)
        log.warning("re-planning without %s (re-plan %d)", ", ".join(peers), self.replans)
        old = self._coordinator
        if old is not None:
            await old.aclose()
        await self.start()
        new = self.coordinator
        if old is not None:                    # groups whose owner changed (shown by chat and --json)
            before, after = old.plan.owner, new.plan.owner
            self.moved_groups += sum(1 for g, p in after.items() if before.get(g) != p)
        history = self._history[:replay_upto]
        for c0 in range(0, len(history), _REPLAY_CHUNK):
            await new.forward(history[c0:c0 + _REPLAY_CHUNK], c0)

    def status(self) -> SplitStatus:
        """A snapshot: plan, sync mode, wire dtype, links, counters, records, re-plans."""
        c = self.coordinator
        weights = None
        if self._members:
            own = c.trunk.weight_bytes() + (c.local.weight_bytes() if c.local is not None else 0)
            weights = {c.plan.coordinator: own, **{m.peer_id: m.weight_bytes() for m in self._members}}
        records = tuple(c.records)
        return SplitStatus(session=self.session, plan=c.plan, mode=c.options.mode, wire_dtype=c.options.wire_dtype,
                           links={p: LinkStatus.of(link.stats) for p, link in c.links.items()},
                           counters=dict(c.counters), records=records, summary=RecordsSummary.of(records),
                           replans=self.replans, moved_groups=self.moved_groups, lost=frozenset(self.lost),
                           weight_bytes=weights)

    async def aclose(self) -> None:
        """Close the coordinator, the links, the node and the members; idempotent."""
        if self._coordinator is not None:
            await self._coordinator.aclose()
        await release(self._links, self._node, self._members)
