"""An in-process :class:`~halo_p2p.discovery.protocol.Discovery` for tests and emulation.

A :class:`MemoryNetwork` plays the LAN: every member publishes its record as the same TXT
properties mDNS would carry (:func:`~halo_p2p.discovery.txt.encode_txt`), and every other
member decodes them (:func:`~halo_p2p.discovery.txt.decode_txt`), so the TXT limits, the
malformed-record handling and the admission rules (duplicate ids, protocol version) are the
same as on a real network. Delivery is instant and synchronous: when ``start``, ``update`` or
``aclose`` returns, every member has its ``"added"``, ``"updated"`` or ``"removed"`` event.

Like mDNS probing (RFC 6762 §8.1), :meth:`MemoryDiscovery.start` refuses a peer id that a
member already announces: it emits ``"refused"``, does not join and raises
:class:`~halo_p2p.errors.DiscoveryError`.
"""

from __future__ import annotations

import itertools
import logging

from halo_p2p.discovery.info import PeerInfo
from halo_p2p.discovery.table import PeerTable, TableView
from halo_p2p.discovery.txt import TxtProps, decode_txt, encode_txt
from halo_p2p.errors import ConfigError, DiscoveryError

__all__ = ["MemoryDiscovery", "MemoryNetwork"]

log = logging.getLogger(__name__)

Record = tuple[TxtProps, str, int]
"""A published record: TXT properties, host, port."""


class MemoryNetwork:
    """A shared in-process registry of peer records (one per source), seen by every member."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._members: list[MemoryDiscovery] = []
        self._ids = itertools.count(1)

    def records(self) -> dict[str, Record]:
        """Published records by source name (a copy)."""
        return dict(self._records)

    def publish(self, source: str, props: TxtProps, host: str, port: int) -> None:
        """Publish (or replace) the record of ``source`` and deliver it to every member.

        Members publish through :class:`MemoryDiscovery`; tests may call this directly to
        inject foreign or malformed records.
        """
        self._records[source] = (dict(props), host, port)
        for member in list(self._members):
            member._receive(source, self._records[source])

    def unpublish(self, source: str) -> None:
        """Withdraw the record of ``source`` (members get ``"removed"``); unknown sources are ignored."""
        if self._records.pop(source, None) is not None:
            for member in list(self._members):
                member._receive(source, None)

    def _next_source(self) -> str:
        return f"memory-{next(self._ids)}"


class MemoryDiscovery(TableView):
    """One member of a :class:`MemoryNetwork`, implementing :class:`~halo_p2p.discovery.protocol.Discovery`.

    Args:
        network: the shared network.
    """

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.source = network._next_source()
        self._table = PeerTable(self.source)
        self._me: PeerInfo | None = None
        self._closed = False


    @property
    def me(self) -> PeerInfo | None:
        """The record this member announces (``None`` before :meth:`start`)."""
        return self._me

    def _receive(self, source: str, record: Record | None) -> None:
        if record is None:
            self._table.withdraw(source)
            return
        props, host, port = record
        try:
            info = decode_txt(props, host, port)
        except DiscoveryError as exc:
            self._table.malformed(source, exc)
            return
        self._table.offer(source, info, own=source == self.source)

    async def start(self, me: PeerInfo) -> None:
        """Join the network: learn the published records, then publish ``me``.

        Raises:
            DiscoveryError: a member already announces ``me.peer_id`` (this member does not
                join), or this member was already started or closed.
        """
        if self._me is not None or self._closed:
            raise DiscoveryError(f"{self.source}: discovery already started or closed", "create a new MemoryDiscovery")
        self._table.me, self._table.label = me, me.peer_id
        self._me = me
        self.network._members.append(self)
        for source, record in self.network.records().items():
            self._receive(source, record)
        conflict = self._table.startup_conflict
        if conflict is not None:
            self.network._members.remove(self)
            self._table.close()
            self._closed = True
            raise conflict
        self._table.started = True
        self.network.publish(self.source, encode_txt(me), me.host, me.signaling_port)

    async def update(self, me: PeerInfo) -> None:
        """Publish changed fields of ``me``; members get ``"updated"``.

        Raises:
            ConfigError: ``me.peer_id`` differs from the started one.
            DiscoveryError: not started, or closed.
        """
        if self._me is None or self._closed:
            raise DiscoveryError(f"{self.source}: update() before start() or after aclose()", "call start() first")
        if me.peer_id != self._me.peer_id:
            raise ConfigError(f"update() changes the peer id from {self._me.peer_id} to {me.peer_id}",
                              "close this discovery and start a new one")
        self._me = self._table.me = me
        self.network.publish(self.source, encode_txt(me), me.host, me.signaling_port)

    async def aclose(self) -> None:
        """Leave the network (the others get ``"removed"``) and end subscriptions; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self in self.network._members:
            self.network._members.remove(self)
        self.network.unpublish(self.source)
        self._table.close()
