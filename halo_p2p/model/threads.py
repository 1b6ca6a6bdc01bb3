"""How many threads torch's CPU kernels (and the BLAS under them) use in this process.

A swarm member computes one share of each layer per sync point: for SmolLM2 a worker's decode
step is a few matrix-vector products of ~0.5 MFLOP, far below what pays for waking intra-op
threads. torch's default (one thread per core) made every such call wake and then spin the
other threads, in every process sharing the device: with a coordinator and three workers on the
2-core reference machine, 80 % of the CPU per decode token was spinning (issue #10:
3.10 -> 0.55 CPU-s per token with ``OMP_NUM_THREADS=1``). So a swarm member uses
:data:`SWARM_THREADS`; a peer running the whole model alone (``--local``, ``bench``) keeps
torch's default, where large matrix products do pay for more threads (docs/benchmarks.md §10).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["LOCAL_THREADS", "SWARM_THREADS", "compute_threads", "set_compute_threads"]

log = logging.getLogger(__name__)

SWARM_THREADS = 1
"""Intra-op threads of a process that computes a share of the model (a swarm peer, or an
emulated swarm whose peers each have a compute thread)."""

LOCAL_THREADS = torch.get_num_threads()
"""Intra-op threads for the whole model on one peer: torch's default (one per physical core,
or ``OMP_NUM_THREADS``), read when this module is first imported."""


def set_compute_threads(n: int) -> int:
    """Use ``n`` intra-op threads for torch's CPU kernels from now on (process-wide); returns it.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"need at least one compute thread, got {n}")
    if torch.get_num_threads() != n:
        log.debug("torch intra-op threads: %d -> %d", torch.get_num_threads(), n)
        torch.set_num_threads(n)
    return n


def compute_threads() -> int:
    """Intra-op threads torch's CPU kernels use now."""
    return torch.get_num_threads()
