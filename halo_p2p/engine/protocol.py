"""The engine seam between generation logic and compute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from halo_p2p.model.config import ModelConfig

__all__ = ["Engine", "GroupCompute", "GroupWeights", "TrunkCompute"]


class Engine(Protocol):
    """Computes logits for tokens at given positions, keeping a KV cache.

    Implementations: :class:`~halo_p2p.engine.local.LocalEngine` (one peer) and
    :class:`~halo_p2p.session.replan.SplitEngine` (a split model over its peers; its
    :class:`~halo_p2p.session.coordinator.Coordinator` is one too). Compute never runs on the event
    loop.
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


class GroupCompute(Protocol):
    """A peer's neuron groups (see :class:`halo_p2p.model.shard.GroupShard`); called on its
    compute thread, never on the event loop."""

    def groups_at(self, layer: int, part: int) -> list[int]:
        """Group indices held at sync point (layer, part), in partial order."""
        ...

    def partials(self, layer: int, part: int, x: np.ndarray, start_pos: int) -> np.ndarray:
        """float32 ``(n_held, T, dim)`` partials for the ``(T, dim)`` input ``x``."""
        ...

    def answer(self, layer: int, part: int, x: np.ndarray, start_pos: int, rows: list[list[int]], *,
               norms: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 ``(len(rows), T, dim)`` sums of the listed groups' partials per row, and their
        norms in row order if ``norms`` (a single row without norms costs one dense product)."""
        ...

    def weight_bytes(self) -> int: ...

    def reset(self) -> None:
        """Forget every position of the KV caches (a new sequence): nothing written before is
        attended again."""
        ...


class GroupWeights(Protocol):
    """Weight slices of one neuron group by name (see :class:`halo_p2p.model.shard.GroupWeights`)."""

    @property
    def config(self) -> ModelConfig: ...

    def group(self, gid: Any) -> dict[str, np.ndarray]: ...


class TrunkCompute(Protocol):
    """Embeddings, norms and classifier (see :class:`halo_p2p.model.shard.Trunk`)."""

    @property
    def config(self) -> ModelConfig: ...

    def embed(self, token_ids: np.ndarray) -> np.ndarray: ...

    def normed(self, layer: int, part: int, x: np.ndarray) -> np.ndarray: ...

    def normed_row(self, layer: int, part: int, x: np.ndarray) -> np.ndarray: ...

    def logits(self, x: np.ndarray, *, all_logits: bool) -> np.ndarray: ...

    def weight_bytes(self) -> int: ...
