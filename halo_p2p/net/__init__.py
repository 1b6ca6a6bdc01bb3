"""Networking: the link seam between peers and its implementations."""

from halo_p2p.net.link import Channel, ChannelStats, Link, LinkConditions, LinkStats, recv_timeout
from halo_p2p.net.lossy import LossyLink
from halo_p2p.net.memory import MemoryLink, memory_link_pair

__all__ = [
    "Channel",
    "ChannelStats",
    "Link",
    "LinkConditions",
    "LinkStats",
    "LossyLink",
    "MemoryLink",
    "memory_link_pair",
    "recv_timeout",
]
