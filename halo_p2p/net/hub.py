"""An in-memory network of :class:`~halo_p2p.net.memory.MemoryLink` s between peers.

Peers join a :class:`MemoryHub` with the conditions of their own link, listen on a port, and dial
each other through a :class:`~halo_p2p.net.connector.MemoryConnector` (the emulated swarm's real
:class:`~halo_p2p.node.peer.PeerNode` s run over it). No sockets: a dial builds a seeded
:func:`~halo_p2p.net.memory.memory_link_pair` and hands one end to the listener.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

from halo_p2p.errors import AuthError, ConfigError, TransportError
from halo_p2p.net.link import LinkConditions
from halo_p2p.net.memory import MemoryLink, memory_link_pair

__all__ = ["Accept", "MemoryHub"]

log = logging.getLogger(__name__)

_LOSSLESS: Final = LinkConditions()


def _combine(a: LinkConditions, b: LinkConditions) -> LinkConditions:
    """The conditions of a path over two links: one lossless side gives the other's conditions
    unchanged; else losses compound, delays and jitters add, the larger RTO, the smaller fragment
    and bandwidth."""
    if a == _LOSSLESS:
        return b
    if b == _LOSSLESS:
        return a
    bw = [x for x in (a.bandwidth_bytes_per_s, b.bandwidth_bytes_per_s) if x is not None]
    return LinkConditions(plr=a.plr + b.plr - a.plr * b.plr, delay_s=a.delay_s + b.delay_s,
                          jitter_s=a.jitter_s + b.jitter_s, rto_s=max(a.rto_s, b.rto_s),
                          fragment_bytes=min(a.fragment_bytes, b.fragment_bytes),
                          bandwidth_bytes_per_s=min(bw) if bw else None)


Accept = Callable[[MemoryLink, str], Awaitable[None]]
"""``await accept(link, dialer_id)``: a listener takes an incoming link."""

_FIRST_PORT: Final = 20000
_PAIR_STRIDE: Final = 1_000_003


class MemoryHub:
    """An in-memory network: peers join with their link's conditions, listen, and dial each other.

    The link between two members is a :func:`memory_link_pair` whose conditions, each way, combine
    both members' conditions (see ``_combine``: the lossless side of a star takes the other's) and
    whose seed is ``seed + j + i * 1_000_003`` for the members that joined ``i``-th and ``j``-th
    (``i < j``), so the links of the first member (an emulated swarm's coordinator) are seeded
    ``seed + j``. Dialing checks the listener's id and swarm key as signaling would.

    Args:
        seed: base seed of every link's loss and jitter draws.
        address: the host every member announces.
    """

    def __init__(self, *, seed: int = 0, address: str = "127.0.0.1") -> None:
        self.seed, self.address = seed, address
        self._members: dict[str, tuple[int, LinkConditions]] = {}
        self._listeners: dict[int, tuple[str, bytes, Accept, Counter[str]]] = {}

    def join(self, peer_id: str, conditions: LinkConditions | None = None) -> int:
        """Add a member whose own link has ``conditions`` (default lossless); returns its port.

        Raises:
            ConfigError: ``peer_id`` already joined.
        """
        if peer_id in self._members:
            raise ConfigError(f"peer {peer_id!r} joined this memory hub twice", "give every peer its own id")
        self._members[peer_id] = (len(self._members), conditions or _LOSSLESS)
        return _FIRST_PORT + self._members[peer_id][0]

    def conditions(self, peer_id: str) -> LinkConditions:
        """The conditions of member ``peer_id``'s own link."""
        return self._members[peer_id][1]

    def listen(self, peer_id: str, swarm_key: bytes, accept: Accept, stats: Counter[str]) -> int:
        """Hand links dialed to member ``peer_id`` to ``accept``; returns its port."""
        port = _FIRST_PORT + self._members[peer_id][0]
        self._listeners[port] = (peer_id, swarm_key, accept, stats)
        return port

    def unlisten(self, port: int) -> None:
        self._listeners.pop(port, None)

    async def dial(self, dialer: str, swarm_key: bytes, *, host: str, port: int,
                   expect_peer_id: str | None) -> MemoryLink:
        """A link from member ``dialer`` to the member listening at ``host:port``.

        Raises:
            TransportError: nobody listens there.
            AuthError: the listener is not ``expect_peer_id`` (when given), or holds another swarm key.
        """
        listener = self._listeners.get(port) if host == self.address else None
        if listener is None:
            raise TransportError(f"cannot reach peer at {host}:{port}: nobody listens there",
                                 "check that the peer is up")
        peer_id, key, accept, stats = listener
        if expect_peer_id is not None and peer_id != expect_peer_id:
            raise AuthError(f"peer {peer_id!r} at {host}:{port} is not the expected peer {expect_peer_id!r}",
                            "check the address of the peer")
        if not hmac.compare_digest(key, swarm_key):
            stats["refused_auth"] += 1
            raise AuthError(f"peer at {host}:{port} refused our swarm key", "use the same swarm key on every peer")
        (i, mine), (j, theirs) = self._members[dialer], self._members[peer_id]
        lo, hi = sorted((i, j))
        cond = _combine(mine, theirs)
        a, b = memory_link_pair(dialer, peer_id, a_to_b=cond, b_to_a=cond, seed=self.seed + hi + lo * _PAIR_STRIDE)
        stats["accepted"] += 1
        try:
            await accept(b, dialer)
        except BaseException:
            await a.aclose()
            raise
        return a
