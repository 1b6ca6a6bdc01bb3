"""Sending a session's activation frames over a link, paced (the frames themselves: :mod:`halo_p2p.wire.framing`)."""

from __future__ import annotations

import logging

from halo_p2p.errors import TransportError
from halo_p2p.net.link import Channel, Link

__all__ = ["PACE_FRAMES", "send_paced"]

log = logging.getLogger(__name__)

PACE_FRAMES = 16
"""Unreliable frames sent between waits for the link's backlog to drain (``Link.drain``)."""


async def send_paced(link: Link, channel: Channel, frames: list[bytes]) -> None:
    """Send ``frames``; on the unreliable channel wait every :data:`PACE_FRAMES` frames until the
    link's backlog drains, so that its backlog cap never drops a burst.

    Raises:
        LinkClosed: the link closed (a backlog that does not drain is logged, not raised).
    """
    for i, frame in enumerate(frames):
        if channel == Channel.UNRELIABLE and i and i % PACE_FRAMES == 0:
            try:
                await link.drain()
            except TransportError:
                log.debug("backlog to %s did not drain", link.remote_id)
        await link.send(channel, frame)
