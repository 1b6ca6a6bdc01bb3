"""The engine of a split model: one :class:`~halo_p2p.engine.protocol.Engine` that owns its links.

:class:`SplitEngine` runs the current session's :class:`~halo_p2p.session.coordinator.Coordinator`
and survives lost workers: when a worker's link closes, or it falls silent for
``peer_silence_s`` (:mod:`~halo_p2p.session.liveness`), a ``strict`` or ``strict-unreliable``
coordinator raises :class:`~halo_p2p.errors.PeerLost` at once; a ``halo`` coordinator counts the worker's groups as
missing and finishes the token. Either way the engine then builds a new
coordinator (new session id, new plan without the lost peers), recomputes the KV caches of the
new plan by replaying the ids forwarded so far, and carries on, so no generation hangs.

A worker lost by silence may come back (a frozen process resumed, a link that recovered): the
engine watches it (:class:`~halo_p2p.session.rejoin.Returns`: its link heard again, or dialed
again through ``rejoin``, the node's connector). A returned worker rejoins the plan at the start
of the next forward pass (a re-plan with it, and the replay), at most ``max_returns`` times.
Each forward pass leaves one :class:`~halo_p2p.session.records.StepRecord` (with its wall time, detection and
re-plan included) and each re-plan a :class:`~halo_p2p.session.records.ReplanEvent` (why, whom,
its cost), which :meth:`SplitEngine.status` returns for ``--json``.

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
from halo_p2p.session.records import ReplanEvent
from halo_p2p.session.rejoin import Rejoin, Returns
from halo_p2p.session.sync import StepRecord, mean_recall

__all__ = [
    "Closeable",
    "CoordinatorFactory",
    "LinkStatus",
    "PeerHost",
    "RecordsSummary",
    "Rejoin",
    "ReplanEvent",
    "SplitEngine",
    "SplitStatus",
    "release",
]

log = logging.getLogger(__name__)

CoordinatorFactory = Callable[[frozenset[str], int, Mapping[str, Link]], Awaitable[Coordinator]]
"""``await factory(lost, session, links)``: builds and starts a coordinator for a session id over
``links`` (worker peer id -> link), without the ``lost`` peers."""

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
        records: one step record per forward pass of the engine (the prompt first), across
            re-plans (each names its session; replays are not recorded).
        summary: means over ``records``.
        replans: re-plans so far that left workers out (a lost worker, a refused plan).
        moved_groups: groups that changed owner over all re-plans.
        lost: peers left out.
        events: every re-plan (workers lost or returning), in order, with its cost.
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
    events: tuple[ReplanEvent, ...] = ()

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
        max_replans: give up (raise TransportError) after this many re-plans that lose workers.
        rejoin: dials a lost worker again once its link closed (None: a closed link stays lost).
        max_returns, watch_interval_s, silence_s: see :class:`~halo_p2p.session.rejoin.Returns`.
    """

    def __init__(self, factory: CoordinatorFactory, *, links: Mapping[str, Link], node: Closeable | None = None,
                 members: Sequence[PeerHost] = (), max_replans: int = 8, rejoin: Rejoin | None = None,
                 max_returns: int = 2, watch_interval_s: float = 0.25, silence_s: float = 1.0) -> None:
        self._factory = factory
        self._links = dict(links)
        self._node = node
        self._members = tuple(members)
        self.max_replans = max_replans
        self._returns = Returns(self._links, rejoin, max_returns=max_returns, watch_interval_s=watch_interval_s,
                                silence_s=silence_s)
        self._coordinator: Coordinator | None = None
        self.lost: set[str] = set()
        self.replans = 0
        self.moved_groups = 0          # groups that changed owner over all re-plans
        self.session = 0
        self.events: list[ReplanEvent] = []
        self._records: list[StepRecord] = []     # one per forward pass, across sessions
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

    @property
    def returned(self) -> frozenset[str]:
        """Lost workers seen alive again, rejoining at the next forward pass."""
        return self._returns.returned

    async def start(self) -> None:
        """Build the first coordinator; workers that refuse the plan are left out (PeerLost)."""
        while True:
            self.session += 1
            try:
                self._coordinator = await self._factory(frozenset(self.lost), self.session, self._links)
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
        """See :meth:`Coordinator.forward`; re-plans and retries when a worker is lost, and
        first re-plans with lost workers that came back."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        del self._history[start_pos:]
        self._history.extend(int(t) for t in token_ids)
        if self._returns.returned:
            await self._replan([], {}, replay_upto=start_pos)
        while True:
            coordinator = self.coordinator
            try:
                out = await coordinator.forward(token_ids, start_pos, all_logits=all_logits)
            except PeerLost as exc:
                await self._replan(exc.peers, coordinator.silent, replay_upto=start_pos)
                continue
            record = coordinator.records[-1]
            if coordinator.dead:          # halo finished the token without them
                await self._replan(sorted(coordinator.dead), coordinator.silent,
                                   replay_upto=start_pos + len(token_ids))
            record.session, record.wall_s = coordinator.session, loop.time() - t0
            self._records.append(record)
            return out

    async def _replan(self, peers: Sequence[str], silent: Mapping[str, float], *, replay_upto: int) -> None:
        """A new session without ``peers`` (``silent``: those lost by silence, and for how
        long) and with the workers that returned; replays the context up to ``replay_upto``.
        A worker lost during the replay makes it start over without that one too."""
        back = self._returns.take()
        lost: Sequence[str] = peers
        while lost or back:
            lost, silent = await self._replan_once(lost, silent, back, replay_upto=replay_upto)
            back = []

    async def _replan_once(self, peers: Sequence[str], silent: Mapping[str, float], back: Sequence[str], *,
                           replay_upto: int) -> tuple[list[str], dict[str, float]]:
        """One re-plan (see :meth:`_replan`); returns the workers lost during its replay."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if peers:
            self.replans += 1
            if self.replans > self.max_replans:
                raise TransportError(f"re-planned {self.max_replans} times in one session",
                                     "the swarm is unstable; check the peers' links")
        self.lost.update(peers)
        self.lost.difference_update(back)
        log.warning("re-planning%s%s (re-plan %d)", f" without {', '.join(peers)}" if peers else "",
                    f" with {', '.join(back)} again" if back else "", self.replans)
        old = self._coordinator
        if old is not None:
            await old.aclose()
        for peer in peers:             # its link is free now: watch it for a sign of life
            if peer in silent:
                self._returns.watch(peer)
        await self.start()
        setup_s = loop.time() - t0
        new = self.coordinator
        if old is not None:                    # groups whose owner changed (shown by chat and --json)
            before, after = old.plan.owner, new.plan.owner
            self.moved_groups += sum(1 for g, p in after.items() if before.get(g) != p)
        history = self._history[:replay_upto]
        again: list[str] = []
        try:
            for c0 in range(0, len(history), _REPLAY_CHUNK):
                await new.forward(history[c0:c0 + _REPLAY_CHUNK], c0)
                if new.dead:           # halo replayed without them: their groups' caches are missing
                    again = sorted(new.dead)
                    break
        except PeerLost as exc:
            again = list(exc.peers)
        self.events.append(ReplanEvent(
            session=self.session, record_index=len(self._records), reason="lost" if peers else "returned",
            peers=tuple(peers) if peers else tuple(back),
            silent_s=max((silent[p] for p in peers if p in silent), default=None),
            cost_s=loop.time() - t0, replayed_tokens=len(history), setup_s=setup_s))
        return again, dict(new.silent)

    def status(self) -> SplitStatus:
        """A snapshot: plan, sync mode, wire dtype, links, counters, records, re-plans."""
        c = self.coordinator
        weights = None
        if self._members:
            own = c.trunk.weight_bytes() + (c.local.weight_bytes() if c.local is not None else 0)
            weights = {c.plan.coordinator: own, **{m.peer_id: m.weight_bytes() for m in self._members}}
        records = tuple(self._records)
        return SplitStatus(session=self.session, plan=c.plan, mode=c.options.mode, wire_dtype=c.options.wire_dtype,
                           links={p: LinkStatus.of(link.stats) for p, link in c.links.items()},
                           counters=dict(c.counters), records=records, summary=RecordsSummary.of(records),
                           replans=self.replans, moved_groups=self.moved_groups, lost=frozenset(self.lost),
                           weight_bytes=weights, events=tuple(self.events))

    async def aclose(self) -> None:
        """Stop watching lost workers; close the coordinator, the links, the node and the members; idempotent."""
        await self._returns.aclose()
        if self._coordinator is not None:
            await self._coordinator.aclose()
        await release(self._links, self._node, self._members)
