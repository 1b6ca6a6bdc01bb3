"""A LLaMA-family decoder in torch, written so that each block is a sum of neuron-group partials.

One block (batch 1, ``T`` new tokens, residual ``x`` of shape ``(T, dim)``)::

    xn  = RMSNorm(x) * g_att
    h   = x + sum_g  Wo[:, g] @ Attn_g(xn)                 (attention, one term per KV-head group)
    hn  = RMSNorm(h) * g_ffn
    out = h + sum_j  W2[:, j] @ (silu(W1[j] hn) * W3[j] hn)  (SwiGLU MLP, one term per neuron block)

``Attn_g`` is causal attention of the query heads that share KV head ``g`` (GQA) with RoPE on
adjacent pairs ``(x[2i], x[2i+1])`` as in llama.cpp and llama2.c ``run.c``. Because the sums are
separable, :class:`AttentionShard` and :class:`MlpShard` compute any subset of groups with the
same code that runs the whole layer; :meth:`AttentionShard.partials` and
:meth:`MlpShard.partials` return one ``(T, dim)`` partial per group for relaxed synchronization.

References: Touvron et al. 2023 (LLaMA: RMSNorm, SwiGLU, RoPE); Ainslie et al. 2023 (GQA);
Su et al. 2021 (RoPE); karpathy/llama2.c ``run.c`` ``forward``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from halo_p2p.errors import ConfigError
from halo_p2p.model.source import TensorSource

__all__ = [
    "AttentionShard", "KVCache", "Llama", "MlpShard", "RopeTables", "linear", "rms_norm", "row_sums", "weight_dtype",
]

log = logging.getLogger(__name__)

Tensor = torch.Tensor


WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``--dtype`` name.

    Raises:
        ConfigError: an unknown name.
    """
    try:
        return WEIGHT_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown weight dtype {name!r}",
                          f"use one of {', '.join(WEIGHT_DTYPES)}") from None


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` in the weight's dtype, result in float32.

    Weights may be stored in float16/bfloat16 to halve the memory traffic of decoding (which is
    bandwidth-bound); activations, norms, softmax and the residual stream stay float32.
    """
    if weight.dtype == x.dtype:
        return x @ weight.T
    return (x.to(weight.dtype) @ weight.T).float()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@dataclass(frozen=True, slots=True)
class RopeTables:
    """cos/sin of RoPE angles ``pos * base^(-2i/head_dim)``, each ``(max_seq_len, head_dim/2)``."""

    cos: Tensor
    sin: Tensor

    @classmethod
    def build(cls, head_dim: int, max_seq_len: int, base: float, dtype: torch.dtype) -> RopeTables:
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv)
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))

    def apply(self, x: Tensor, start_pos: int) -> Tensor:
        """Rotate adjacent pairs of ``x`` ``(heads, T, head_dim)`` for positions from ``start_pos``."""
        t = x.shape[-2]
        cos, sin = self.cos[start_pos:start_pos + t], self.sin[start_pos:start_pos + t]  # (T, hd/2)
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)                                       # (H, T, hd/2)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class KVCache:
    """Keys and values of some KV heads of one layer, with a per-position validity mask.

    Attributes:
        k, v: ``(n_kv_heads, max_seq_len, head_dim)`` in the model dtype.
        valid: ``(max_seq_len,)`` bool, True where keys/values were written; other positions
            are masked out of attention (e.g. a worker that never received a layer's input for
            that position, see :meth:`invalidate`).
    """

    def __init__(self, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
        self.k = torch.zeros(n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(max_seq_len, dtype=torch.bool)

    def invalidate(self, start_pos: int, stop_pos: int) -> None:
        """Mask positions ``[start_pos, stop_pos)`` out of attention until they are rewritten."""
        self.valid[start_pos:stop_pos] = False


class AttentionShard:
    """The attention of a set of KV-head groups of one layer (all groups = the whole layer).

    Args:
        wq: ``(n_groups * q_per_kv * head_dim, dim)`` rows of Wq for the groups, in group order.
        wk, wv: ``(n_groups * head_dim, dim)`` rows of Wk and Wv.
        wo: ``(dim, n_groups * q_per_kv * head_dim)`` columns of Wo.
        q_per_kv: query heads per KV head (GQA ratio).
        head_dim: width of one head.
    """

    def __init__(self, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor, q_per_kv: int, head_dim: int) -> None:
        self.n_groups = wk.shape[0] // head_dim
        self.q_per_kv, self.head_dim = q_per_kv, head_dim
        self.q_rows, self.kv_rows = wq.shape[0], wk.shape[0]
        self.wqkv = torch.cat((wq, wk, wv)).contiguous()   # one matmul for Q, K and V
        self.wo = wo.contiguous()

    def heads(self, xn: Tensor, start_pos: int, cache: KVCache, rope: RopeTables) -> Tensor:
        """Attention output of every query head of the shard, before Wo.

        Args:
            xn: ``(T, dim)`` normalized layer input at positions ``[start_pos, start_pos+T)``.
            cache: this shard's KV cache; positions ``[start_pos, start_pos+T)`` are written.
        Returns:
            ``(T, n_groups * q_per_kv * head_dim)``, heads in group order.
        """
        t, hd, g = xn.shape[0], self.head_dim, self.n_groups
        q, k, v = linear(xn, self.wqkv).split((self.q_rows, self.kv_rows, self.kv_rows), dim=-1)
        q = rope.apply(q.view(t, -1, hd).transpose(0, 1), start_pos)            # (Hq, T, hd)
        k = rope.apply(k.view(t, g, hd).transpose(0, 1), start_pos)             # (G, T, hd)
        end = start_pos + t
        cache.k[:, start_pos:end] = k
        cache.v[:, start_pos:end] = v.view(t, g, hd).transpose(0, 1)
        cache.valid[start_pos:end] = True
        keys, values = cache.k[:, :end], cache.v[:, :end]                       # (G, end, hd)
        mask = None
        if t > 1 or not bool(cache.valid[:end].all()):
            causal = torch.ones(t, end, dtype=torch.bool).tril(diagonal=start_pos)
            mask = causal & cache.valid[:end]                                   # (T, end)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1).reshape(t, -1)                               # (T, Hq*hd)

    def output(self, heads: Tensor) -> Tensor:
        """Sum over the shard's groups, ``(T, dim)``."""
        return linear(heads, self.wo)

    def partials(self, heads: Tensor) -> Tensor:
        """One partial per group, ``(n_groups, T, dim)``; their sum equals :meth:`output`."""
        t = heads.shape[0]
        per_group = heads.view(t, self.n_groups, -1)                            # (T, G, r*hd)
        wo = self.wo.float().view(self.wo.shape[0], self.n_groups, -1)          # (dim, G, r*hd)
        return torch.einsum("tgk,dgk->gtd", per_group, wo)

    def sums(self, heads: Tensor, rows: list[list[int]], *, norms: bool) -> tuple[Tensor, Tensor | None]:
        """Row sums of the groups' partials; see :func:`row_sums`."""
        return row_sums(heads, self.n_groups, rows, self.output, self.partials, norms=norms)


class MlpShard:
    """The SwiGLU MLP of a set of equal-width intermediate-neuron blocks (all = the whole MLP).

    Args:
        w1, w3: ``(n_neurons, dim)`` rows of the gate and up projections, blocks in order.
        w2: ``(dim, n_neurons)`` columns of the down projection.
        group_size: neurons per group; ``n_neurons % group_size == 0``.
    """

    def __init__(self, w1: Tensor, w3: Tensor, w2: Tensor, group_size: int) -> None:
        self.n_neurons = w1.shape[0]
        self.group_size = group_size
        self.w13 = torch.cat((w1, w3)).contiguous()
        self.w2 = w2.contiguous()

    def hidden(self, hn: Tensor) -> Tensor:
        """``silu(W1 hn) * (W3 hn)``, ``(T, n_neurons)``."""
        gate, up = linear(hn, self.w13).split(self.n_neurons, dim=-1)
        return F.silu(gate) * up

    def output(self, hidden: Tensor) -> Tensor:
        """Sum over the shard's neuron blocks, ``(T, dim)``."""
        return linear(hidden, self.w2)

    def partials(self, hidden: Tensor) -> Tensor:
        """One partial per neuron block, ``(n_groups, T, dim)``; their sum equals :meth:`output`."""
        t = hidden.shape[0]
        per_group = hidden.view(t, -1, self.group_size)                         # (T, G, gs)
        w2 = self.w2.float().view(self.w2.shape[0], -1, self.group_size)        # (dim, G, gs)
        return torch.einsum("tgk,dgk->gtd", per_group, w2)

    def sums(self, hidden: Tensor, rows: list[list[int]], *, norms: bool) -> tuple[Tensor, Tensor | None]:
        """Row sums of the neuron blocks' partials; see :func:`row_sums`."""
        return row_sums(hidden, self.n_neurons // self.group_size, rows, self.output, self.partials, norms=norms)


def row_sums(act: Tensor, n_groups: int, rows: list[list[int]], output: Callable[[Tensor], Tensor],
             partials: Callable[[Tensor], Tensor], *, norms: bool) -> tuple[Tensor, Tensor | None]:
    """Sums of group partials, row by row, without forming the partials when it need not.

    Args:
        act: ``(T, n_groups * w)`` group-major activations before the output projection
            (attention heads, or the SwiGLU hidden units).
        n_groups: groups in ``act``.
        rows: positions (``0 <= i < n_groups``, the shard's order) of the groups each row sums.
        output: the shard's output projection (``act -> (T, dim)``: the sum over all groups).
        partials: the shard's per-group partials (``act -> (n_groups, T, dim)``).
        norms: also return each listed group's partial L2 norm.

    Returns:
        float32 ``(len(rows), T, dim)`` and, with ``norms``, float32 norms of the groups in row
        order (else None). One row and no norms is one matrix product (other groups' units
        zeroed), the cost of the dense layer; otherwise the per-group partials are formed.
    """
    if norms or len(rows) != 1:
        p = partials(act)
        out = torch.stack([p[r].sum(dim=0) for r in rows])
        flat = [g for r in rows for g in r]
        return out, (p[flat].flatten(1).norm(dim=1) if norms else None)
    (row,) = rows
    if len(row) < n_groups:                                     # leave the other groups out
        mask = torch.zeros(n_groups, dtype=act.dtype)
        mask[row] = 1
        act = (act.view(act.shape[0], n_groups, -1) * mask[:, None]).view(act.shape[0], -1)
    return output(act)[None], None


@dataclass(slots=True)
class _Block:
    attention_norm: Tensor
    ffn_norm: Tensor
    attention: AttentionShard
    mlp: MlpShard


class Llama:
    """The whole model on one peer, with a KV cache.

    Args:
        source: where the float32 weights come from (GGUF or llama2.c file).
        max_seq_len: KV-cache length in tokens (at most the model's context length).
        dtype: storage and matmul dtype of the weight matrices (float32 by default; float16
            halves decode memory traffic). Activations, norms and the KV cache stay float32.

    Raises:
        ModelFormatError: a tensor is missing or has the wrong shape (from the source).
    """

    def __init__(self, source: TensorSource, *, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        c = self.config = source.config
        self.max_seq_len = min(max_seq_len or c.max_seq_len, c.max_seq_len)
        self.dtype = dtype

        def t(name: str) -> Tensor:
            return torch.from_numpy(source.load(name)).to(dtype)

        def f32(name: str) -> Tensor:
            return torch.from_numpy(source.load(name))

        self.tok_embeddings = t("tok_embeddings")                              # (vocab, dim)
        self.norm = f32("norm")
        self.output = self.tok_embeddings if c.tied_embeddings else t("output")
        self.blocks = [
            _Block(f32(f"layers.{i}.attention_norm"), f32(f"layers.{i}.ffn_norm"),
                   AttentionShard(t(f"layers.{i}.wq"), t(f"layers.{i}.wk"), t(f"layers.{i}.wv"),
                                  t(f"layers.{i}.wo"), c.q_per_kv, c.head_dim),
                   MlpShard(t(f"layers.{i}.w1"), t(f"layers.{i}.w3"), t(f"layers.{i}.w2"),
                            c.hidden_dim))
            for i in range(c.n_layers)
        ]
        self.rope = RopeTables.build(c.head_dim, self.max_seq_len, c.rope_base, torch.float32)
        self.caches = [KVCache(c.n_kv_heads, self.max_seq_len, c.head_dim, torch.float32)
                       for _ in range(c.n_layers)]

    def weight_bytes(self) -> int:
        """Resident weight bytes (the tied classifier is counted once)."""
        tensors = [self.tok_embeddings, self.norm]
        if self.output is not self.tok_embeddings:
            tensors.append(self.output)
        for b in self.blocks:
            tensors += [b.attention_norm, b.ffn_norm, b.attention.wqkv, b.attention.wo,
                        b.mlp.w13, b.mlp.w2]
        return sum(x.numel() * x.element_size() for x in tensors)

    @torch.inference_mode()
    def forward(self, token_ids: np.ndarray, start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """Run ``T`` tokens at positions ``[start_pos, start_pos+T)`` through the model.

        Cache positions from ``start_pos`` on are overwritten, so a caller may rewind to reuse
        a shared prefix (e.g. the chat history).

        Args:
            token_ids: ``(T,)`` int64 ids.
            start_pos: position of ``token_ids[0]``; ``start_pos + T <= max_seq_len``.
            all_logits: return logits of every position (perplexity) or only the last.
        Returns:
            float32 logits, ``(T, vocab_size)`` or ``(1, vocab_size)``.
        Raises:
            ValueError: the positions do not fit the cache (callers check and raise
                :class:`~halo_p2p.errors.ContextOverflow` first).
        """
        t = len(token_ids)
        if start_pos < 0 or t == 0 or start_pos + t > self.max_seq_len:
            raise ValueError(f"positions [{start_pos}, {start_pos + t}) outside [0, {self.max_seq_len})")
        eps = self.config.norm_eps
        x = self.tok_embeddings[torch.from_numpy(np.asarray(token_ids, dtype=np.int64))].float()  # (T, dim)
        for block, cache in zip(self.blocks, self.caches, strict=True):
            xn = rms_norm(x, block.attention_norm, eps)
            x = x + block.attention.output(block.attention.heads(xn, start_pos, cache, self.rope))
            hn = rms_norm(x, block.ffn_norm, eps)
            x = x + block.mlp.output(block.mlp.hidden(hn))
        if not all_logits:
            x = x[-1:]
        return linear(rms_norm(x, self.norm, eps), self.output).numpy()          # (T|1, vocab)
