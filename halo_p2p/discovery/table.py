"""The peer view shared by every discovery implementation, with its admission rules (no I/O).

Implementations (:class:`~halo_p2p.discovery.memory.MemoryDiscovery`,
:class:`~halo_p2p.discovery.static.StaticDiscovery`,
:class:`~halo_p2p.discovery.mdns.MdnsDiscovery`) feed a :class:`PeerTable`, so the rules are the
same everywhere:

* A record with **our** peer id but another address is refused (event ``"refused"``); during
  :meth:`~halo_p2p.discovery.protocol.Discovery.start` it is fatal
  (:class:`~halo_p2p.errors.DiscoveryError`).
* Two **other** records with one peer id: the first seen is kept, the second refused and logged.
  If the first goes away, the second is admitted then.
* A record of another protocol version than ours
  (:data:`~halo_p2p.discovery.info.PROTOCOL_VERSION`) is refused and logged.
* A malformed record is counted (:attr:`DiscoveryStats.malformed_txt`), logged once and ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Literal

from halo_p2p.discovery.info import PROTOCOL_VERSION, PeerInfo
from halo_p2p.errors import DiscoveryError

__all__ = [
    "DUPLICATE_ID_FIX",
    "EVENT_QUEUE_MAX",
    "DiscoveryStats",
    "PeerEvent",
    "PeerSubscription",
    "PeerTable",
    "TableView",
]

log = logging.getLogger(__name__)

EVENT_QUEUE_MAX: Final = 1024

DUPLICATE_ID_FIX: Final = ("give each device its own id: delete ~/.config/halo-p2p/peer-id on the copy, "
                           "or pass --peer-id")
"""The fix printed when two devices announce one peer id."""

EventKind = Literal["added", "updated", "removed", "refused"]


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A change of the peer view.

    Attributes:
        kind: ``"added"``, ``"updated"`` (same peer id and source, new fields), ``"removed"``
            (``peer`` is the last known info) or ``"refused"`` (not admitted; see ``reason``).
        peer: the peer concerned.
        reason: why a peer was refused (empty for the other kinds).
    """

    kind: EventKind
    peer: PeerInfo
    reason: str = ""


@dataclass(slots=True)
class DiscoveryStats:
    """Counters of one discovery instance; each refusal or malformed record counts once per source.

    Attributes:
        malformed_txt: records that could not be decoded (ignored).
        refused_duplicates: records refused because their peer id was taken (ours or another's).
        refused_version: records refused for another :data:`PROTOCOL_VERSION`.
        resolve_failures: services whose records did not arrive in time (mDNS only).
        events_dropped: events dropped because a subscriber fell :data:`EVENT_QUEUE_MAX` behind.
    """

    malformed_txt: int = 0
    refused_duplicates: int = 0
    refused_version: int = 0
    resolve_failures: int = 0
    events_dropped: int = 0

    def __iadd__(self, other: DiscoveryStats) -> DiscoveryStats:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


_END: Final = object()


class PeerSubscription:
    """An async iterator of :class:`PeerEvent`; it ends when the discovery closes or on :meth:`close`.

    Use as ``with discovery.subscribe() as events: async for event in events: ...``. At most
    :data:`EVENT_QUEUE_MAX` events wait; beyond that the oldest is dropped (and counted).
    """

    def __init__(self, table: PeerTable) -> None:
        self._table = table
        self._queue: asyncio.Queue[object] = asyncio.Queue(EVENT_QUEUE_MAX)
        self._ended = False

    def _put(self, item: object) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._table.stats.events_dropped += 1
        self._queue.put_nowait(item)

    def close(self) -> None:
        """Stop receiving events; iteration ends after the events already queued."""
        if self in self._table._subscribers:
            self._table._subscribers.remove(self)
            self._put(_END)

    def __enter__(self) -> PeerSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> PeerSubscription:
        return self

    async def __anext__(self) -> PeerEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        return item  # type: ignore[return-value]  # the queue holds events and the _END sentinel, handled above


class PeerTable:
    """The peer view of one discovery instance, applying the admission rules of this module.

    Implementations feed it sightings keyed by a *source* (an mDNS service name, a memory
    member, a static address): :meth:`offer` when a record appears or changes, :meth:`withdraw`
    when it goes, :meth:`malformed` when it cannot be decoded.

    Args:
        label: name used in log messages (e.g. the own peer id).
    """

    def __init__(self, label: str = "discovery") -> None:
        self.label = label
        self.me: PeerInfo | None = None
        self.started = False
        self.startup_conflict: DiscoveryError | None = None
        self.stats = DiscoveryStats()
        self._peers: dict[str, tuple[Hashable, PeerInfo]] = {}     # peer id -> (source, info)
        self._by_source: dict[Hashable, str] = {}                  # source -> admitted peer id
        self._refused: dict[Hashable, tuple[PeerInfo, str]] = {}   # source -> (info, reason)
        self._malformed: dict[Hashable, str] = {}
        self._subscribers: list[PeerSubscription] = []
        self._changed = asyncio.Event()
        self.closed = False

    @property
    def _protocol(self) -> int:
        """The version peers must speak: ours (``me.protocol``, :data:`PROTOCOL_VERSION` by default)."""
        return self.me.protocol if self.me is not None else PROTOCOL_VERSION

    def peers(self) -> dict[str, PeerInfo]:
        """Admitted peers by peer id (a copy)."""
        return {pid: info for pid, (_, info) in self._peers.items()}

    def _emit(self, event: PeerEvent) -> None:
        for sub in self._subscribers:
            sub._put(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def _refusal(self, source: Hashable, info: PeerInfo) -> tuple[str, str] | None:
        if self.me is not None and info.peer_id == self.me.peer_id:
            return "duplicate", f"peer id {info.peer_id} is already used by {info.address}"
        if info.protocol != self._protocol:
            return "version", (f"peer {info.peer_id} at {info.address} speaks protocol {info.protocol}, "
                               f"this peer speaks {self._protocol}")
        owner = self._peers.get(info.peer_id)
        if owner is not None and owner[0] != source:
            return "duplicate", (f"peer id {info.peer_id} at {info.address} is already used by "
                                 f"{owner[1].address}")
        return None

    def offer(self, source: Hashable, info: PeerInfo, *, own: bool = False) -> None:
        """Admit, update or refuse the record ``info`` seen from ``source``.

        Args:
            source: key of the record's origin; one source holds at most one record.
            info: the decoded record.
            own: the record is our own announcement (ignored).
        """
        if own or self.closed:
            return
        self._malformed.pop(source, None)
        refusal = self._refusal(source, info)
        if refusal is not None:
            self._drop(source)
            kind, reason = refusal
            if self._refused.get(source) == (info, reason):
                return
            self._refused[source] = (info, reason)
            if kind == "version":
                self.stats.refused_version += 1
                log.warning("%s: refusing a peer: %s (upgrade halo-p2p on both)", self.label, reason)
            else:
                self.stats.refused_duplicates += 1
                mine = self.me is not None and info.peer_id == self.me.peer_id
                log.log(logging.ERROR if mine else logging.WARNING, "%s: refusing a peer: %s (%s)", self.label,
                        reason, DUPLICATE_ID_FIX)
                if mine and not self.started:
                    self.startup_conflict = self.startup_conflict or DiscoveryError(reason, DUPLICATE_ID_FIX)
            self._emit(PeerEvent("refused", info, reason))
            return
        self._refused.pop(source, None)
        if self._by_source.get(source, info.peer_id) != info.peer_id:
            self._drop(source)
        current = self._peers.get(info.peer_id)
        if current is None:
            self._peers[info.peer_id] = (source, info)
            self._by_source[source] = info.peer_id
            log.info("%s: found peer %s (%s) at %s", self.label, info.peer_id, info.name, info.address)
            self._emit(PeerEvent("added", info))
        elif current[1] != info:
            self._peers[info.peer_id] = (source, info)
            log.debug("%s: peer %s updated", self.label, info.peer_id)
            self._emit(PeerEvent("updated", info))

    def withdraw(self, source: Hashable) -> None:
        """Forget the record of ``source`` (goodbye, expiry, or leaving the network)."""
        self._refused.pop(source, None)
        self._malformed.pop(source, None)
        self._drop(source)

    def malformed(self, source: Hashable, error: DiscoveryError) -> None:
        """Count and log (once per source and problem) a record that could not be decoded; drop its old record."""
        self._drop(source)
        self._refused.pop(source, None)
        if self._malformed.get(source) != error.problem:
            self._malformed[source] = error.problem
            self.stats.malformed_txt += 1
            log.warning("%s: ignoring a malformed peer record: %s", self.label, error)

    def _drop(self, source: Hashable) -> None:
        peer_id = self._by_source.pop(source, None)
        if peer_id is None:
            return
        _, info = self._peers.pop(peer_id)
        log.info("%s: peer %s at %s is gone", self.label, peer_id, info.address)
        self._emit(PeerEvent("removed", info))
        # promote the first record refused only because this one held the id
        for other, (cand, _reason) in list(self._refused.items()):
            if cand.peer_id == peer_id and (self.me is None or peer_id != self.me.peer_id) \
                    and cand.protocol == self._protocol:
                del self._refused[other]
                self.offer(other, cand)
                break

    def subscribe(self, *, replay: bool = True) -> PeerSubscription:
        """Subscribe to events; with ``replay`` the current peers come first as ``"added"`` events."""
        sub = PeerSubscription(self)
        if replay:
            for _, info in self._peers.values():
                sub._put(PeerEvent("added", info))
        if self.closed:
            sub._put(_END)
        else:
            self._subscribers.append(sub)
        return sub

    async def wait_for_peers(self, n: int, timeout_s: float) -> dict[str, PeerInfo]:
        """Wait until at least ``n`` peers are admitted.

        Args:
            n: number of other peers needed.
            timeout_s: longest wait in seconds.

        Returns:
            The peer view at that moment (at least ``n`` peers).

        Raises:
            DiscoveryError: fewer than ``n`` peers after ``timeout_s`` seconds, or the discovery closed.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while len(self._peers) < n:
                    if self.closed:
                        raise DiscoveryError(f"{self.label}: discovery closed with {len(self._peers)} of {n} peers")
                    await self._changed.wait()
        except TimeoutError:
            raise DiscoveryError(
                f"found {len(self._peers)} of {n} peers within {timeout_s:g} s",
                "start the other peers on the same network, check --interface, or pass --peer HOST:PORT") from None
        return self.peers()

    def close(self) -> None:
        """End every subscription and wake waiters; later offers are ignored."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.close()
        self._changed.set()


class TableView:
    """The read side of :class:`Discovery` for implementations that keep a :class:`PeerTable`
    in ``self._table``: ``stats``, ``peers``, ``subscribe`` and ``wait_for_peers``."""

    _table: PeerTable

    @property
    def stats(self) -> DiscoveryStats:
        """Live counters (malformed records, refusals)."""
        return self._table.stats

    def peers(self) -> dict[str, PeerInfo]:
        """The admitted peers by peer id (a copy, excluding this one)."""
        return self._table.peers()

    def subscribe(self, *, replay: bool = True) -> PeerSubscription:
        """Peer events; with ``replay`` the current peers come first as ``"added"``."""
        return self._table.subscribe(replay=replay)

    async def wait_for_peers(self, n: int, timeout_s: float) -> dict[str, PeerInfo]:
        """Wait until ``n`` peers are known (see :meth:`PeerTable.wait_for_peers`).

        Raises:
            DiscoveryError: fewer than ``n`` peers after ``timeout_s`` seconds.
        """
        return await self._table.wait_for_peers(n, timeout_s)

