"""Lost workers that come back: watching their links, dialing them again (issue #12).

A worker lost by silence (:mod:`~halo_p2p.session.liveness`) may be frozen, not gone: a process
stopped and resumed, a link that recovered. :class:`Returns` watches each such worker's link
while no coordinator reads it: a link with heartbeats must hear the worker steadily again for
``silence_s``; on a link without heartbeats any frame will do (its stale answers are dropped
here). Once the link has closed (a frozen peer's WebRTC link dies after 3 s), the worker is
dialed again through ``rejoin`` (the node's connector), with a growing pause between failed
dials. A worker seen alive is *returned*; the :class:`~halo_p2p.session.replan.SplitEngine`
takes the returned workers into the plan at its next forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Final

from halo_p2p.errors import LinkClosed
from halo_p2p.net.link import Link, recv_timeout
from halo_p2p.session.liveness import Heartbeats

__all__ = ["Rejoin", "Returns"]

log = logging.getLogger(__name__)

Rejoin = Callable[[str], Awaitable[Link]]
"""``await rejoin(peer_id)``: a new link to a lost worker whose link closed (the node dials it
again); raises if it cannot."""

_REDIAL_MAX_PAUSE_S: Final = 30.0     # longest pause between two dials of a lost worker


class Returns:
    """Watches lost workers until they are alive again.

    Args:
        links: worker peer id -> link, shared with the engine; a worker dialed again gets its
            new link here (the old one is closed).
        rejoin: dials a worker whose link closed (None: a closed link means gone for good).
        max_returns: how many times one worker may come back.
        watch_interval_s: how often a watched link is looked at, seconds; the first pause
            between failed dials is four times this, doubling up to 30 s.
        silence_s: how long a link with heartbeats must hear its worker steadily again, seconds.
    """

    def __init__(self, links: MutableMapping[str, Link], rejoin: Rejoin | None, *, max_returns: int = 2,
                 watch_interval_s: float = 0.25, silence_s: float = 1.0) -> None:
        self._links, self._rejoin = links, rejoin
        self.max_returns = max_returns
        self._watch_s, self._silence_s = watch_interval_s, silence_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._back: set[str] = set()
        self._count: Counter[str] = Counter()

    @property
    def returned(self) -> frozenset[str]:
        """Workers seen alive again, not yet taken."""
        return frozenset(self._back)

    def watch(self, peer: str) -> None:
        """Start watching ``peer`` (unless it came back ``max_returns`` times already)."""
        if self._count[peer] < self.max_returns and peer not in self._tasks:
            self._tasks[peer] = asyncio.create_task(self._watch(peer), name=f"watch-{peer}")

    def take(self) -> list[str]:
        """The returned workers whose links are open, sorted; forgotten here. A returned worker
        whose link closed again meanwhile is watched again."""
        back = sorted(p for p in self._back if not self._links[p].closed)
        for peer in self._back.difference(back):
            self._count[peer] -= 1
            self.watch(peer)
        self._back.clear()
        return back

    async def aclose(self) -> None:
        """Stop watching; idempotent."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, peer: str) -> None:
        try:
            if await self._heard_again(peer) or await self._dial_again(peer):
                self._count[peer] += 1
                self._back.add(peer)
                log.info("worker %s is back: it rejoins at the next forward pass", peer)
        finally:
            self._tasks.pop(peer, None)

    async def _heard_again(self, peer: str) -> bool:
        """Whether ``peer``'s open link shows life again before it closes."""
        link = self._links[peer]
        lost_at = time.monotonic()
        back_since: float | None = None
        while not link.closed:
            try:
                got = await recv_timeout(link, self._watch_s)
            except LinkClosed:
                return False
            if not isinstance(link, Heartbeats):
                if got is not None:
                    return True
                continue
            now = time.monotonic()
            if link.last_heard_s > lost_at and now - link.last_heard_s < self._silence_s:
                back_since = now if back_since is None else back_since
                if now - back_since >= self._silence_s:
                    return True
            else:
                back_since = None
        return False

    async def _dial_again(self, peer: str) -> bool:
        """Dial ``peer`` through ``rejoin`` until it answers (False without ``rejoin``)."""
        if self._rejoin is None:
            return False
        pause_s = 4 * self._watch_s
        while True:
            try:
                link = await self._rejoin(peer)
            except Exception as exc:       # any failure: still gone, try again later
                log.debug("worker %s not back yet: %s", peer, exc)
                await asyncio.sleep(pause_s)
                pause_s = min(_REDIAL_MAX_PAUSE_S, 2 * pause_s)
                continue
            await self._links[peer].aclose()
            self._links[peer] = link
            return True
