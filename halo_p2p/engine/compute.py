"""Run compute off the event loop: one worker thread per peer, with an emulated slowdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["ComputeThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class ComputeThread:
    """A single-worker executor: torch work is serialized and never blocks the event loop.

    Args:
        name: thread name prefix (for logs and profilers).
        slowdown: emulated compute slowdown factor (>= 1): after each call the caller also waits
            ``(slowdown - 1) * elapsed`` seconds, asynchronously, as a slower device would.
    """

    def __init__(self, name: str = "halo-torch", *, slowdown: float = 1.0) -> None:
        if slowdown < 1:
            raise ValueError(f"slowdown {slowdown} must be >= 1")
        self.slowdown = slowdown
        self.busy_s = 0.0                       # total seconds spent computing (excluding slowdown)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the worker thread; returns its result."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        result = await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        elapsed = time.perf_counter() - t0
        self.busy_s += elapsed
        if self.slowdown > 1:
            await asyncio.sleep((self.slowdown - 1) * elapsed)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)
