"""Which neuron groups the coordinator must wait for (the placeholder rule of issue #3).

The semantic-aware predictor (issue #5) replaces :class:`StaticRule` behind the same
:class:`CriticalityPolicy` interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN

__all__ = ["AllCritical", "CriticalityPolicy", "StaticRule"]


class CriticalityPolicy(Protocol):
    """Scores groups before they are computed and names those that must not be skipped."""

    def critical(self, layer: int, part: int, x: np.ndarray) -> frozenset[int]:
        """Indices of the critical groups at sync point (layer, part) for input ``x`` ``(T, dim)``."""
        ...


class AllCritical:
    """Every group is critical (strict synchronization)."""

    def __init__(self, n_groups: Mapping[int, int]) -> None:
        self._all = {part: frozenset(range(n)) for part, n in n_groups.items()}

    def critical(self, layer: int, part: int, x: np.ndarray) -> frozenset[int]:
        return self._all[part]


class StaticRule:
    """All attention groups are critical; MLP groups are ranked by a static weight score.

    The score of MLP group ``j`` of layer ``l`` is ``|W1_j|_F * |W3_j|_F * |W2[:, j]|_F``, a cheap
    bound on how much the group can move the residual stream (computed once from the weights,
    see :func:`halo_p2p.model.shard.mlp_group_scores`). The top ``fraction`` of each layer's MLP
    groups are critical.

    Args:
        mlp_scores: ``(n_layers, n_mlp)`` float scores.
        n_attn: attention groups per layer.
        fraction: share of MLP groups that are critical, in [0, 1].

    Raises:
        ConfigError: ``fraction`` outside [0, 1].
    """

    def __init__(self, mlp_scores: np.ndarray, n_attn: int, fraction: float = 0.5) -> None:
        if not 0 <= fraction <= 1:
            raise ConfigError(f"critical fraction {fraction} is outside [0, 1]", "use a fraction between 0 and 1")
        k = round(fraction * mlp_scores.shape[1])
        order = np.argsort(-mlp_scores, axis=1, kind="stable")
        self._mlp = [frozenset(int(j) for j in row[:k]) for row in order]
        self._attn = frozenset(range(n_attn))

    def critical(self, layer: int, part: int, x: np.ndarray) -> frozenset[int]:
        return self._attn if part == ATTN else self._mlp[layer]
