"""A quick measurement of this device's compute rate, advertised to the swarm's schedulers."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["measure_gflops"]


def measure_gflops(size: int = 512, repeats: int = 8) -> float:
    """Best-of-``repeats`` float32 matrix-multiply rate, in GFLOP/s (about 50 ms on a laptop).

    A decode step is matrix-vector work, bounded by memory bandwidth more than by this rate;
    the figure ranks devices against each other rather than predicting a TPOT.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9
