"""The discovery seam: who the other peers are, and how this peer is announced.

A peer announces one :class:`~halo_p2p.discovery.info.PeerInfo` and learns the others'.
Implementations: :class:`~halo_p2p.discovery.memory.MemoryDiscovery` (in process, for tests),
:class:`~halo_p2p.discovery.static.StaticDiscovery` (``--peer HOST:PORT``) and
:class:`~halo_p2p.discovery.mdns.MdnsDiscovery` (mDNS/DNS-SD, RFC 6762/6763), all over a
:class:`~halo_p2p.discovery.table.PeerTable` (the admission rules).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from halo_p2p.discovery.info import PeerInfo
from halo_p2p.discovery.table import DiscoveryStats, PeerSubscription

__all__ = ["Discovery"]


@runtime_checkable
class Discovery(Protocol):
    """Finds the other peers and announces this one. Every wait is bounded; ``aclose`` is idempotent."""

    @property
    def stats(self) -> DiscoveryStats:
        """Live counters (malformed records, refusals)."""
        ...

    async def start(self, me: PeerInfo) -> None:
        """Announce ``me`` and start watching for peers.

        Raises:
            DiscoveryError: another device already uses ``me.peer_id``.
        """
        ...

    async def update(self, me: PeerInfo) -> None:
        """Announce changed fields of ``me`` (same peer id), e.g. a new model or a measured rate."""
        ...

    def peers(self) -> dict[str, PeerInfo]:
        """The current view by peer id, excluding this peer and refused records."""
        ...

    def subscribe(self, *, replay: bool = True) -> PeerSubscription:
        """Events from now on (after ``"added"`` for the current peers when ``replay``)."""
        ...

    async def wait_for_peers(self, n: int, timeout_s: float) -> dict[str, PeerInfo]:
        """Wait for ``n`` peers (see :meth:`PeerTable.wait_for_peers`)."""
        ...

    async def aclose(self) -> None:
        """Withdraw the announcement, stop watching, end subscriptions."""
        ...
