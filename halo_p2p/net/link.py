"""The link seam: what one peer needs from its connection to another peer.

A :class:`Link` joins two peers with two channels:

* :attr:`Channel.RELIABLE` — ordered and lossless, for control messages. A lost packet costs a
  retransmission timeout (RTO) and, because delivery is in order, holds back everything sent
  after it (head-of-line blocking).
* :attr:`Channel.UNRELIABLE` — unordered, no retransmission, for activations. A message travels
  as ``ceil(len / fragment_bytes)`` packets and is lost whole if any one of them is lost, so
  callers keep messages at or below :attr:`Link.max_unreliable_bytes` (one packet by default).

This module holds only definitions (no I/O). Implementations:
:class:`~halo_p2p.net.memory.MemoryLink` (in memory, seeded loss, for tests and emulation) and,
later, the aiortc WebRTC link.

Units: sizes in bytes, times in seconds (``_s``) unless a name ends in ``_ms``, rates as
fractions in ``[0, 1]``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from halo_p2p.errors import ConfigError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "RTO_MAX_S",
    "SCTP_FRAGMENT_BYTES",
    "Channel",
    "ChannelStats",
    "Link",
    "LinkConditions",
    "LinkStats",
    "recv_timeout",
]

log = logging.getLogger(__name__)

SCTP_FRAGMENT_BYTES = 1160
"""User data per SCTP packet in aiortc (``USERDATA_MAX_LENGTH``), in bytes."""

MAX_MESSAGE_BYTES = 262144
"""Largest data-channel message aiortc accepts (``a=max-message-size``), in bytes."""

RTO_MAX_S = 60.0
"""Cap of the retransmission timeout after exponential back-off, in seconds (SCTP's RTO.Max)."""


class Channel(enum.IntEnum):
    """The two channels of a link."""

    RELIABLE = 0
    """Ordered, lossless; a lost packet costs an RTO and blocks later messages (control)."""
    UNRELIABLE = 1
    """Unordered, no retransmission; a message is lost whole if one fragment is lost (activations)."""


def _check_real(name: str, value: float, *, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value`` is a real number in range."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"LinkConditions.{name} = {value!r} is out of range",
                          f"use a number in {lo}{low}, {high}{hi}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConditions:
    """Network conditions of one direction of an emulated link.

    Attributes:
        plr: packet-loss rate, the probability that one fragment (packet) is lost on one
            transmission, in ``[0, 1]``. ``1.0`` is a black hole: every unreliable message is
            lost and reliable messages stall (see :class:`~halo_p2p.net.memory.MemoryLink`).
        delay_s: one-way propagation delay in seconds, ``>= 0``.
        jitter_s: extra one-way delay drawn uniformly from ``[0, jitter_s]`` per message, in
            seconds, ``>= 0``. Jitter reorders unreliable messages; the reliable channel stays
            in order.
        rto_s: initial retransmission timeout of the reliable channel in seconds, in
            ``(0, 60]``. It doubles on each consecutive loss of the same fragment, capped at
            :data:`RTO_MAX_S`. Real stacks floor it at 0.2 s (SCTP patched as in
            network-facts §3; stock aiortc: 1 s); smaller values only make tests faster.
        fragment_bytes: user data per packet in bytes, ``>= 1`` (aiortc's SCTP: 1160).
        bandwidth_bytes_per_s: if set, the link serializes bytes at this rate (bytes per
            second, ``> 0``): a message waits for the ones before it on the wire and then takes
            ``len / bandwidth`` seconds. ``None`` means infinitely fast.

    Raises:
        ConfigError: a field is out of range (the message names the field).
    """

    plr: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    rto_s: float = 0.2
    fragment_bytes: int = SCTP_FRAGMENT_BYTES
    bandwidth_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        _check_real("plr", self.plr, low=0.0, high=1.0)
        _check_real("delay_s", self.delay_s, low=0.0, high_open=True)
        _check_real("jitter_s", self.jitter_s, low=0.0, high_open=True)
        _check_real("rto_s", self.rto_s, low=0.0, high=RTO_MAX_S, low_open=True)
        if not isinstance(self.fragment_bytes, int) or isinstance(self.fragment_bytes, bool) \
                or self.fragment_bytes < 1:
            raise ConfigError(f"LinkConditions.fragment_bytes = {self.fragment_bytes!r} is out of range",
                              "use an integer >= 1")
        if self.bandwidth_bytes_per_s is not None:
            _check_real("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, low=0.0,
                        low_open=True, high_open=True)

    def fragments(self, nbytes: int) -> int:
        """Number of packets a message of ``nbytes`` bytes travels as (at least 1)."""
        return max(1, -(-nbytes // self.fragment_bytes))

    def delivery_probability(self, nbytes: int) -> float:
        """Probability that an unreliable message of ``nbytes`` bytes arrives: ``(1 - plr) ** fragments``."""
        return (1.0 - self.plr) ** self.fragments(nbytes)


@dataclass(slots=True)
class ChannelStats:
    """Counters of one channel as seen from one end of a link.

    "Sent", "lost", "dropped" and "retransmissions" count messages this end sent; "delivered"
    counts messages the link delivered to this end. So for one direction, the sender's
    ``messages_sent`` = the receiver's ``messages_delivered`` + the sender's ``messages_lost``
    + messages still in flight (or cancelled by a close).

    Attributes:
        messages_sent: messages accepted by ``send`` (excludes those refused for size).
        bytes_sent: payload bytes of those messages.
        messages_delivered: messages that arrived at this end (ready for ``recv``).
        bytes_delivered: payload bytes of those messages.
        messages_lost: messages sent by this end that the network lost (emulated by the memory
            link; estimated by a real link). Always 0 on the reliable channel.
        bytes_lost: payload bytes of those messages.
        messages_dropped_for_size: unreliable sends refused with ``ValueError`` because the
            message exceeded ``max_unreliable_bytes``.
        retransmissions: fragment retransmissions of this end's reliable messages.
    """

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_delivered: int = 0
    bytes_delivered: int = 0
    messages_lost: int = 0
    bytes_lost: int = 0
    messages_dropped_for_size: int = 0
    retransmissions: int = 0


@dataclass(slots=True)
class LinkStats:
    """Counters and measurements of one end of a link.

    Attributes:
        reliable: counters of :attr:`Channel.RELIABLE`.
        unreliable: counters of :attr:`Channel.UNRELIABLE`.
        rtt_ms: smoothed round-trip time in milliseconds, measured from heartbeats by a real
            link; ``None`` until measured (always ``None`` on the memory link).
        jitter_ms: round-trip time variation in milliseconds; ``None`` until measured.
        measured_plr: packet-loss rate in ``[0, 1]`` measured from heartbeats; ``None`` until
            measured.
    """

    reliable: ChannelStats = field(default_factory=ChannelStats)
    unreliable: ChannelStats = field(default_factory=ChannelStats)
    rtt_ms: float | None = None
    jitter_ms: float | None = None
    measured_plr: float | None = None

    def __getitem__(self, channel: Channel) -> ChannelStats:
        """The counters of ``channel`` (``stats[Channel.UNRELIABLE]``)."""
        return self.reliable if channel == Channel.RELIABLE else self.unreliable


@runtime_checkable
class Link(Protocol):
    """One end of a two-channel connection to one remote peer.

    Both channels carry opaque ``bytes``; framing and encoding belong to the layer above.
    Implementations must make :meth:`recv` cancellation-safe: a ``recv`` cancelled (for example
    by a timeout) loses no message.
    """

    @property
    def local_id(self) -> str:
        """Peer id of this end."""
        ...

    @property
    def remote_id(self) -> str:
        """Peer id of the other end."""
        ...

    @property
    def max_unreliable_bytes(self) -> int:
        """Largest message in bytes that :attr:`Channel.UNRELIABLE` accepts."""
        ...

    @property
    def stats(self) -> LinkStats:
        """Live counters of this end (updated in place)."""
        ...

    @property
    def closed(self) -> bool:
        """Whether either end has closed the link."""
        ...

    async def send(self, channel: Channel, data: bytes) -> None:
        """Send one message of ``len(data)`` bytes on ``channel``.

        On :attr:`Channel.RELIABLE` the message is never lost and arrives after every message
        sent before it on that channel; the call may wait for buffer space. On
        :attr:`Channel.UNRELIABLE` the call never waits on the network; the message may be lost
        or arrive out of order.

        Raises:
            ValueError: ``channel`` is :attr:`Channel.UNRELIABLE` and ``len(data)`` exceeds
                :attr:`max_unreliable_bytes` (callers must chunk).
            LinkClosed: the link is closed.
        """
        ...

    async def recv(self) -> tuple[Channel, bytes]:
        """Wait for the next message from the remote peer, on either channel.

        Returns:
            ``(channel, data)``.

        Raises:
            LinkClosed: the link is closed and every message that had arrived was read.
        """
        ...

    async def drain(self) -> None:
        """Wait until this end's unreliable send backlog is low enough to send a burst.

        Senders of many frames (a prompt's activations) call it every few frames so that the
        link's backlog cap does not drop them; links without a backlog return at once.

        Raises:
            TransportError: the backlog did not drain in the link's send timeout.
        """
        ...

    async def aclose(self) -> None:
        """Close both ends; idempotent. Messages in flight are dropped."""
        ...


async def recv_timeout(link: Link, timeout_s: float | None) -> tuple[Channel, bytes] | None:
    """Receive one message from ``link``, waiting at most ``timeout_s`` seconds.

    Args:
        link: the link to read.
        timeout_s: longest wait in seconds (``<= 0`` only takes a message that already arrived);
            ``None`` waits forever.

    Returns:
        ``(channel, data)``, or ``None`` if nothing arrived in time.

    Raises:
        LinkClosed: the link is closed and drained.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await link.recv()
    except TimeoutError:
        return None
