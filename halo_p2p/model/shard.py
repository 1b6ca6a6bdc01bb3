"""The torch side of a split model: a peer's neuron groups, and the coordinator's trunk.

A :class:`GroupShard` loads only the weight rows/columns of its groups (see
:mod:`halo_p2p.groups` for the slices) and keeps the KV cache of its own attention heads, so
its resident weight bytes shrink in proportion to its share of the groups. :class:`Trunk`
holds what the coordinator alone needs: token embeddings, RMSNorm weights and the classifier.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch

from halo_p2p.groups import ATTN, MLP, MLP_TENSORS, SLICE_AXIS, GroupId, GroupLayout, tensor_names
from halo_p2p.model.config import ModelConfig
from halo_p2p.model.llama import AttentionShard, KVCache, MlpShard, RopeTables, rms_norm
from halo_p2p.model.source import TensorSource

__all__ = ["TAKEOVER_BUDGET_BYTES", "GroupShard", "GroupWeights", "MlpTakeover", "SliceWeights", "Trunk",
           "mlp_group_scores"]

log = logging.getLogger(__name__)


class GroupWeights(Protocol):
    """Where a shard gets the weight slices of one neuron group.

    ``group(gid)`` returns float32 arrays: for an attention group ``wq`` ``(r*hd, dim)``,
    ``wk``/``wv`` ``(hd, dim)`` (rows) and ``wo`` ``(dim, r*hd)`` (columns); for an MLP group
    ``w1``/``w3`` ``(G, dim)`` (rows) and ``w2`` ``(dim, G)`` (columns). See :mod:`halo_p2p.groups`.
    """

    @property
    def config(self) -> ModelConfig: ...

    def group(self, gid: GroupId) -> dict[str, np.ndarray]: ...


class SliceWeights:
    """:class:`GroupWeights` cut from a local model file (row slices are dequantized alone;
    Wo and W2 are loaded one layer at a time and sliced by columns)."""

    def __init__(self, source: TensorSource, layout: GroupLayout) -> None:
        self.source, self.layout = source, layout
        self._cols: tuple[str, np.ndarray] | None = None   # the last column-sliced matrix

    @property
    def config(self) -> ModelConfig:
        return self.source.config

    def _columns(self, name: str, a: int, b: int) -> np.ndarray:
        if self._cols is None or self._cols[0] != name:
            self._cols = (name, self.source.load(name))
        return np.ascontiguousarray(self._cols[1][:, a:b])

    def group(self, gid: GroupId) -> dict[str, np.ndarray]:
        p = f"layers.{gid.layer}."
        return {name: self.source.load(p + name, rows=span) if SLICE_AXIS[name] == 0 else self._columns(p + name, *span)
                for name, span in self.layout.tensor_spans(gid.part, gid.index).items()}


class GroupShard:
    """The neuron groups one peer computes, with their weights and KV caches.

    Args:
        weights: the group weight slices (a local file via :class:`SliceWeights`, or weights
            streamed from the coordinator).
        layout: the model's group layout.
        groups: the groups to hold.
        max_seq_len: KV-cache length in tokens.
    """

    def __init__(self, weights: GroupWeights | TensorSource, layout: GroupLayout, groups: Iterable[GroupId], *,
                 max_seq_len: int) -> None:
        if not hasattr(weights, "group"):
            weights = SliceWeights(weights, layout)
        c = weights.config
        self.layout = layout
        self.max_seq_len = max_seq_len
        held = sorted(set(groups))
        self.index: dict[tuple[int, int], list[int]] = {}
        for g in held:
            self.index.setdefault((g.layer, g.part), []).append(g.index)
        self.attention: dict[int, AttentionShard] = {}
        self.mlp: dict[int, MlpShard] = {}
        self.caches: dict[int, KVCache] = {}
        self.written: dict[int, int] = {}      # layer -> positions [0, n) hold valid keys
        for (layer, part), idx in self.index.items():
            parts = [weights.group(GroupId(layer, part, i)) for i in idx]

            w = {name: torch.from_numpy(np.ascontiguousarray(np.concatenate([g[name] for g in parts],
                                                                               axis=SLICE_AXIS[name])))
                 for name in tensor_names(part)}
            if part == ATTN:     # the shards' parameters are named as the tensors: wq, wk, wv, wo; w1, w3, w2
                self.attention[layer] = AttentionShard(**w, q_per_kv=layout.q_per_kv, head_dim=layout.head_dim)
                self.caches[layer] = KVCache(len(idx), max_seq_len, layout.head_dim, torch.float32)
                self.written[layer] = 0
            else:
                self.mlp[layer] = MlpShard(**w, group_size=layout.mlp_group_size)
        self.rope = RopeTables.build(c.head_dim, max_seq_len, c.rope_base, torch.float32)

    def groups_at(self, layer: int, part: int) -> list[int]:
        """Indices of the groups held at sync point (layer, part), in partial order."""
        return self.index.get((layer, part), [])

    def reset(self) -> None:
        """Forget every position of the KV caches (a new sequence, the wire ``Reset``): all are
        masked out until written again."""
        for layer, cache in self.caches.items():
            cache.invalidate(0, self.max_seq_len)
            self.written[layer] = 0

    def weight_bytes(self) -> int:
        """Resident bytes of the held weights."""
        ts = [a.wqkv for a in self.attention.values()] + [a.wo for a in self.attention.values()]
        ts += [m.w13 for m in self.mlp.values()] + [m.w2 for m in self.mlp.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    @torch.inference_mode()
    def partials(self, layer: int, part: int, x: np.ndarray, start_pos: int) -> np.ndarray:
        """Partials of the held groups at one sync point.

        Args:
            x: ``(T, dim)`` float32 (or float16) normalized input at ``[start_pos, start_pos+T)``.
        Returns:
            float32 ``(n_held, T, dim)``, groups in :meth:`groups_at` order; ``(0, T, dim)``
            when none are held.

        For attention, positions before ``start_pos`` whose input this peer never received
        stay masked out of its heads (the KV cache marks them invalid) instead of stalling.
        """
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        t = xt.shape[0]
        if part == ATTN and layer in self.attention:
            return self.attention[layer].partials(self._attention_input(layer, xt, start_pos)).numpy()
        if part == MLP and layer in self.mlp:
            shard = self.mlp[layer]
            return shard.partials(shard.hidden(xt)).numpy()
        return np.zeros((0, t, self.layout.dim), dtype=np.float32)

    @torch.inference_mode()
    def answer(self, layer: int, part: int, x: np.ndarray, start_pos: int, rows: list[list[int]], *,
               norms: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Sums of the held groups' partials, row by row (a worker's answer, ``wire-protocol.md`` §4).

        Args:
            x, start_pos: as in :meth:`partials` (attention writes the KV cache of every held head).
            rows: group indices (held at this point) each row sums.
            norms: also return each listed group's partial norm.
        Returns:
            float32 ``(len(rows), T, dim)`` and float32 norms in row order (or None); the sum of
            a row equals the sum of those groups' :meth:`partials`.
        Raises:
            KeyError: a group not held here.
        """
        return answer_rows(self, self.attention.get(layer) if part == ATTN else self.mlp.get(layer),
                           layer, part, x, start_pos, rows, norms)

    def _attention_input(self, layer: int, xt: torch.Tensor, start_pos: int) -> torch.Tensor:
        cache, shard = self.caches[layer], self.attention[layer]
        if self.written[layer] < start_pos:                     # a gap: inputs never arrived
            cache.invalidate(self.written[layer], start_pos)
        self.written[layer] = start_pos + xt.shape[0]
        return shard.heads(xt, start_pos, cache, self.rope)


def answer_rows(owner: GroupShard | Any, shard: AttentionShard | MlpShard | None, layer: int, part: int,
                x: np.ndarray, start_pos: int, rows: list[list[int]],
                norms: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``answer`` of :class:`GroupShard` and ``PagedShard`` (``owner``: ``index``, ``layout``,
    ``_attention_input``) for ``shard``, the layer's attention or MLP shard."""
    if shard is None:
        raise KeyError(f"no groups held at layer {layer} part {part}")
    position = {g: i for i, g in enumerate(owner.index[(layer, part)])}
    where = [[position[g] for g in row] for row in rows]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    # mypy: part == ATTN picks the shard type; MlpShard has hidden()
    act = owner._attention_input(layer, xt, start_pos) if part == ATTN else shard.hidden(xt)  # type: ignore[union-attr]
    out, nrm = shard.sums(act, where, norms=norms)
    return out.numpy(), (nrm.numpy() if nrm is not None else None)


class Trunk:
    """Embeddings, RMSNorm weights and classifier: the coordinator's share of every model.

    Args:
        source: model weights.
    """

    def __init__(self, source: TensorSource) -> None:
        c = self.config = source.config

        def t(name: str) -> torch.Tensor:
            return torch.from_numpy(source.load(name))

        self.tok_embeddings = t("tok_embeddings")
        self.output = self.tok_embeddings if c.tied_embeddings else t("output")
        self.norm = t("norm")
        self.norms = {(i, ATTN): t(f"layers.{i}.attention_norm") for i in range(c.n_layers)}
        self.norms |= {(i, MLP): t(f"layers.{i}.ffn_norm") for i in range(c.n_layers)}
        self._np_norms = {k: v.numpy() for k, v in self.norms.items()}

    def weight_bytes(self) -> int:
        ts = [self.tok_embeddings, self.norm, *self.norms.values()]
        if self.output is not self.tok_embeddings:
            ts.append(self.output)
        return sum(x.numel() * x.element_size() for x in ts)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Residual stream ``(T, dim)`` float32 for ``(T,)`` int64 ids."""
        return self.tok_embeddings[torch.from_numpy(np.asarray(token_ids, dtype=np.int64))].numpy().copy()

    @torch.inference_mode()
    def normed(self, layer: int, part: int, x: np.ndarray) -> np.ndarray:
        """Input of sync point (layer, part): ``RMSNorm(x) * g``, ``(T, dim)`` float32."""
        return rms_norm(torch.from_numpy(x), self.norms[(layer, part)], self.config.norm_eps).numpy()

    def normed_row(self, layer: int, part: int, x: np.ndarray) -> np.ndarray:
        """:meth:`normed` of a decode step's ``(1, dim)`` float32 row, in numpy: ~5 µs instead of
        ~100 µs of torch dispatch, so it may run on the event loop (same float32 operations)."""
        ms = np.float32(np.dot(x[0], x[0]) / x.shape[1]) + np.float32(self.config.norm_eps)
        return x * (np.float32(1.0) / np.sqrt(ms)) * self._np_norms[(layer, part)]

    @torch.inference_mode()
    def logits(self, x: np.ndarray, *, all_logits: bool) -> np.ndarray:
        """Classifier over the final norm: ``(T, vocab)`` or ``(1, vocab)`` float32."""
        xt = torch.from_numpy(x if all_logits else x[-1:])
        return (rms_norm(xt, self.norm, self.config.norm_eps) @ self.output.T).numpy()


def mlp_group_scores(source: TensorSource, layout: GroupLayout) -> np.ndarray:
    """Static importance of every MLP group: ``|W1_j|_F * |W3_j|_F * |W2[:, j]|_F``.

    Returns:
        float64 ``(n_layers, n_mlp)``; a cheap bound on how far a group can move the residual
        stream, used by the placeholder criticality rule.
    """
    scores = np.zeros((layout.n_layers, layout.n_mlp))
    g = layout.mlp_group_size
    for layer in range(layout.n_layers):
        p = f"layers.{layer}."
        norms = []
        for name in MLP_TENSORS:
            w = source.load(p + name).astype(np.float64)
            sq = (w * w).sum(axis=1 - SLICE_AXIS[name])      # per intermediate neuron
            norms.append(np.sqrt(sq.reshape(layout.n_mlp, g).sum(axis=1)))
        scores[layer] = norms[0] * norms[1] * norms[2]
    return scores


TAKEOVER_BUDGET_BYTES = 256 << 20
"""Default resident bytes of :class:`MlpTakeover`: every MLP group of one SmolLM2-135M peer in
four (80 MB fp32) fits, so a lossy peer's groups are sliced once, not per token."""


class MlpTakeover:
    """Computes any MLP groups on demand (per-token dynamic placement, HALO's critical groups).

    When a group assigned to an unstable peer is critical for the current token, the coordinator
    computes it itself instead of waiting for it. MLP groups carry no state (unlike attention
    groups and their KV cache), so any peer holding the weights can compute them for one token.
    Slices are loaded on first use and kept in an LRU bounded by ``budget_bytes``.

    Args:
        weights: where group slices come from (the coordinator's own model file).
        budget_bytes: resident bytes for taken-over groups (an LRU beyond; default
            :data:`TAKEOVER_BUDGET_BYTES`).
    """

    def __init__(self, weights: GroupWeights, budget_bytes: int = TAKEOVER_BUDGET_BYTES) -> None:
        self.weights, self.budget_bytes = weights, budget_bytes
        self._lru: OrderedDict[GroupId, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def _group(self, gid: GroupId) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._lru.pop(gid, None)
        if hit is None:
            w = self.weights.group(gid)
            w13 = torch.from_numpy(np.concatenate([w["w1"], w["w3"]]))
            hit = (w13, torch.from_numpy(np.ascontiguousarray(w["w2"])))
            self._bytes += sum(t.numel() * t.element_size() for t in hit)
        self._lru[gid] = hit
        while self._bytes > self.budget_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old)
        return hit

    @torch.inference_mode()
    def partials(self, layer: int, groups: list[int], hn: np.ndarray) -> np.ndarray:
        """float32 ``(len(groups), T, dim)`` partials of MLP ``groups`` of ``layer`` for ``hn`` ``(T, dim)``."""
        x = torch.from_numpy(np.ascontiguousarray(hn, dtype=np.float32))
        out = []
        for g in groups:
            w13, w2 = self._group(GroupId(layer, MLP, g))
            gate, up = (x @ w13.T).chunk(2, dim=-1)
            out.append((torch.nn.functional.silu(gate) * up) @ w2.T)
        return torch.stack(out).numpy() if out else np.zeros((0, *hn.shape), dtype=np.float32)
