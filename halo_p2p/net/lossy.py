"""Emulated packet loss around any link: :class:`LossyLink`.

A loopback swarm without network namespaces (``halo-peer swarm`` as a user, ``halo-peer join
--emulate-plr``) still needs lossy links. :class:`LossyLink` wraps one end of a real link and
loses unreliable messages at that end, in both directions: a message sent is lost with
probability ``plr`` before it reaches the inner link, a message received is lost with
probability ``plr`` before :meth:`LossyLink.recv` returns it. The reliable channel is never
touched (a real lossy network costs it retransmissions, which this wrapper does not emulate).

The link's loss estimate must see the emulated loss, because sessions size FEC and deadlines
from ``stats.measured_plr`` on **both** ends. A :class:`~halo_p2p.net.webrtc.WebRtcLink`
measures it from heartbeats it sends and answers internally, which never pass through
``send``/``recv``; such a link offers the :class:`HeartbeatLoss` hook, and the wrapper installs
the same drop decision there, so this end's heartbeats and acknowledgements are lost like any
unreliable frame. Both ends then measure about ``1 - (1 - plr) ** 2`` from heartbeats, as on a
network that loses ``plr`` per direction at this end. Links that measure nothing
(:class:`~halo_p2p.net.memory.MemoryLink`) need no hook.

``stats`` is the inner link's object, kept consistent: a message lost on the way out counts as
sent and lost, one lost on the way in is taken back out of the delivered counters.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from halo_p2p.errors import ConfigError
from halo_p2p.net.link import Channel, Link, LinkStats

__all__ = ["HeartbeatLoss", "LossyLink"]

log = logging.getLogger(__name__)


@runtime_checkable
class HeartbeatLoss(Protocol):
    """A link that exchanges heartbeats of its own (on the unreliable channel) and can lose them."""

    def set_heartbeat_loss(self, drop: Callable[[], bool] | None) -> None:
        """Ask ``drop()`` once per heartbeat frame sent or received at this end; ``True`` loses it.

        ``None`` turns the emulation off.
        """
        ...


class LossyLink:
    """One end of ``inner`` that loses unreliable messages with probability ``plr`` each way.

    Satisfies :class:`~halo_p2p.net.link.Link`; everything else is delegated to ``inner``.

    Args:
        inner: the link to wrap (this end of it); owned by the wrapper from now on.
        plr: probability in ``[0, 1)`` that one unreliable message, sent or received at this
            end, is lost (per message, not per fragment: halo-p2p sends one-packet frames).
        seed: seeds the loss draws with the two peer ids (reproducible sequences of drops);
            ``None`` draws from the operating system's entropy.

    Raises:
        ConfigError: ``plr`` is not a number in ``[0, 1)``.
    """

    def __init__(self, inner: Link, *, plr: float, seed: int | None = None) -> None:
        if isinstance(plr, bool) or not isinstance(plr, int | float) or math.isnan(plr) or not 0 <= plr < 1:
            raise ConfigError(f"LossyLink plr = {plr!r} is out of range", "use a number in [0, 1), e.g. 0.05")
        self._inner = inner
        self._plr = float(plr)
        self._rng = random.Random(None if seed is None else f"halo-lossy/{seed}/{inner.local_id}/{inner.remote_id}")
        self.dropped_sent = 0
        """Unreliable messages this wrapper lost on the way out (heartbeats excluded)."""
        self.dropped_received = 0
        """Unreliable messages this wrapper lost on the way in (heartbeats excluded)."""
        if isinstance(inner, HeartbeatLoss):
            inner.set_heartbeat_loss(self._drop if self._plr else None)

    def __repr__(self) -> str:
        return f"LossyLink({self._inner!r}, plr={self._plr:g})"

    def _drop(self) -> bool:
        return self._rng.random() < self._plr

    @property
    def inner(self) -> Link:
        """The wrapped link."""
        return self._inner

    @property
    def plr(self) -> float:
        """The emulated loss rate per message and direction."""
        return self._plr

    @property
    def local_id(self) -> str:
        """Peer id of this end."""
        return self._inner.local_id

    @property
    def remote_id(self) -> str:
        """Peer id of the other end."""
        return self._inner.remote_id

    @property
    def max_unreliable_bytes(self) -> int:
        """Largest unreliable message in bytes (the inner link's)."""
        return self._inner.max_unreliable_bytes

    @property
    def stats(self) -> LinkStats:
        """The inner link's live counters, with this wrapper's losses counted as the network's."""
        return self._inner.stats

    @property
    def closed(self) -> bool:
        """Whether the inner link is closed."""
        return self._inner.closed

    async def send(self, channel: Channel, data: bytes) -> None:
        """Send as ``inner`` does; an unreliable message is lost with probability ``plr``.

        A lost message counts as sent and lost (``messages_lost``), as if the network lost it.

        Raises:
            ValueError: an unreliable message over :attr:`max_unreliable_bytes` (never dropped
                silently: the size check comes first).
            LinkClosed, TransportError: as the inner link's ``send``.
        """
        if channel == Channel.UNRELIABLE and self._plr and not self._inner.closed \
                and len(data) <= self._inner.max_unreliable_bytes and self._drop():
            counters = self._inner.stats.unreliable
            counters.messages_sent += 1
            counters.bytes_sent += len(data)
            counters.messages_lost += 1
            counters.bytes_lost += len(data)
            self.dropped_sent += 1
            return
        await self._inner.send(channel, data)

    async def recv(self) -> tuple[Channel, bytes]:
        """The next message that survives the emulated loss; cancellation-safe.

        Raises:
            LinkClosed: the inner link is closed and drained.
        """
        while True:
            channel, data = await self._inner.recv()
            if channel != Channel.UNRELIABLE or not self._plr or not self._drop():
                return channel, data
            counters = self._inner.stats.unreliable       # it never arrived
            counters.messages_delivered -= 1
            counters.bytes_delivered -= len(data)
            self.dropped_received += 1

    async def drain(self) -> None:
        """As the inner link's ``drain``."""
        await self._inner.drain()

    async def aclose(self) -> None:
        """Close the inner link (idempotent)."""
        await self._inner.aclose()
