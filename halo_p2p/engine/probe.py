"""A quick measurement of this device's decode compute rate, advertised to the swarm's schedulers."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["measure_gflops"]


def measure_gflops(size: int = 4096, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 matrix-VECTOR rate over a ``size`` x ``size`` matrix, GFLOP/s.

    Decoding one token is a matrix-vector product per projection, bounded by memory bandwidth:
    the default 64 MiB matrix does not fit in cache, so the rate reflects what a decode step
    gets (e.g. 2 FLOP per weight at ~10 GB/s of fp32 weights is ~5 GFLOP/s). About 0.1 s.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    x = rng.standard_normal(size, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t0)
    return 2 * size * size / best / 1e9
