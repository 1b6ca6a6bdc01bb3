"""An in-memory :class:`~halo_p2p.net.link.Link` with seeded, per-fragment loss.

For tests and emulation: no sockets, no tasks, only ``loop.call_at`` timers. Each direction has
its own :class:`~halo_p2p.net.link.LinkConditions` and its own seeded randomness. The fate of an
unreliable message (lost or not, its jitter) is a function of the seed, the direction, the
message bytes and how often those exact bytes were sent before, so a run is reproducible even
when the timing of the sends (and therefore their order) varies; reliable deliveries draw from a
seeded stream in send order.

The model, per direction (see network-facts.md §2, §3, §5):

* A message of ``n`` bytes travels as ``ceil(n / fragment_bytes)`` fragments (at least one),
  each lost with probability ``plr`` on each transmission.
* Unreliable: lost whole if any fragment is lost; otherwise it arrives after
  ``delay_s + U(0, jitter_s)`` (plus serialization time if a bandwidth is set). Jitter reorders.
* Reliable: never lost. Each loss of a fragment delays that fragment by the current RTO, which
  doubles per consecutive loss of it (capped at 60 s); a message is complete when its slowest
  fragment is. Head-of-line blocking: it is delivered at
  ``max(previous reliable delivery, send + delay + jitter + retransmission delays)``.
  With ``plr == 1.0`` reliable messages stall (they and everything after them on that channel
  wait) until :meth:`MemoryLink.set_conditions` lowers the loss, when they are sent again.
* Bandwidth (optional) is one FIFO wire per direction shared by both channels; retransmissions
  do not take wire time.

What it does not model: congestion control (cwnd collapse, send-queue growth under
saturation) and the 262144-byte message limit of the reliable channel.

:class:`~halo_p2p.net.hub.MemoryHub` is an in-memory network of such links.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import random
from collections import OrderedDict, deque
from typing import Final

from halo_p2p.errors import ConfigError, LinkClosed
from halo_p2p.net.link import (
    MAX_MESSAGE_BYTES,
    RTO_MAX_S,
    SCTP_FRAGMENT_BYTES,
    Channel,
    LinkConditions,
    LinkStats,
)

__all__ = ["MemoryLink", "memory_link_pair"]

log = logging.getLogger(__name__)

_CLOSED: Final = object()
"""Inbox sentinel queued behind the last delivered message when the link closes."""

_LOSSLESS: Final = LinkConditions()
_MAX_TRACKED_MESSAGES: Final = 1 << 17   # attempt counters kept for resent messages


class _Direction:
    """One direction of a memory link: conditions, random streams and the in-flight messages.

    Args:
        loop: the event loop that runs the delivery timer.
        conditions: initial conditions of this direction.
        seed: base seed; each channel gets its own stream derived from it and ``label``.
        label: ``"a->b"`` or ``"b->a"``, so the two directions draw independent streams.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, conditions: LinkConditions, seed: int,
                 label: str) -> None:
        self.loop = loop
        self.conditions = conditions
        self.rng = {ch: random.Random(f"halo-memory-link/{seed}/{label}/{ch.name}") for ch in Channel}
        self.key = hashlib.blake2b(f"halo-memory-link/{seed}/{label}".encode(), digest_size=16).digest()
        self.attempts: OrderedDict[bytes, int] = OrderedDict()   # bounded: digest -> sends so far
        self.wire_free_at = 0.0         # loop time when the wire finishes serializing (bandwidth)
        self.reliable_last_at = 0.0     # loop time of the latest scheduled reliable delivery
        self.stalled: deque[bytes] = deque()    # reliable messages held by a black hole (plr 1)
        self.heap: list[tuple[float, int, Channel, bytes]] = []
        self.seq = 0                    # tie-breaker: equal times deliver in send order
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.receiver: MemoryLink | None = None
        self.idle = asyncio.Event()     # set while nothing is in flight
        self.idle.set()

    # -- scheduling --------------------------------------------------------------------------

    def _serialize(self, nbytes: int, now: float) -> float:
        """Loop time when a message of ``nbytes`` bytes sent at ``now`` has left the wire."""
        bandwidth = self.conditions.bandwidth_bytes_per_s
        if bandwidth is None:
            return now
        done = max(now, self.wire_free_at) + nbytes / bandwidth
        self.wire_free_at = done
        return done

    def send_unreliable(self, data: bytes, stats: LinkStats) -> None:
        """Draw the fate of one unreliable message and schedule it unless lost."""
        cond = self.conditions
        rng = self._message_rng(data)
        lost = False
        for _ in range(cond.fragments(len(data))):
            lost |= rng.random() < cond.plr
        jitter = rng.uniform(0.0, cond.jitter_s)
        left_at = self._serialize(len(data), self.loop.time())
        if lost:
            stats.unreliable.messages_lost += 1
            stats.unreliable.bytes_lost += len(data)
            return
        self._push(left_at + cond.delay_s + jitter, Channel.UNRELIABLE, data)

    def _message_rng(self, data: bytes) -> random.Random:
        """A generator seeded by (seed, direction, message bytes, attempt number)."""
        digest = hashlib.blake2b(data, digest_size=16, key=self.key).digest()
        attempt = self.attempts.pop(digest, 0)
        self.attempts[digest] = attempt + 1
        if len(self.attempts) > _MAX_TRACKED_MESSAGES:
            self.attempts.popitem(last=False)
        return random.Random(int.from_bytes(digest, "little") + attempt)

    def send_reliable(self, data: bytes, stats: LinkStats) -> None:
        """Schedule one reliable message after its retransmissions and the messages before it."""
        cond = self.conditions
        if cond.plr >= 1.0 or self.stalled:
            self.stalled.append(data)
            self.idle.clear()
            return
        rng = self.rng[Channel.RELIABLE]
        retransmit_s = 0.0
        for _ in range(cond.fragments(len(data))):
            fragment_s, rto = 0.0, cond.rto_s
            while rng.random() < cond.plr:
                fragment_s += rto
                rto = min(2.0 * rto, RTO_MAX_S)
                stats.reliable.retransmissions += 1
            retransmit_s = max(retransmit_s, fragment_s)
        jitter = rng.uniform(0.0, cond.jitter_s)
        left_at = self._serialize(len(data), self.loop.time())
        at = max(self.reliable_last_at, left_at + cond.delay_s + jitter + retransmit_s)
        self.reliable_last_at = at
        self._push(at, Channel.RELIABLE, data)

    def set_conditions(self, conditions: LinkConditions, stats: LinkStats) -> None:
        """Apply ``conditions`` to later sends; release stalled reliable messages if plr < 1."""
        self.conditions = conditions
        if conditions.plr < 1.0 and self.stalled:
            held, self.stalled = self.stalled, deque()
            log.debug("releasing %d stalled reliable messages", len(held))
            for data in held:
                self.send_reliable(data, stats)

    def _push(self, at: float, channel: Channel, data: bytes) -> None:
        """Queue ``data`` for delivery at loop time ``at`` and (re)arm the timer."""
        heapq.heappush(self.heap, (at, self.seq, channel, data))
        self.seq += 1
        self.idle.clear()
        if self.timer is None or at < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(at, self._fire)
            self.timer_at = at

    def _fire(self) -> None:
        """Deliver every message that is due, in (time, send order), then re-arm."""
        self.timer = None
        due = max(self.loop.time(), self.timer_at)     # a timer may fire a clock tick early
        receiver = self.receiver
        while self.heap and self.heap[0][0] <= due:
            _, _, channel, data = heapq.heappop(self.heap)
            if receiver is not None:
                receiver._deliver(channel, data)
        if self.heap:
            self.timer_at = self.heap[0][0]
            self.timer = self.loop.call_at(self.timer_at, self._fire)
        elif not self.stalled:
            self.idle.set()

    @property
    def in_flight(self) -> int:
        """Messages scheduled or stalled, not yet delivered."""
        return len(self.heap) + len(self.stalled)

    def cancel(self) -> int:
        """Drop every in-flight message and the timer; returns how many messages were dropped."""
        dropped = self.in_flight
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.heap.clear()
        self.stalled.clear()
        self.idle.set()
        return dropped


class MemoryLink:
    """One end of an in-memory link; satisfies :class:`~halo_p2p.net.link.Link`.

    Build pairs with :func:`memory_link_pair`. ``send`` never suspends: it draws the message's
    fate and schedules its delivery on the event loop, then returns.
    """

    def __init__(self, local_id: str, remote_id: str, *, outgoing: _Direction, incoming: _Direction,
                 max_unreliable_bytes: int) -> None:
        self._local_id = local_id
        self._remote_id = remote_id
        self._out = outgoing
        self._in = incoming
        self._max_unreliable_bytes = max_unreliable_bytes
        self._stats = LinkStats()
        self._inbox: asyncio.Queue[tuple[Channel, bytes] | object] = asyncio.Queue()
        self._peer: MemoryLink | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"MemoryLink({self._local_id!r} -> {self._remote_id!r}, {state})"

    @property
    def local_id(self) -> str:
        """Peer id of this end."""
        return self._local_id

    @property
    def remote_id(self) -> str:
        """Peer id of the other end."""
        return self._remote_id

    @property
    def max_unreliable_bytes(self) -> int:
        """Largest unreliable message in bytes."""
        return self._max_unreliable_bytes

    @property
    def stats(self) -> LinkStats:
        """Live counters of this end."""
        return self._stats

    @property
    def closed(self) -> bool:
        """Whether either end has closed the link."""
        return self._closed

    @property
    def conditions(self) -> LinkConditions:
        """Conditions of the messages this end sends."""
        return self._out.conditions

    @property
    def in_flight(self) -> int:
        """Messages this end sent that are neither delivered nor lost yet."""
        return self._out.in_flight

    async def wait_idle(self) -> None:
        """Wait until every message this end sent was delivered or lost (``in_flight == 0``).

        Reliable messages stalled by ``plr == 1.0`` keep it waiting; so use a timeout there.
        """
        await self._out.idle.wait()

    def set_conditions(self, outgoing: LinkConditions, incoming: LinkConditions | None = None) -> None:
        """Change the conditions from now on; messages already in flight keep their times.

        Args:
            outgoing: conditions of the messages this end sends.
            incoming: conditions of the messages this end receives; ``None`` means the same as
                ``outgoing``.

        Raises:
            LinkClosed: the link is closed.
        """
        if self._closed:
            raise LinkClosed(f"link {self._local_id} -> {self._remote_id} is closed")
        assert self._peer is not None
        self._out.set_conditions(outgoing, self._stats)
        self._in.set_conditions(outgoing if incoming is None else incoming, self._peer._stats)

    async def send(self, channel: Channel, data: bytes) -> None:
        """Send ``data`` on ``channel``; see :meth:`~halo_p2p.net.link.Link.send`.

        Args:
            channel: :attr:`Channel.RELIABLE` or :attr:`Channel.UNRELIABLE`.
            data: the message (any bytes-like object; it is copied).

        Raises:
            TypeError: ``data`` is not bytes-like.
            ValueError: an unreliable message longer than :attr:`max_unreliable_bytes` bytes.
            LinkClosed: the link is closed.
        """
        if self._closed:
            raise LinkClosed(f"link {self._local_id} -> {self._remote_id} is closed")
        channel = Channel(channel)
        data = memoryview(data).tobytes()     # a snapshot; also refuses ints (bytes(5) would not)
        counters = self._stats[channel]
        if channel is Channel.UNRELIABLE:
            if len(data) > self._max_unreliable_bytes:
                counters.messages_dropped_for_size += 1
                raise ValueError(f"unreliable message of {len(data)} bytes exceeds the "
                                 f"{self._max_unreliable_bytes}-byte limit of link {self._local_id} -> "
                                 f"{self._remote_id}; chunk it")
            counters.messages_sent += 1
            counters.bytes_sent += len(data)
            self._out.send_unreliable(data, self._stats)
        else:
            counters.messages_sent += 1
            counters.bytes_sent += len(data)
            self._out.send_reliable(data, self._stats)

    def _deliver(self, channel: Channel, data: bytes) -> None:
        """Called by the incoming direction: queue a message for :meth:`recv`."""
        counters = self._stats[channel]
        counters.messages_delivered += 1
        counters.bytes_delivered += len(data)
        self._inbox.put_nowait((channel, data))

    async def recv(self) -> tuple[Channel, bytes]:
        """Wait for the next message; see :meth:`~halo_p2p.net.link.Link.recv`.

        Cancellation-safe: a cancelled ``recv`` leaves the message in the inbox.

        Returns:
            ``(channel, data)``.

        Raises:
            LinkClosed: the link is closed and every delivered message was read.
        """
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)     # every later (or concurrent) recv raises too
            raise LinkClosed(f"link {self._local_id} -> {self._remote_id} is closed")
        assert isinstance(item, tuple)
        return item

    async def drain(self) -> None:
        """No backlog to wait for: the emulated wire never queues at the sender."""

    async def aclose(self) -> None:
        """Close both ends: cancel in-flight messages in both directions; idempotent.

        Each end's :meth:`recv` still returns the messages that had already arrived, then
        raises :class:`~halo_p2p.errors.LinkClosed`.
        """
        if self._closed:
            return
        assert self._peer is not None
        dropped = self._out.cancel() + self._in.cancel()
        for end in (self, self._peer):
            end._closed = True
            end._inbox.put_nowait(_CLOSED)
        log.debug("closed link %s <-> %s (%d messages in flight dropped)",
                  self._local_id, self._remote_id, dropped)


def memory_link_pair(a_id: str, b_id: str, *, a_to_b: LinkConditions = _LOSSLESS,
                     b_to_a: LinkConditions | None = None, seed: int = 0,
                     max_unreliable_bytes: int = SCTP_FRAGMENT_BYTES,
                     ) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory link ends, ``a`` (id ``a_id``) and ``b`` (id ``b_id``).

    Must be called inside a running event loop; both ends use it for their timers.

    Args:
        a_id: peer id of end ``a``.
        b_id: peer id of end ``b``.
        a_to_b: conditions of messages from ``a`` to ``b``.
        b_to_a: conditions of messages from ``b`` to ``a``; ``None`` means the same as ``a_to_b``.
        seed: seeds the loss and jitter draws; the same seed and the same sequence of sends give
            the same losses and times (each direction and channel draws its own stream).
        max_unreliable_bytes: largest unreliable message in bytes, in ``[1, 262144]``.

    Returns:
        ``(a, b)``.

    Raises:
        ConfigError: ``max_unreliable_bytes`` is out of range.
        RuntimeError: no event loop is running.
    """
    if not isinstance(max_unreliable_bytes, int) or not 1 <= max_unreliable_bytes <= MAX_MESSAGE_BYTES:
        raise ConfigError(f"max_unreliable_bytes = {max_unreliable_bytes!r} is out of range",
                          f"use an integer in [1, {MAX_MESSAGE_BYTES}]")
    loop = asyncio.get_running_loop()
    ab = _Direction(loop, a_to_b, seed, "a->b")
    ba = _Direction(loop, a_to_b if b_to_a is None else b_to_a, seed, "b->a")
    a = MemoryLink(a_id, b_id, outgoing=ab, incoming=ba, max_unreliable_bytes=max_unreliable_bytes)
    b = MemoryLink(b_id, a_id, outgoing=ba, incoming=ab, max_unreliable_bytes=max_unreliable_bytes)
    a._peer, b._peer = b, a
    ab.receiver, ba.receiver = b, a
    return a, b
