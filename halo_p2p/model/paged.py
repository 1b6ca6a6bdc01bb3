"""A peer's neuron groups under a memory budget: weights paged in while the previous layer computes.

HALO (arXiv 2601.11676) lets a peer hold more groups than fit in memory: the weights of the
groups needed next are loaded (from the memory-mapped model file, dequantizing only their rows)
while the current sync point computes, a two-stage pipeline of load and compute.

:class:`PagedShard` computes the same partials as :class:`~halo_p2p.model.shard.GroupShard`
(bit for bit, float32) but keeps a group's weights only while their *block* is resident. A block
is everything the shard holds at one sync point ``(layer, part)``: the rows of Wq/Wk/Wv and the
columns of Wo of its attention groups, or the rows of W1/W3 and the columns of W2 of its MLP
groups. Blocks are loaded in one background thread and kept in a cache whose bytes (blocks
resident plus blocks being loaded) never exceed ``memory_budget_bytes``.

Memory accounting: the budget covers the paged weight blocks only (float32 sizes of their
final tensors). The attention KV caches are state, never paged; they are allocated up front and
reported separately as ``kv_bytes`` in :meth:`PagedShard.stats`. Transient buffers of a load in
progress (the whole dequantized Wo/W2 of a layer, which are sliced by columns, and the
concatenation copies) are not counted; peak RSS shows them.

Eviction: the shard's sync points are visited in a fixed cyclic order (layer by layer, wrapping
to layer 0 at the next token), so the block needed furthest in the future is known. The default
``policy="furthest"`` evicts it first (Belady's rule); ``policy="lru"`` evicts the least recently
used block, which on a cyclic order misses on every block once the budget is below the shard's
weights. Either way a prefetch never evicts a block needed sooner than the one it loads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN, MLP, GroupId, GroupLayout
from halo_p2p.model.llama import AttentionShard, KVCache, MlpShard, RopeTables
from halo_p2p.model.shard import GroupWeights
from halo_p2p.model.source import TensorSource

__all__ = ["PagedShard"]

log = logging.getLogger(__name__)

Key = tuple[int, int]          # (layer, part)
Policy = Literal["furthest", "lru"]
_F32 = 4                       # bytes per float32 weight


@dataclass(slots=True)
class _Block:
    shard: AttentionShard | MlpShard
    nbytes: int
    last_use: int


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as half-open ``(first, stop)`` pairs."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _load_rows(source: TensorSource, name: str, spans: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([source.load(name, rows=s) for s in spans])


def _load_cols(source: TensorSource, name: str, spans: list[tuple[int, int]]) -> np.ndarray:
    full = source.load(name)                    # column slices need the whole matrix dequantized
    return np.concatenate([full[:, a:b] for a, b in spans], axis=1)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


class PagedShard:
    """The neuron groups of one peer with their weights paged under a memory budget.

    Implements :class:`~halo_p2p.engine.protocol.GroupCompute`. Not reentrant: call
    :meth:`partials` from one thread at a time (the peer's compute thread), as for
    :class:`~halo_p2p.model.shard.GroupShard`.

    Args:
        weights: a model file (row loads dequantize only those rows) or a
            :class:`~halo_p2p.model.shard.GroupWeights` (queried group by group, under a lock).
        layout: the model's group layout.
        groups: the groups to hold.
        max_seq_len: KV-cache length in tokens.
        memory_budget_bytes: upper bound on resident plus loading weight-block bytes (float32).
        prefetch_layers: how many of the shard's next sync points (``(layer, part)`` pairs where
            it holds groups, wrapping to layer 0) to load in the background after each call.
        policy: eviction rule, ``"furthest"`` (next use furthest away) or ``"lru"``.

    Raises:
        ConfigError: the budget is below the largest block (one sync point's weights), a
            negative ``prefetch_layers``, or an unknown policy.
    """

    def __init__(self, weights: GroupWeights | TensorSource, layout: GroupLayout, groups: Iterable[GroupId], *,
                 max_seq_len: int, memory_budget_bytes: int, prefetch_layers: int = 2,
                 policy: Policy = "furthest") -> None:
        if policy not in ("furthest", "lru"):
            raise ConfigError(f"unknown paging policy {policy!r}", "use 'furthest' or 'lru'")
        if prefetch_layers < 0:
            raise ConfigError(f"prefetch_layers={prefetch_layers} is negative", "use 0 or more")
        self.weights, self.layout, self.max_seq_len = weights, layout, max_seq_len
        self.budget, self.prefetch_layers, self.policy = int(memory_budget_bytes), prefetch_layers, policy
        self.index: dict[Key, list[int]] = {}
        for g in sorted(set(groups)):
            self.index.setdefault((g.layer, g.part), []).append(g.index)
        self.order: list[Key] = sorted(self.index)               # the cyclic visiting order
        self._pos = {k: i for i, k in enumerate(self.order)}
        self.block_bytes = {k: len(idx) * layout.group_params(k[1]) * _F32 for k, idx in self.index.items()}
        need = max(self.block_bytes.values(), default=0)
        if need > self.budget:
            worst = max(self.block_bytes, key=self.block_bytes.__getitem__)
            raise ConfigError(
                f"memory budget {self.budget} bytes is below the largest weight block "
                f"(layer {worst[0]} {'attention' if worst[1] == ATTN else 'MLP'}, {need} bytes): "
                f"at least {need} bytes are needed", f"raise the budget to >= {need} bytes or hold fewer groups")
        self.caches = {layer: KVCache(len(idx), max_seq_len, layout.head_dim, torch.float32)
                       for (layer, part), idx in self.index.items() if part == ATTN}
        self.written = dict.fromkeys(self.caches, 0)        # layer -> positions [0, n) hold valid keys
        c = weights.config
        self.rope = RopeTables.build(c.head_dim, max_seq_len, c.rope_base, torch.float32)
        self._lock = threading.Lock()                       # guards the fields below
        self._weights_lock = threading.Lock()               # GroupWeights may keep state (SliceWeights)
        self._blocks: dict[Key, _Block] = {}
        self._inflight: dict[Key, Future[None]] = {}
        self._reserved = 0                                  # bytes of blocks being loaded
        self._pinned: Key | None = None
        self._clock = 0
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="paged-loader")
        self.reset_stats()
        log.debug("paged shard: %d blocks, %d weight bytes, budget %d, kv %d bytes", len(self.order),
                  sum(self.block_bytes.values()), self.budget, self.kv_bytes())

    # -- GroupCompute ---------------------------------------------------------------------------

    def groups_at(self, layer: int, part: int) -> list[int]:
        """Indices of the groups held at sync point (layer, part), in partial order."""
        return self.index.get((layer, part), [])

    def weight_bytes(self) -> int:
        """Bytes of the weight blocks resident now (float32), excluding KV caches."""
        with self._lock:
            return sum(b.nbytes for b in self._blocks.values())

    @torch.inference_mode()
    def partials(self, layer: int, part: int, x: np.ndarray, start_pos: int) -> np.ndarray:
        """Partials of the held groups at one sync point, loading their weights if needed.

        Waits for the block of (layer, part) (loading it on this thread unless the loader
        already has it), schedules the next ``prefetch_layers`` blocks, then computes.

        Args:
            x: ``(T, dim)`` float32 (or float16) normalized input at ``[start_pos, start_pos+T)``.
            start_pos: position of the first row of ``x``.
        Returns:
            float32 ``(n_held, T, dim)``, groups in :meth:`groups_at` order; ``(0, T, dim)``
            when none are held. Equal to :meth:`GroupShard.partials` bit for bit.
        Raises:
            ModelFormatError: loading the block failed (from the weights source).
        """
        key = (layer, part)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        t = xt.shape[0]
        if key not in self.index:
            return np.zeros((0, t, self.layout.dim), dtype=np.float32)
        t0 = time.perf_counter()
        shard = self._acquire(key)
        t1 = time.perf_counter()
        try:
            self._prefetch(key)
            if part == ATTN:
                assert isinstance(shard, AttentionShard)
                cache = self.caches[layer]
                if self.written[layer] < start_pos:                 # a gap: inputs never arrived
                    cache.invalidate(self.written[layer], start_pos)
                self.written[layer] = start_pos + t
                out = shard.partials(shard.heads(xt, start_pos, cache, self.rope)).numpy()
            else:
                assert isinstance(shard, MlpShard)
                out = shard.partials(shard.hidden(xt)).numpy()
        finally:
            with self._lock:
                self._pinned = None
        t2 = time.perf_counter()
        with self._lock:
            self._wait_s += t1 - t0
            self._compute_s += t2 - t1
            self._calls += 1
        return out

    # -- metrics and lifetime -------------------------------------------------------------------

    def kv_bytes(self) -> int:
        """Bytes of the KV caches (always resident, outside the budget)."""
        return sum(2 * c.k.numel() * c.k.element_size() + c.valid.numel() for c in self.caches.values())

    def stats(self) -> dict[str, float | int | str]:
        """Paging metrics since construction or :meth:`reset_stats`.

        Returns:
            ``load_s_total`` (s spent building blocks, loader thread or inline),
            ``wait_s_total`` (s :meth:`partials` blocked on its block), ``compute_s_total`` (s
            of compute in :meth:`partials`), ``hidden_fraction`` (``1 - wait/load``, 1.0 when
            nothing loaded), ``loads`` (= ``prefetch_loads + inline_loads``), ``hits`` (calls
            whose block was resident), ``evictions``, ``calls``, ``resident_bytes``,
            ``peak_resident_bytes`` (high-water mark of resident plus loading bytes),
            ``budget_bytes``, ``kv_bytes``, ``total_block_bytes``, ``policy``.
        """
        with self._lock:
            load, wait = self._load_s, self._wait_s
            return {
                "load_s_total": load, "wait_s_total": wait, "compute_s_total": self._compute_s,
                "hidden_fraction": 1.0 - wait / load if load > 0 else 1.0,
                "loads": self._prefetch_loads + self._inline_loads, "prefetch_loads": self._prefetch_loads,
                "inline_loads": self._inline_loads, "hits": self._hits, "evictions": self._evictions,
                "calls": self._calls, "resident_bytes": sum(b.nbytes for b in self._blocks.values()),
                "peak_resident_bytes": self._peak, "budget_bytes": self.budget, "kv_bytes": self.kv_bytes(),
                "total_block_bytes": sum(self.block_bytes.values()), "policy": self.policy,
            }

    def reset_stats(self) -> None:
        """Zero the counters and timers; the high-water mark restarts at the current bytes."""
        with self._lock:
            self._load_s = self._wait_s = self._compute_s = 0.0
            self._prefetch_loads = self._inline_loads = self._hits = self._evictions = self._calls = 0
            self._peak = self._committed()

    def close(self) -> None:
        """Stop the loader thread (waiting for a load in flight) and drop every block."""
        self._loader.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._blocks.clear()

    def __enter__(self) -> PagedShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paging ---------------------------------------------------------------------------------

    def _committed(self) -> int:
        return sum(b.nbytes for b in self._blocks.values()) + self._reserved

    def _distance(self, key: Key, now: Key) -> int:
        """Sync points from ``now`` until ``key`` is next used (0 = ``now`` itself)."""
        return (self._pos[key] - self._pos[now]) % len(self.order)

    def _acquire(self, key: Key) -> AttentionShard | MlpShard:
        """The block of ``key``, resident and pinned; loads it here if nobody is loading it."""
        first = True
        while True:
            with self._lock:
                block = self._blocks.get(key)
                if block is not None:
                    self._hits += first
                    self._clock += 1
                    block.last_use, self._pinned = self._clock, key
                    return block.shard
                fut = self._inflight.get(key)
            first = False
            if fut is not None:
                fut.result()              # the loader inserts the block before the future completes
            else:                         # (and only this thread evicts, so it is still there)
                self._load_inline(key)

    def _load_inline(self, key: Key) -> None:
        need = self.block_bytes[key]
        while True:
            with self._lock:
                if self._evict_for(need, key, 0):
                    self._reserved += need
                    self._peak = max(self._peak, self._committed())
                    self._inline_loads += 1
                    break
                pending = list(self._inflight.values())
            assert pending, "budget below one block despite the constructor's check"
            for f in pending:             # room is held by prefetches: let them land, then evict
                f.exception()
        self._load(key)

    def _prefetch(self, now: Key) -> None:
        for d in range(1, min(self.prefetch_layers, len(self.order) - 1) + 1):
            key = self.order[(self._pos[now] + d) % len(self.order)]
            with self._lock:
                if key in self._blocks or key in self._inflight:
                    continue
                need = self.block_bytes[key]
                if not self._evict_for(need, now, d):
                    return                # no room without evicting blocks needed sooner
                self._reserved += need
                self._peak = max(self._peak, self._committed())
                self._prefetch_loads += 1
                # submitted under the lock: _load cannot pop the entry before it is stored
                self._inflight[key] = self._loader.submit(self._load, key)

    def _evict_for(self, need: int, now: Key, distance: int) -> bool:
        """Evict (lock held) until ``need`` more bytes fit, sparing the pinned block and blocks
        needed within ``distance`` sync points of ``now``; False (nothing evicted) if impossible."""
        free = self.budget - self._committed()
        if need <= free:
            return True
        victims = [k for k in self._blocks if k != self._pinned and self._distance(k, now) > distance]
        if self.policy == "furthest":
            victims.sort(key=lambda k: -self._distance(k, now))
        else:
            victims.sort(key=lambda k: self._blocks[k].last_use)
        chosen, gain = [], 0
        for k in victims:
            if need <= free + gain:
                break
            chosen.append(k)
            gain += self._blocks[k].nbytes
        if need > free + gain:
            return False
        for k in chosen:
            del self._blocks[k]
        self._evictions += len(chosen)
        return True

    def _load(self, key: Key) -> None:
        """Build the block of ``key`` (on the loader thread or inline) and make it resident."""
        t0 = time.perf_counter()
        need = self.block_bytes[key]
        try:
            shard = self._build(*key)
        except BaseException as exc:
            with self._lock:
                self._reserved -= need
                self._inflight.pop(key, None)
            log.warning("loading the weights of layer %d part %d failed: %s", *key, exc)
            raise
        dt = time.perf_counter() - t0
        with self._lock:
            self._reserved -= need
            self._blocks[key] = _Block(shard, need, self._clock)
            self._inflight.pop(key, None)
            self._load_s += dt

    def _build(self, layer: int, part: int) -> AttentionShard | MlpShard:
        """The torch shard of sync point (layer, part): same tensors as GroupShard builds."""
        idx, lay = self.index[(layer, part)], self.layout
        if hasattr(self.weights, "group"):
            with self._weights_lock:
                parts = [self.weights.group(GroupId(layer, part, i)) for i in idx]  # type: ignore[union-attr]

            def cat(name: str, axis: int = 0) -> np.ndarray:
                return np.concatenate([w[name] for w in parts], axis=axis)

            w = {n: cat(n) for n in ("wq", "wk", "wv", "w1", "w3") if n in parts[0]}
            w |= {n: cat(n, 1) for n in ("wo", "w2") if n in parts[0]}
        else:
            src: TensorSource = self.weights  # type: ignore[assignment]
            p, runs = f"layers.{layer}.", _runs(idx)
            if part == ATTN:
                q = [(lay.q_rows(a)[0], lay.q_rows(b - 1)[1]) for a, b in runs]
                kv = [(lay.kv_rows(a)[0], lay.kv_rows(b - 1)[1]) for a, b in runs]
                w = {"wq": _load_rows(src, p + "wq", q), "wk": _load_rows(src, p + "wk", kv),
                     "wv": _load_rows(src, p + "wv", kv), "wo": _load_cols(src, p + "wo", q)}
            else:
                rows = [(lay.mlp_rows(a)[0], lay.mlp_rows(b - 1)[1]) for a, b in runs]
                w = {"w1": _load_rows(src, p + "w1", rows), "w3": _load_rows(src, p + "w3", rows),
                     "w2": _load_cols(src, p + "w2", rows)}
        if part == ATTN:
            return AttentionShard(_tensor(w["wq"]), _tensor(w["wk"]), _tensor(w["wv"]), _tensor(w["wo"]),
                                  lay.q_per_kv, lay.head_dim)
        assert part == MLP
        return MlpShard(_tensor(w["w1"]), _tensor(w["w3"]), _tensor(w["w2"]), lay.mlp_group_size)
