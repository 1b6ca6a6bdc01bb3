"""Single-peer speed benchmark: prefill throughput, decode TPOT and peak resident memory."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from halo_p2p.engine.protocol import Engine

__all__ = ["BenchResult", "bench"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Figures of one benchmark run (times in ms, memory in bytes)."""

    prompt_tokens: int
    decode_tokens: int
    prefill_tokens_per_s: float
    tpot_median_ms: float
    tpot_p95_ms: float
    decode_tokens_per_s: float
    peak_rss_bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


async def bench(engine: Engine, prompt_ids: list[int], decode_tokens: int, *, repeat: int = 3) -> BenchResult:
    """Time a prompt forward (best of ``repeat``) and ``decode_tokens`` greedy decode steps.

    Decoding ignores stop ids so that every run decodes the same number of tokens.
    """
    best_prefill = float("inf")
    logits = np.zeros(1, dtype=np.float32)
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        logits = await engine.forward(prompt_ids, 0)
        best_prefill = min(best_prefill, time.perf_counter() - t0)
    steps: list[float] = []
    pos = len(prompt_ids)
    token = int(np.argmax(logits[-1]))
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        logits = await engine.forward([token], pos)
        steps.append(time.perf_counter() - t0)
        pos += 1
        token = int(np.argmax(logits[-1]))
    median = statistics.median(steps)
    return BenchResult(
        prompt_tokens=len(prompt_ids),
        decode_tokens=decode_tokens,
        prefill_tokens_per_s=len(prompt_ids) / best_prefill,
        tpot_median_ms=1000 * median,
        tpot_p95_ms=1000 * float(np.percentile(steps, 95)),
        decode_tokens_per_s=1 / median,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    )
