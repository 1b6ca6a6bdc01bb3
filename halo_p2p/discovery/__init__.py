"""Discovery: finding the other peers on the LAN (mDNS), from ``--peer`` flags, or in memory.

The mDNS implementation lives in :mod:`halo_p2p.discovery.mdns` and is not imported here, so
that importing this package does not import zeroconf.
"""

from halo_p2p.discovery.base import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    DiscoveryStats,
    PeerEvent,
    PeerInfo,
    PeerSubscription,
    PeerTable,
    decode_txt,
    encode_txt,
    model_entry,
)
from halo_p2p.discovery.memory import MemoryDiscovery, MemoryNetwork
from halo_p2p.discovery.static import CombinedDiscovery, StaticDiscovery, parse_peer_address

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
