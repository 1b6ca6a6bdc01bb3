"""ICE host candidates and UDP sockets of a WebRTC peer connection (aioice, process-wide).

Imported only by :mod:`halo_p2p.net.webrtc` (which re-exports :func:`pin_host_addresses`); one of
the three modules allowed to import :mod:`aiortc` / :mod:`aioice`. Rules measured on aiortc
1.16 / aioice 0.13 (``network-facts.md`` §2, §5):

* ``RTCConfiguration(iceServers=[])`` always: the default contacts Google's STUN server.
* aioice skips 127.0.0.1 when gathering host candidates; :func:`pin_host_addresses` replaces
  ``aioice.ice.get_host_addresses`` **process-wide** with a fixed list, and
  :func:`new_peer_connection` refuses to build one before it was called, so no candidate leaks
  an unintended interface.
* Each ICE UDP socket's receive buffer is raised to 8 MiB (``SO_RCVBUFFORCE`` as root, else
  ``SO_RCVBUF``, capped by ``net.core.rmem_max``); the default 212 KB drops bursts on loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from typing import Final

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection

from halo_p2p.errors import ConfigError

__all__ = ["new_peer_connection", "pin_host_addresses", "raise_receive_buffers"]

log = logging.getLogger(__name__)

_RCVBUF_BYTES: Final = 8 << 20
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)   # Linux; not exported by Python

_pinned: tuple[str, ...] | None = None


def pin_host_addresses(addresses: Iterable[str]) -> None:
    """Make ICE gather host candidates on exactly ``addresses`` (process-wide).

    Replaces ``aioice.ice.get_host_addresses`` for the whole process (every peer connection
    created afterwards). Call it before the first handshake: with ``["127.0.0.1"]`` on
    loopback, or the address of the LAN interface (or network namespace) to use.

    Args:
        addresses: IPv4/IPv6 literals, at least one.

    Raises:
        ConfigError: empty, or an item is not an IP address.
    """
    global _pinned
    pinned = tuple(addresses)
    if not pinned:
        raise ConfigError("no host address to pin", "pass at least one address, e.g. ['127.0.0.1']")
    for address in pinned:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"host address {address!r} is not an IP address",
                              "pass IPv4/IPv6 literals such as '192.168.1.20'") from None
    _pinned = pinned
    aioice.ice.get_host_addresses = _pinned_host_addresses
    log.debug("ICE host candidates pinned to %s", ", ".join(pinned))


def _pinned_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return [a for a in _pinned or () if (use_ipv4, use_ipv6)[ipaddress.ip_address(a).version == 6]]


def new_peer_connection() -> RTCPeerConnection:
    """A peer connection without STUN servers, its host candidates the pinned addresses.

    Raises:
        ConfigError: :func:`pin_host_addresses` was not called.
    """
    if _pinned is None:
        raise ConfigError("ICE host addresses are not pinned (aioice would use every interface)",
                          "call halo_p2p.net.webrtc.pin_host_addresses([...]) with the address to use")
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # never the default Google STUN server


def raise_receive_buffers(pc: RTCPeerConnection) -> None:
    """Best effort: raise the receive buffer of every ICE UDP socket of ``pc`` to 8 MiB."""
    try:  # private path, checked on aioice 0.13: RTCDtlsTransport -> RTCIceTransport -> Connection
        # mypy: aiortc's private transport chain is typed Optional; None raises AttributeError, caught
        protocols = list(pc.sctp.transport.transport._connection._protocols)  # type: ignore[union-attr]
    except AttributeError as exc:
        log.debug("cannot reach the ICE sockets to raise their receive buffers (%s)", exc)
        return
    option = _SO_RCVBUFFORCE if os.geteuid() == 0 else socket.SO_RCVBUF
    for protocol in protocols:
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _RCVBUF_BYTES)
        except OSError as exc:
            log.debug("cannot raise UDP receive buffer: %s", exc)
