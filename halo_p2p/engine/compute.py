"""Run compute off the event loop: one worker thread per peer, with an emulated slowdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from halo_p2p.errors import ConfigError

__all__ = ["HANDOFF_S", "ComputeThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")

HANDOFF_S = 0.002
"""Calls measured shorter than this (seconds, smoothed) may run on the calling thread: a hand-off
to the compute thread costs ~70 µs of CPU and two thread switches on the 2-core reference box
(docs/benchmarks.md §10), more than a decode step's share of a layer, and 2 ms is far below what
delays the event loop noticeably (heartbeats every 0.5 s, deadlines of several ms)."""


class ComputeThread:
    """A single-worker executor: torch work is serialized and never blocks the event loop for long.

    Args:
        name: thread name prefix (for logs and profilers).
        slowdown: emulated compute slowdown factor (>= 1): after each call the caller also waits
            ``(slowdown - 1) * elapsed`` seconds, asynchronously, as a slower device would.

    Raises:
        ConfigError: ``slowdown`` below 1.
    """

    def __init__(self, name: str = "halo-torch", *, slowdown: float = 1.0) -> None:
        if slowdown < 1:
            raise ConfigError(f"compute slowdown {slowdown} is below 1",
                              "emulate a device as fast as this machine (1) or slower (e.g. 4)")
        self.slowdown = slowdown
        self.busy_s = 0.0                       # total seconds spent computing (excluding slowdown)
        self.inline_calls = 0                   # calls run on the caller's thread (short ones, see run)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._cost_s: dict[str, float] = {}     # smoothed duration per kind of call (1/8 gain)

    async def run(self, fn: Callable[..., T], /, *args: Any, inline_below_s: float | None = None,
                  kind: str | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the worker thread; returns its result.

        Args:
            inline_below_s: run ``fn`` on the calling (event-loop) thread instead once calls of
                this kind have been measured, smoothed, below this many seconds; e.g.
                :data:`HANDOFF_S` for a decode step's share of a layer. None (default): always
                hand off.
            kind: names the kind of call whose duration is tracked (default: the function's
                qualified name).
        """
        kind = kind or str(getattr(fn, "__qualname__", "call"))
        t0 = time.perf_counter()
        cost = self._cost_s.get(kind)
        if inline_below_s is not None and cost is not None and cost < inline_below_s:
            result = fn(*args, **kwargs)
            self.inline_calls += 1
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        elapsed = time.perf_counter() - t0
        self._cost_s[kind] = elapsed if cost is None else cost + (elapsed - cost) / 8
        self.busy_s += elapsed
        if self.slowdown > 1:
            await asyncio.sleep((self.slowdown - 1) * elapsed)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)
