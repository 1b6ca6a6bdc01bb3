"""The engine seam between generation logic and compute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from halo_p2p.model.config import ModelConfig

__all__ = ["Engine"]


class Engine(Protocol):
    """Computes logits for tokens at given positions, keeping a KV cache.

    Implementations: :class:`~halo_p2p.engine.local.LocalEngine` (one peer) and, later, the
    coordinator of a split model. Compute never runs on the event loop.
    """

    @property
    def config(self) -> ModelConfig: ...

    @property
    def max_seq_len(self) -> int:
        """KV-cache length in tokens."""
        ...

    async def forward(self, token_ids: Sequence[int], start_pos: int, *,
                      all_logits: bool = False) -> np.ndarray:
        """Logits for ``token_ids`` at positions ``[start_pos, start_pos+T)``.

        Cache entries from ``start_pos`` on are overwritten (rewinding reuses a prefix).

        Returns:
            float32 ``(T, vocab)`` if ``all_logits`` else ``(1, vocab)``.
        """
        ...

    async def aclose(self) -> None:
        """Release threads and peers."""
        ...
