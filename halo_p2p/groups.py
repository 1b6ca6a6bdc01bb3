"""Neuron groups: the unit of tensor parallelism, placement and relaxed synchronization.

Per layer ``l`` (see :mod:`halo_p2p.model.llama` for the block equations), with
``r = n_heads / n_kv_heads`` query heads per KV head and ``d = head_dim``:

* **attention group** ``g`` (``0 <= g < n_kv_heads``): KV head ``g`` and its ``r`` query heads,
  i.e. rows ``[g*r*d, (g+1)*r*d)`` of Wq, rows ``[g*d, (g+1)*d)`` of Wk and Wv, and the same
  columns of Wo as of Wq. Its partial is ``A_g = Wo[:, g] @ Attn_g(xn)``.
* **MLP group** ``j`` (``0 <= j < hidden_dim / G``): intermediate neurons ``[j*G, (j+1)*G)``,
  i.e. those rows of W1 and W3 and columns of W2. Its partial is
  ``M_j = W2[:, j] @ (silu(W1[j] hn) * W3[j] hn)``.

A layer is then exactly ``h = x + sum_g A_g`` and ``out = h + sum_j M_j`` (attention heads and
SwiGLU neurons are independent given the layer input), so the sum of the groups' partials
plus the residual is the layer output. Each layer has two synchronization points: ``part``
:data:`ATTN` (input ``xn = RMSNorm(x)``) and :data:`MLP` (input ``hn = RMSNorm(h)``).

Pure module: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from halo_p2p.errors import ConfigError
from halo_p2p.model.config import ModelConfig

__all__ = ["ATTN", "ATTN_TENSORS", "MLP", "MLP_TENSORS", "PARTS", "SLICE_AXIS", "GroupId", "GroupLayout",
           "default_mlp_group_size", "tensor_names"]

ATTN = 0
"""Synchronization point of the attention groups (input: RMSNorm of the residual)."""
MLP = 1
"""Synchronization point of the MLP groups (input: RMSNorm after attention)."""
PARTS = (ATTN, MLP)

ATTN_TENSORS = ("wq", "wk", "wv", "wo")
"""Weight matrices of an attention group: rows of Wq, Wk, Wv and columns of Wo."""
MLP_TENSORS = ("w1", "w3", "w2")
"""Weight matrices of an MLP group: rows of W1, W3 and columns of W2."""
SLICE_AXIS = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
"""Axis along which a group's slice of each matrix is cut: 0 rows, 1 columns (Wo, W2)."""


def tensor_names(part: int) -> tuple[str, ...]:
    """The weight matrices of a group of ``part`` (:data:`ATTN_TENSORS` or :data:`MLP_TENSORS`)."""
    return ATTN_TENSORS if part == ATTN else MLP_TENSORS

DEFAULT_MLP_GROUPS = 24   # SmolLM2-135M: 1536 / 64 = 24 groups of 64 neurons


@dataclass(frozen=True, slots=True, order=True)
class GroupId:
    """One neuron group: ``layer``, ``part`` (:data:`ATTN` or :data:`MLP`) and its ``index``."""

    layer: int
    part: int
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.{'attn' if self.part == ATTN else 'mlp'}{self.index}"


def default_mlp_group_size(hidden_dim: int, target_groups: int = DEFAULT_MLP_GROUPS) -> int:
    """The smallest divisor ``G`` of ``hidden_dim`` giving at most ``target_groups`` groups.

    SmolLM2 (1536) -> 64 (24 groups); stories260K (172) -> 43 (4 groups).
    """
    for size in range(max(1, -(-hidden_dim // target_groups)), hidden_dim + 1):
        if hidden_dim % size == 0:
            return size
    return hidden_dim


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """How a model's layers cut into neuron groups.

    Attributes:
        n_layers: transformer blocks.
        n_attn: attention groups per layer (= KV heads).
        n_mlp: MLP groups per layer (= ``hidden_dim / mlp_group_size``).
        mlp_group_size: intermediate neurons per MLP group (``G``).
        q_per_kv, head_dim, dim, hidden_dim: copied from the model config.
    """

    n_layers: int
    n_attn: int
    n_mlp: int
    mlp_group_size: int
    q_per_kv: int
    head_dim: int
    dim: int
    hidden_dim: int

    @classmethod
    def from_config(cls, config: ModelConfig, mlp_group_size: int | None = None) -> GroupLayout:
        """Layout of ``config``; ``mlp_group_size`` must divide ``hidden_dim``.

        Raises:
            ConfigError: ``mlp_group_size`` does not divide the MLP width.
        """
        size = mlp_group_size or default_mlp_group_size(config.hidden_dim)
        if size <= 0 or config.hidden_dim % size:
            raise ConfigError(f"MLP group size {size} does not divide hidden_dim {config.hidden_dim}",
                              f"pick a divisor, e.g. {default_mlp_group_size(config.hidden_dim)}")
        return cls(n_layers=config.n_layers, n_attn=config.n_kv_heads, n_mlp=config.hidden_dim // size,
                   mlp_group_size=size, q_per_kv=config.q_per_kv, head_dim=config.head_dim,
                   dim=config.dim, hidden_dim=config.hidden_dim)

    def n_groups(self, part: int) -> int:
        """Groups per layer at sync point ``part``."""
        return self.n_attn if part == ATTN else self.n_mlp

    def all_groups(self) -> list[GroupId]:
        """Every group of the model, in (layer, part, index) order."""
        return [GroupId(layer, part, i) for layer in range(self.n_layers) for part in PARTS
                for i in range(self.n_groups(part))]

    def contains(self, group: GroupId) -> bool:
        return (0 <= group.layer < self.n_layers and group.part in PARTS
                and 0 <= group.index < self.n_groups(group.part))

    def q_rows(self, index: int) -> tuple[int, int]:
        """Rows of Wq (and columns of Wo) of attention group ``index``, half-open."""
        width = self.q_per_kv * self.head_dim
        return index * width, (index + 1) * width

    def kv_rows(self, index: int) -> tuple[int, int]:
        """Rows of Wk and Wv of attention group ``index``, half-open."""
        return index * self.head_dim, (index + 1) * self.head_dim

    def mlp_rows(self, index: int) -> tuple[int, int]:
        """Rows of W1/W3 (and columns of W2) of MLP group ``index``, half-open."""
        return index * self.mlp_group_size, (index + 1) * self.mlp_group_size

    def tensor_spans(self, part: int, index: int) -> dict[str, tuple[int, int]]:
        """Name -> the half-open span of group ``index``'s slice of each weight matrix of ``part``,
        along the matrix's :data:`SLICE_AXIS`, in :func:`tensor_names` order."""
        if part == ATTN:
            q, kv = self.q_rows(index), self.kv_rows(index)
            return {"wq": q, "wk": kv, "wv": kv, "wo": q}
        rows = self.mlp_rows(index)
        return {"w1": rows, "w3": rows, "w2": rows}

    def tensor_shapes(self, part: int) -> dict[str, tuple[int, int]]:
        """Name -> ``(rows, cols)`` of each weight matrix of one group of ``part``, in
        :func:`tensor_names` order (``wo`` and ``w2`` are column slices: ``(dim, width)``)."""
        if part == ATTN:
            q, d = self.q_per_kv * self.head_dim, self.head_dim
            return {"wq": (q, self.dim), "wk": (d, self.dim), "wv": (d, self.dim), "wo": (self.dim, q)}
        g = self.mlp_group_size
        return {"w1": (g, self.dim), "w3": (g, self.dim), "w2": (self.dim, g)}

    def group_params(self, part: int) -> int:
        """Weight parameters of one group of ``part`` (its slices of the projections)."""
        if part == ATTN:
            q = self.q_per_kv * self.head_dim
            return self.dim * (2 * q + 2 * self.head_dim)      # Wq rows + Wo cols + Wk, Wv rows
        return 3 * self.dim * self.mlp_group_size               # W1, W3 rows + W2 cols
