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

Block cache (opt-in, ``block_cache=``): dequantizing Q4_1 costs ~10x a block's compute. With a
:class:`~halo_p2p.model.block_cache.BlockCache` the first build of a block (or :meth:`PagedShard.warm`)
writes its final float32 matrices to disk as one flat array; later loads read it into a fresh
tensor (process memory, counted in the budget) whose views are the shard's matrices: exact.

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
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN, MLP, GroupId, GroupLayout
from halo_p2p.model.block_cache import BlockCache, flat_block, source_key
from halo_p2p.model.llama import AttentionShard, KVCache, MlpShard, RopeTables
from halo_p2p.model.shard import GroupWeights, answer_rows
from halo_p2p.model.source import TensorSource

__all__ = ["PagedShard"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Key = tuple[int, int]          # (layer, part)
Policy = Literal["furthest", "lru"]
_F32 = 4                       # bytes per float32 weight


@dataclass(slots=True)
class _Block:
    shard: AttentionShard | MlpShard
    nbytes: int
    last_use: int


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
        block_cache: a :class:`~halo_p2p.model.block_cache.BlockCache`, or a cache root folder
            (blocks then go to ``<root>/blocks/<source_key(weights)[:16]>/``); ``None`` (default)
            dequantizes every load from ``weights``.

    Raises:
        ConfigError: the budget is below the largest block (one sync point's weights), a
            negative ``prefetch_layers``, an unknown policy, or a cache root for weights that
            name no file (see :func:`~halo_p2p.model.block_cache.source_key`).
    """

    def __init__(self, weights: GroupWeights | TensorSource, layout: GroupLayout, groups: Iterable[GroupId], *,
                 max_seq_len: int, memory_budget_bytes: int, prefetch_layers: int = 2,
                 policy: Policy = "furthest", block_cache: BlockCache | Path | str | None = None) -> None:
        if policy not in ("furthest", "lru"):
            raise ConfigError(f"unknown paging policy {policy!r}", "use 'furthest' or 'lru'")
        if prefetch_layers < 0:
            raise ConfigError(f"prefetch_layers={prefetch_layers} is negative", "use 0 or more")
        self.weights, self.layout, self.max_seq_len = weights, layout, max_seq_len
        if block_cache is not None and not isinstance(block_cache, BlockCache):
            block_cache = BlockCache(block_cache, source_key(weights))
        self.block_cache: BlockCache | None = block_cache
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
        self._attention: AttentionShard | None = None      # the block being computed, for _attention_input
        self._clock = 0
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="paged-loader")
        self.reset_stats()
        log.debug("paged shard: %d blocks, %d weight bytes, budget %d, kv %d bytes", len(self.order),
                  sum(self.block_bytes.values()), self.budget, self.kv_bytes())

    # -- GroupCompute ---------------------------------------------------------------------------

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
        if (layer, part) not in self.index:
            return np.zeros((0, len(x), self.layout.dim), dtype=np.float32)

        def compute(shard: AttentionShard | MlpShard) -> np.ndarray:
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            # mypy: part == ATTN picks the shard type; MlpShard has hidden()
            act = self._attention_input(layer, xt, start_pos) if part == ATTN else shard.hidden(xt)  # type: ignore[union-attr]
            return shard.partials(act).numpy()

        return self._with_block(layer, part, compute)

    @torch.inference_mode()
    def answer(self, layer: int, part: int, x: np.ndarray, start_pos: int, rows: list[list[int]], *,
               norms: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Row sums of the held groups' partials, loading their weights if needed; see
        :meth:`~halo_p2p.model.shard.GroupShard.answer`.

        Raises:
            KeyError: a group not held here.
            ModelFormatError: loading the block failed (from the weights source).
        """
        if (layer, part) not in self.index:
            raise KeyError(f"no groups held at layer {layer} part {part}")
        return self._with_block(layer, part, lambda shard: answer_rows(self, shard, layer, part, x, start_pos, rows,
                                                                       norms))

    def _attention_input(self, layer: int, xt: torch.Tensor, start_pos: int) -> torch.Tensor:
        cache, shard = self.caches[layer], self._attention
        if self.written[layer] < start_pos:                         # a gap: inputs never arrived
            cache.invalidate(self.written[layer], start_pos)
        self.written[layer] = start_pos + xt.shape[0]
        assert shard is not None
        return shard.heads(xt, start_pos, cache, self.rope)

    def _with_block(self, layer: int, part: int, fn: Callable[[Any], T]) -> T:
        """``fn(shard)`` on the block of (layer, part), loaded (waited for) and pinned meanwhile."""
        key = (layer, part)
        t0 = time.perf_counter()
        shard = self._acquire(key)
        t1 = time.perf_counter()
        try:
            self._prefetch(key)
            self._attention = shard if isinstance(shard, AttentionShard) else None
            out = fn(shard)
        finally:
            self._attention = None
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
            ``budget_bytes``, ``kv_bytes``, ``total_block_bytes``, ``policy``; block-cache
            counts over loads (all 0 without a cache): ``cache_hits`` (copied from the cache),
            ``cache_misses`` (dequantized, then written), ``cache_rebuilds`` (damaged file deleted,
            dequantized, written again), ``cache_write_errors``.
        """
        with self._lock:
            load, wait = self._load_s, self._wait_s
            stats: dict[str, float | int | str] = {
                "load_s_total": load, "wait_s_total": wait, "compute_s_total": self._compute_s,
                "hidden_fraction": 1.0 - wait / load if load > 0 else 1.0,
                "loads": self._prefetch_loads + self._inline_loads, "prefetch_loads": self._prefetch_loads,
                "inline_loads": self._inline_loads, "hits": self._hits, "evictions": self._evictions,
                "calls": self._calls, "resident_bytes": sum(b.nbytes for b in self._blocks.values()),
                "peak_resident_bytes": self._peak, "budget_bytes": self.budget, "kv_bytes": self.kv_bytes(),
                "total_block_bytes": sum(self.block_bytes.values()), "policy": str(self.policy),
            }
            stats.update(self._cache_counts)
            return stats

    def reset_stats(self) -> None:
        """Zero the counters and timers; the high-water mark restarts at the current bytes."""
        with self._lock:
            self._load_s = self._wait_s = self._compute_s = 0.0
            self._prefetch_loads = self._inline_loads = self._hits = self._evictions = self._calls = 0
            self._peak = self._committed()
            self._cache_counts = dict.fromkeys(("cache_hits", "cache_misses", "cache_rebuilds",
                                                "cache_write_errors"), 0)

    def warm(self) -> int:
        """Write every block missing from the block cache (on this thread, one block in memory at
        a time, outside the budget and the counters) and return how many were written; a no-op
        without a cache. Raises ModelFormatError if reading the weights fails."""
        if self.block_cache is None:
            return 0
        built = 0
        for key in self.order:
            name = self._cache_name(key)
            if not self.block_cache.path(name).is_file():
                built += self.block_cache.put(name, self._dequantize(*key).numpy())
        return built

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

    def _cache_name(self, key: Key) -> str:
        return BlockCache.name(*key, (repr(self.layout), tuple(self.index[key])))

    def _build(self, layer: int, part: int) -> AttentionShard | MlpShard:
        """The torch shard of sync point (layer, part), from the block cache if it has it."""
        key, cache = (layer, part), self.block_cache
        if cache is None:
            return self._shard(key, self._dequantize(layer, part))
        name, flat = self._cache_name(key), torch.empty(self.block_bytes[key] // _F32)
        status, write_error = cache.get(name, flat.numpy()), False
        if status != "hit":                   # absent or damaged (deleted): dequantize and (re)write
            flat = self._dequantize(layer, part)
            write_error = not cache.put(name, flat.numpy())
        counter = {"hit": "cache_hits", "miss": "cache_misses", "damaged": "cache_rebuilds"}[status]
        with self._lock:
            self._cache_counts[counter] += 1
            self._cache_counts["cache_write_errors"] += write_error
        return self._shard(key, flat)

    def _dequantize(self, layer: int, part: int) -> torch.Tensor:
        """The flat float32 block of (layer, part) built from the weights (see :func:`flat_block`)."""
        flat = torch.from_numpy(flat_block(self.weights, self.layout, layer, part, self.index[(layer, part)],
                                           self._weights_lock))
        assert flat.numel() * _F32 == self.block_bytes[(layer, part)], "block size disagrees with the layout"
        return flat

    def _shard(self, key: Key, flat: torch.Tensor) -> AttentionShard | MlpShard:
        """An Attention/MlpShard whose matrices are views of ``flat`` (see :func:`flat_block`),
        set like their constructors set them but without the concatenation copies."""
        n, lay, d = len(self.index[key]), self.layout, self.layout.dim
        if key[1] == ATTN:
            att = AttentionShard.__new__(AttentionShard)
            q, kv = n * lay.q_per_kv * lay.head_dim, n * lay.head_dim
            att.n_groups, att.q_per_kv, att.head_dim, att.q_rows, att.kv_rows = n, lay.q_per_kv, lay.head_dim, q, kv
            att.wqkv, att.wo = flat[:(q + 2 * kv) * d].view(q + 2 * kv, d), flat[(q + 2 * kv) * d:].view(d, q)
            return att
        assert key[1] == MLP
        mlp, h = MlpShard.__new__(MlpShard), n * lay.mlp_group_size
        mlp.n_neurons, mlp.group_size = h, lay.mlp_group_size
        mlp.w13, mlp.w2 = flat[:2 * h * d].view(2 * h, d), flat[2 * h * d:].view(d, h)
        return mlp
