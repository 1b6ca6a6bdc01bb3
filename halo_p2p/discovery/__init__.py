"""Discovery: finding the other peers on the LAN (mDNS), from ``--peer`` flags, or in memory.

Modules: :mod:`~halo_p2p.discovery.protocol` (the :class:`Discovery` seam),
:mod:`~halo_p2p.discovery.info` (:class:`PeerInfo`, validated), :mod:`~halo_p2p.discovery.txt`
(its DNS-SD TXT encoding), :mod:`~halo_p2p.discovery.table` (the peer view and its admission
rules, shared by every implementation), and the implementations :mod:`~halo_p2p.discovery.memory`,
:mod:`~halo_p2p.discovery.static` and :mod:`~halo_p2p.discovery.mdns`. The mDNS implementation
is not imported here, so that importing this package does not import zeroconf.
"""

from halo_p2p.discovery.info import PROTOCOL_VERSION, PeerInfo, model_entry
from halo_p2p.discovery.memory import MemoryDiscovery, MemoryNetwork
from halo_p2p.discovery.protocol import Discovery
from halo_p2p.discovery.static import CombinedDiscovery, StaticDiscovery, parse_peer_address
from halo_p2p.discovery.table import DiscoveryStats, PeerEvent, PeerSubscription, PeerTable
from halo_p2p.discovery.txt import SERVICE_TYPE, decode_txt, encode_txt

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "CombinedDiscovery",
    "Discovery",
    "DiscoveryStats",
    "MemoryDiscovery",
    "MemoryNetwork",
    "PeerEvent",
    "PeerInfo",
    "PeerSubscription",
    "PeerTable",
    "StaticDiscovery",
    "decode_txt",
    "encode_txt",
    "model_entry",
    "parse_peer_address",
]
