"""The seam between model files and the compute: a source of float32 tensors by canonical name.

Canonical names (matrices are ``(out_features, in_features)``, row-major, like ``nn.Linear``):

====================================  =============================  =====================
name                                  shape                          GGUF tensor
====================================  =============================  =====================
``tok_embeddings``                    (vocab_size, dim)              ``token_embd.weight``
``norm``                              (dim,)                         ``output_norm.weight``
``output``                            (vocab_size, dim), optional    ``output.weight``
``layers.{i}.attention_norm``         (dim,)                         ``blk.i.attn_norm.weight``
``layers.{i}.wq``                     (n_heads*head_dim, dim)        ``blk.i.attn_q.weight``
``layers.{i}.wk`` / ``wv``            (n_kv_heads*head_dim, dim)     ``blk.i.attn_k/v.weight``
``layers.{i}.wo``                     (dim, n_heads*head_dim)        ``blk.i.attn_output.weight``
``layers.{i}.ffn_norm``               (dim,)                         ``blk.i.ffn_norm.weight``
``layers.{i}.w1`` / ``w3``            (hidden_dim, dim)              ``blk.i.ffn_gate/up.weight``
``layers.{i}.w2``                     (dim, hidden_dim)              ``blk.i.ffn_down.weight``
====================================  =============================  =====================

Q and K rows use the adjacent-pair RoPE layout of llama.cpp and llama2.c (pairs
``(x[2i], x[2i+1])`` of each head rotate together).

A source can load a row range of a matrix without materialising the rest, which is how a
worker later loads only its neuron groups.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from halo_p2p.model.config import ModelConfig

__all__ = ["TensorSource", "layer_tensor_names"]

LAYER_TENSORS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


def layer_tensor_names(layer: int) -> list[str]:
    """Canonical names of the tensors of one transformer block."""
    return [f"layers.{layer}.{t}" for t in LAYER_TENSORS]


class TensorSource(Protocol):
    """Float32 tensors of one model file, by canonical name."""

    @property
    def config(self) -> ModelConfig:
        """Hyper-parameters read from the file."""
        ...

    def has(self, name: str) -> bool:
        """Whether the file holds tensor ``name`` (``output`` is absent when tied)."""
        ...

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Load tensor ``name`` as a new float32 array.

        Args:
            name: canonical tensor name (see the module docstring).
            rows: half-open ``[start, stop)`` range of rows (first axis) to load; ``None``
                loads all rows.

        Returns:
            float32 array of shape ``(stop - start, in_features)`` or the full shape.

        Raises:
            ModelFormatError: the tensor is missing or its data is truncated.
        """
        ...
