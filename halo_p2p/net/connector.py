"""The connector seam: how a peer gets authenticated :class:`~halo_p2p.net.link.Link` s to others.

A :class:`Connector` listens for links other peers open to this one (each handed to a callback
with the remote peer id, once authenticated) and dials the peers it wants to use. A
:class:`~halo_p2p.node.peer.PeerNode` runs over any connector:

* :class:`WebRtcConnector`: signed SDP offers over TCP (:mod:`halo_p2p.net.signaling`), then a
  WebRTC link (:class:`~halo_p2p.net.webrtc.WebRtcLink`); the real swarm.
* :class:`MemoryConnector`: in-memory links with seeded loss, delay and jitter from a
  :class:`~halo_p2p.net.hub.MemoryHub`; the emulated swarm and tests.

``aiortc`` is imported only when a :class:`WebRtcConnector` starts listening or dials, so the
protocol and the in-memory connector cost no WebRTC import.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from halo_p2p.net.hub import MemoryHub
from halo_p2p.net.link import Link, LinkConditions
from halo_p2p.net.lossy import LossyLink

if TYPE_CHECKING:
    from halo_p2p.net.signaling import SignalingServer

__all__ = ["Connector", "DialTarget", "LinkHandler", "MemoryConnector", "WebRtcConnector"]

log = logging.getLogger(__name__)

LinkHandler = Callable[[Link, str], Awaitable[None]]
"""``await on_link(link, remote_peer_id)`` for every authenticated incoming link. It should hand
the link off and return quickly (the connector may cancel it, and close the link, on ``aclose``)."""


class DialTarget(Protocol):
    """Where to reach a peer (a :class:`~halo_p2p.discovery.base.PeerInfo` is one)."""

    @property
    def peer_id(self) -> str | None:
        """The id the answering peer must have; ``None``: any key holder there (a ``--peer`` address)."""
        ...

    @property
    def host(self) -> str: ...

    @property
    def signaling_port(self) -> int: ...


@runtime_checkable
class Connector(Protocol):
    """Opens authenticated links to peers and accepts theirs.

    Implementations: :class:`WebRtcConnector`, :class:`~halo_p2p.net.memory.MemoryConnector`.
    """

    @property
    def address(self) -> str:
        """The address other peers dial (announced in discovery as the peer's host)."""
        ...

    @property
    def port(self) -> int:
        """The port other peers dial (announced as the signaling port); 0 before :meth:`listen`."""
        ...

    @property
    def stats(self) -> Counter[str]:
        """Counters for the status view: ``accepted`` links, ``refused_<reason>`` offers, ``failed``
        handshakes (live, updated in place)."""
        ...

    async def listen(self, on_link: LinkHandler) -> int:
        """Start accepting links; each authenticated one goes to ``on_link``. Returns :attr:`port`.

        Raises:
            TransportError: the port cannot be bound.
        """
        ...

    async def dial(self, peer: DialTarget, *, timeout_s: float) -> Link:
        """Open a link to ``peer`` (and only to a peer with id ``peer.peer_id`` unless it is ``None``).

        Raises:
            AuthError: the peer refused this peer's credentials, or answered with another
                identity (final: retrying cannot help).
            TransportError: unreachable, refused for another reason, or timed out.
        """
        ...

    async def aclose(self) -> None:
        """Stop listening and cancel handshakes in progress; idempotent. Links already handed
        out stay open (their owners close them)."""
        ...


def _emulate_loss(on_link: LinkHandler, plr: float) -> LinkHandler:
    """The one place where a WebRTC connector emulates packet loss (loopback swarms without
    network namespaces, ``halo-peer join --emulate-plr``): every link it accepts is wrapped in a
    :class:`~halo_p2p.net.lossy.LossyLink`."""
    if not plr:
        return on_link

    def lossy(link: Link, remote_id: str) -> Awaitable[None]:
        return on_link(LossyLink(link, plr=plr), remote_id)

    return lossy


class WebRtcConnector:
    """:class:`Connector` over signed signaling and WebRTC (see :mod:`halo_p2p.net.signaling`).

    Args:
        peer_id, name: this peer's id and display name (sent in offers and answers).
        swarm_key: the raw 32-byte swarm key authenticating signaling.
        host: IPv4 address to listen on and to pin ICE host candidates to.
        port: signaling TCP port (0: any free port).
        emulated_plr: packet loss emulated on the links this peer accepts (0: none).
    """

    def __init__(self, peer_id: str, name: str, swarm_key: bytes, *, host: str, port: int = 0,
                 emulated_plr: float = 0.0) -> None:
        self.peer_id, self.name = peer_id, name
        self._key = swarm_key
        self._host, self._port = host, port
        self._emulated_plr = emulated_plr
        self._server: SignalingServer | None = None
        self._stats: Counter[str] = Counter()

    @property
    def address(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._server.port if self._server is not None else 0

    @property
    def stats(self) -> Counter[str]:
        return self._server.stats if self._server is not None else self._stats

    async def listen(self, on_link: LinkHandler) -> int:
        """Pin ICE to :attr:`address` and answer signed offers there; see :meth:`Connector.listen`."""
        from halo_p2p.net.signaling import SignalingServer
        from halo_p2p.net.webrtc import pin_host_addresses

        pin_host_addresses([self._host])
        server = SignalingServer(self.peer_id, self.name, self._key, host=self._host, port=self._port,
                                 on_link=_emulate_loss(on_link, self._emulated_plr))
        server.stats.update(self._stats)
        self._server = server
        return await server.start()

    async def dial(self, peer: DialTarget, *, timeout_s: float) -> Link:
        """A signed offer to ``peer``'s signaling port, then the WebRTC link; see :meth:`Connector.dial`."""
        from halo_p2p.net.signaling import connect

        return await connect(peer.host, peer.signaling_port, peer_id=self.peer_id, name=self.name,
                             swarm_key=self._key, timeout_s=timeout_s, expect_peer_id=peer.peer_id)

    async def aclose(self) -> None:
        if self._server is not None:
            await self._server.aclose()


class MemoryConnector:
    """:class:`Connector` over a :class:`~halo_p2p.net.hub.MemoryHub` (joins it on creation).

    Args:
        hub: the in-memory network.
        peer_id: this peer's id.
        swarm_key: a peer dialing this one must hold the same key (else ``refused_auth``).
        conditions: conditions of this peer's own link, each direction (default lossless); a
            link to another member combines both members' conditions.
    """

    def __init__(self, hub: MemoryHub, peer_id: str, *, swarm_key: bytes = b"",
                 conditions: LinkConditions | None = None) -> None:
        self.hub, self.peer_id = hub, peer_id
        self._key = swarm_key
        self._port = 0
        hub.join(peer_id, conditions)
        self._stats: Counter[str] = Counter()

    @property
    def address(self) -> str:
        return self.hub.address

    @property
    def port(self) -> int:
        return self._port

    @property
    def stats(self) -> Counter[str]:
        return self._stats

    async def listen(self, on_link: LinkHandler) -> int:
        self._port = self.hub.listen(self.peer_id, self._key, on_link, self._stats)
        return self._port

    async def dial(self, peer: DialTarget, *, timeout_s: float) -> Link:
        return await self.hub.dial(self.peer_id, self._key, host=peer.host, port=peer.signaling_port,
                                   expect_peer_id=peer.peer_id)

    async def aclose(self) -> None:
        if self._port:
            self.hub.unlisten(self._port)
