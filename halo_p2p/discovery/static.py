"""Peers given on the command line (``--peer HOST:PORT``), and merging several discoveries.

:class:`StaticDiscovery` is the fallback where multicast does not reach (routed networks, Wi-Fi
with client isolation, containers). It knows only addresses, so it yields placeholder
:class:`~halo_p2p.discovery.info.PeerInfo` records with ``static=True`` and
``peer_id="static:HOST:PORT"`` (resources unknown, shown as 0); the real identity is learned when
connecting: a coordinator dials a placeholder expecting no particular peer id and names the peer
by the id in its signed answer (:func:`halo_p2p.node.swarm.dial_peers`).
:class:`CombinedDiscovery` merges the views of several discoveries (typically mDNS plus static);
a static placeholder and the mDNS record of the same device have different ids, and the
connecting layer tells them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import Final

from halo_p2p.discovery.info import PROTOCOL_VERSION, PeerInfo
from halo_p2p.discovery.protocol import Discovery
from halo_p2p.discovery.table import DiscoveryStats, PeerSubscription, PeerTable, TableView
from halo_p2p.errors import ConfigError

__all__ = ["CombinedDiscovery", "StaticDiscovery", "parse_peer_address"]

log = logging.getLogger(__name__)

_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_EXAMPLE: Final = "e.g. --peer 192.168.1.20:7700, --peer [fd00::2]:7700 or --peer laptop.local:7700"


def parse_peer_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``: an IPv4 address, ``[IPv6]`` in brackets, or a host name (RFC 1123).

    Args:
        text: the value of one ``--peer`` flag.

    Returns:
        ``(host, port)``, the host without brackets.

    Raises:
        ConfigError: the value is not ``HOST:PORT`` (the message names the value and the fix).
    """
    def bad(problem: str, fix: str = f"use HOST:PORT, {_EXAMPLE}") -> ConfigError:
        return ConfigError(f"--peer {text!r}: {problem}", fix)

    if not isinstance(text, str) or not text.strip():
        raise bad("empty address")
    value = text.strip()
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise bad("an IPv6 address in brackets needs a port after it", "use [IPv6]:PORT, e.g. [fd00::2]:7700")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise bad("the port is missing")
        if ":" in host:
            raise bad("an IPv6 address must be in brackets", "use [IPv6]:PORT, e.g. [fd00::2]:7700")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host!r} is not an IPv4 address") from None
        else:
            name = host.removesuffix(".")
            if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
                raise bad(f"{host!r} is not a valid host name",
                          "use letters, digits and '-' in dot-separated labels of 1-63 characters")
            host = name
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad(f"port {port_text!r} is not in 1..65535")
    return host, int(port_text)


class StaticDiscovery(TableView):
    """Peers from a fixed list of addresses, implementing :class:`~halo_p2p.discovery.protocol.Discovery`.

    Args:
        addresses: ``HOST:PORT`` strings (see :func:`parse_peer_address`); repeats are merged.

    Raises:
        ConfigError: an address is invalid (at construction, so bad flags fail early).
    """

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses: list[tuple[str, int]] = list(dict.fromkeys(parse_peer_address(a) for a in addresses))
        self._table = PeerTable("static")
        self._closed = False


    @staticmethod
    def placeholder(host: str, port: int) -> PeerInfo:
        """The placeholder record of ``host:port`` (``static=True``, unknown resources as 0)."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return PeerInfo(peer_id=f"static:{address}", name=address[:63], protocol=PROTOCOL_VERSION, models=(),
                        cores=0, memory_budget_bytes=0, compute_gflops=0.0, host=host, signaling_port=port,
                        static=True)

    async def start(self, me: PeerInfo) -> None:
        """Add a placeholder per address, skipping ``me``'s own ``host:port``."""
        self._table.me, self._table.label = me, me.peer_id
        for host, port in self.addresses:
            if (host, port) == (me.host, me.signaling_port):
                log.info("static: skipping %s:%d, it is this peer", host, port)
                continue
            self._table.offer((host, port), self.placeholder(host, port))
        self._table.started = True

    async def update(self, me: PeerInfo) -> None:
        """Nothing to announce: static peers learn about us when we connect."""
        self._table.me = me

    async def aclose(self) -> None:
        """End subscriptions; idempotent."""
        self._closed = True
        self._table.close()


class CombinedDiscovery(TableView):
    """The merged view of several discoveries; on a peer-id collision the earlier discovery wins.

    Args:
        discoveries: the discoveries to merge, in priority order; this object owns them (it
            starts and closes them).

    Raises:
        ConfigError: no discovery given.
    """

    def __init__(self, *discoveries: Discovery) -> None:
        if not discoveries:
            raise ConfigError("CombinedDiscovery needs at least one discovery", "pass mDNS and/or static discovery")
        self.discoveries = discoveries
        self._table = PeerTable("combined")
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[PeerSubscription] = []

    @property
    def stats(self) -> DiscoveryStats:
        """The sum of the children's counters and the merge's own refusals."""
        total = DiscoveryStats()
        for d in self.discoveries:
            total += d.stats
        total += self._table.stats
        return total

    async def start(self, me: PeerInfo) -> None:
        """Start every discovery concurrently; if one fails, close them all and raise its error.

        Raises:
            DiscoveryError: a discovery failed to start (e.g. the peer id is taken).
        """
        self._table.me, self._table.label = me, me.peer_id
        results = await asyncio.gather(*(d.start(me) for d in self.discoveries), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        for i, d in enumerate(self.discoveries):
            for info in d.peers().values():   # synchronously, so peers() is complete when start returns
                self._table.offer((i, info.peer_id), info)
            sub = d.subscribe(replay=False)
            self._subs.append(sub)
            self._tasks.append(asyncio.create_task(self._forward(i, sub), name=f"discovery-merge-{i}"))
        self._table.started = True

    async def _forward(self, i: int, events: PeerSubscription) -> None:
        async for event in events:
            source = (i, event.peer.peer_id)
            if event.kind == "removed":
                self._table.withdraw(source)
            elif event.kind == "refused":
                self._table._emit(event)   # already counted and logged by the child
            else:
                self._table.offer(source, event.peer)

    async def update(self, me: PeerInfo) -> None:
        """Announce changed fields of ``me`` through every discovery."""
        self._table.me = me
        await asyncio.gather(*(d.update(me) for d in self.discoveries))

    async def aclose(self) -> None:
        """Stop merging and close every discovery concurrently; idempotent."""
        for sub in self._subs:
            sub.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        results = await asyncio.gather(*(d.aclose() for d in self.discoveries), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("combined: closing a discovery failed: %s", r)
        self._table.close()
