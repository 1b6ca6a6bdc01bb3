"""Admission of unauthenticated signaling connections, and aggregated logging of refusals.

Pure logic (no sockets, no event loop) used by :class:`~halo_p2p.net.signaling.SignalingServer`:

* :class:`Admission` keeps the *pending* connections, those that have not yet delivered a frame
  and so may belong to a stranger. A new connection is always admitted. To make room, once
  ``max_per_source`` are pending from its source address (:func:`source_key`: the IPv4 address,
  or the /64 prefix of an IPv6 one), the oldest of them is dropped, else, once ``max_pending``
  are pending in all, the oldest in all; but only a connection at least ``min_age_s`` old. A key
  holder sends its offer as soon as it connects, so it leaves the set within a round trip and is
  never that old; idle sockets are. :meth:`Admission.sweep` does the same without a new
  connection, so no address keeps more than ``max_per_source`` sockets pending for longer than
  ``min_age_s``. Above ``max_pending_hard`` the oldest connection of the source with the most
  pending ones goes, whatever its age, which bounds the sockets held.
* :class:`RefusalLog` logs refusals rate-limited and aggregated: per cause, the first refusal of
  an interval in full (who, what, why), the others counted and summed up in one line when the
  interval ends. A flood of N refusals of one cause costs at most two lines per interval.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from halo_p2p.errors import ConfigError

__all__ = ["ADDRESS_LIMIT", "PENDING_LIMIT", "Admission", "RefusalLog", "source_key"]

T = TypeVar("T", bound=Hashable)

ADDRESS_LIMIT: Final = "address_limit"
"""Eviction cause: the connection's source address had ``max_per_source`` newer pending connections."""

PENDING_LIMIT: Final = "pending_limit"
"""Eviction cause: the server had ``max_pending`` newer pending connections."""

_MAX_SOURCES_NAMED: Final = 64


def source_key(peername: object) -> str:
    """The address a per-source limit applies to, from a socket's ``peername``.

    IPv4: the address (``"10.0.0.7"``). IPv6: its /64 prefix (``"fd00:1::/64"``), since one
    device may pick any address of its /64; an IPv4-mapped IPv6 address counts as its IPv4
    address. Anything else (a Unix socket, an unknown shape): ``str(peername)``.
    """
    host = peername[0] if isinstance(peername, tuple) and peername else peername
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Admission(Generic[T]):
    """The pending (not yet authenticated) connections, oldest first, with per-source and total caps.

    A connection younger than ``min_age_s`` is not dropped for a newer one: a key holder's offer
    arrives within a round trip of the accept, so it is never pushed out by a burst, however fast.
    Older connections are, oldest first, once a cap is reached; above ``max_pending_hard`` the
    oldest connection of the source with the most pending ones is dropped whatever its age
    (a bound on sockets; a key holder's own address normally has one).

    Args:
        max_pending: pending connections, all sources together, above which old ones are dropped.
        max_per_source: the same per source (1 to ``max_pending``).
        min_age_s: age in seconds below which a connection is not dropped (below the hard cap).
        max_pending_hard: pending connections above which any is dropped (default 4 x ``max_pending``).
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        ConfigError: a cap is out of range.
    """

    def __init__(self, *, max_pending: int, max_per_source: int, min_age_s: float = 0.25,
                 max_pending_hard: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        hard = 4 * max_pending if max_pending_hard is None else max_pending_hard
        if not (1 <= max_per_source <= max_pending <= hard and min_age_s >= 0):
            raise ConfigError(f"signaling admission caps max_pending={max_pending}, max_per_source="
                              f"{max_per_source}, max_pending_hard={hard}, min_age_s={min_age_s} are out of range",
                              "use 1 <= max_per_source <= max_pending <= max_pending_hard and min_age_s >= 0")
        self.max_pending, self.max_per_source, self.max_pending_hard = max_pending, max_per_source, hard
        self.min_age_s = min_age_s
        self._clock = clock
        self._pending: dict[T, tuple[str, float]] = {}    # insertion order = age
        self._by_source: dict[str, dict[T, float]] = {}   # each in insertion order

    def __len__(self) -> int:
        """Number of pending connections."""
        return len(self._pending)

    def __contains__(self, conn: object) -> bool:
        return conn in self._pending

    def pending_from(self, source: str) -> int:
        """Number of pending connections from ``source``."""
        return len(self._by_source.get(source, ()))

    def admit(self, conn: T, source: str) -> list[tuple[T, str]]:
        """Add ``conn`` (from ``source``) as the newest pending connection.

        Returns:
            The connections dropped to make room, each with its cause (:data:`ADDRESS_LIMIT` or
            :data:`PENDING_LIMIT`); no longer pending.
        """
        now = self._clock()
        evicted: list[tuple[T, str]] = []
        same = self._by_source.get(source)
        if same is not None and len(same) >= self.max_per_source:
            oldest, since = next(iter(same.items()))
            if now - since >= self.min_age_s:
                evicted.append((oldest, ADDRESS_LIMIT))
        if not evicted and len(self._pending) >= self.max_pending:
            oldest, (_, since) = next(iter(self._pending.items()))
            if now - since >= self.min_age_s:
                evicted.append((oldest, PENDING_LIMIT))
        for victim, _ in evicted:
            self.release(victim)
        if len(self._pending) >= self.max_pending_hard:
            crowd = max(self._by_source.values(), key=len)
            victim = next(iter(crowd))
            self.release(victim)
            evicted.append((victim, PENDING_LIMIT))
        self._pending[conn] = (source, now)
        self._by_source.setdefault(source, {})[conn] = now
        return evicted

    def sweep(self) -> list[tuple[T, str]]:
        """Drop what :meth:`admit` would have, had a connection arrived now: over each cap, the
        oldest connections at least ``min_age_s`` old. Returns them as :meth:`admit` does."""
        now = self._clock()
        evicted: list[tuple[T, str]] = []
        for same in list(self._by_source.values()):
            while len(same) > self.max_per_source and now - next(iter(same.values())) >= self.min_age_s:
                evicted.append((next(iter(same)), ADDRESS_LIMIT))
                self.release(evicted[-1][0])
        while len(self._pending) > self.max_pending and now - next(iter(self._pending.values()))[1] >= self.min_age_s:
            evicted.append((next(iter(self._pending)), PENDING_LIMIT))
            self.release(evicted[-1][0])
        return evicted

    def sweep_due_in_s(self) -> float | None:
        """Seconds until :meth:`sweep` has something to drop (<= 0: now), or None while no cap is exceeded."""
        starts = [next(iter(same.values())) for same in self._by_source.values() if len(same) > self.max_per_source]
        if len(self._pending) > self.max_pending:
            starts.append(next(iter(self._pending.values()))[1])
        return min(starts) + self.min_age_s - self._clock() if starts else None

    def release(self, conn: T) -> None:
        """``conn`` is no longer pending (it delivered a frame, was refused or closed); idempotent."""
        entry = self._pending.pop(conn, None)
        if entry is None:
            return
        same = self._by_source[entry[0]]
        del same[conn]
        if not same:
            del self._by_source[entry[0]]


@dataclass
class _Window:
    start_s: float
    level: int
    suppressed: int = 0
    last: str = ""
    sources: set[str] = field(default_factory=set)


class RefusalLog:
    """Rate-limited, aggregated log lines for refusals, per cause.

    The first refusal of a cause is logged in full at once and opens an interval of
    ``interval_s`` seconds for that cause; further refusals of the cause within it are only
    counted (with their distinct sources, up to 64). When the interval has passed (checked on
    the next refusal of the cause and by :meth:`flush`), one line sums them up: ``refused 1234
    more signaling connections (auth) from 3 addresses in the last 10 s; last: ...``.

    Args:
        logger: where the lines go.
        interval_s: length of an interval in seconds (> 0).
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        ConfigError: ``interval_s`` is not positive.
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ConfigError(f"refusal log interval {interval_s!r} s is not positive", "use interval_s > 0")
        self._log, self._interval_s, self._clock = logger, float(interval_s), clock
        self._windows: dict[str, _Window] = {}

    def due_in_s(self) -> float | None:
        """Seconds until the next summary line is due (may be <= 0), or None if none is pending."""
        starts = [w.start_s for w in self._windows.values() if w.suppressed]
        return min(starts) + self._interval_s - self._clock() if starts else None

    def refused(self, cause: str, source: str, detail: str, *, level: int = logging.WARNING) -> None:
        """Record one refusal: ``cause`` (e.g. ``"auth"``), ``source`` address, ``detail`` (the full line)."""
        now = self._clock()
        window = self._windows.get(cause)
        if window is not None and now - window.start_s >= self._interval_s:
            self._summarize(cause, window, now)
            window = None
        if window is None:
            self._windows[cause] = _Window(start_s=now, level=level)
            self._log.log(level, "%s", detail)
            return
        window.suppressed += 1
        window.last = detail
        if len(window.sources) < _MAX_SOURCES_NAMED:
            window.sources.add(source)

    def flush(self, *, force: bool = False) -> None:
        """Sum up every interval that has passed (all of them with ``force``) and close it."""
        now = self._clock()
        for cause, window in list(self._windows.items()):
            if force or now - window.start_s >= self._interval_s:
                self._summarize(cause, window, now)

    def _summarize(self, cause: str, window: _Window, now: float) -> None:
        del self._windows[cause]
        if not window.suppressed:
            return
        n_sources = len(window.sources)
        sources = f"{n_sources}+" if n_sources >= _MAX_SOURCES_NAMED else str(n_sources)
        self._log.log(window.level, "refused %d more signaling connection%s (%s) from %s address%s in the last "
                      "%.1f s; last: %s", window.suppressed, "s" if window.suppressed != 1 else "", cause, sources,
                      "es" if n_sources != 1 else "", max(now - window.start_s, 0.0), window.last)
