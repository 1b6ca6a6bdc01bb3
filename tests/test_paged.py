"""PagedShard: GroupShard's partials under a memory budget, with weights loaded in the background."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from halo_p2p.errors import ConfigError, ModelFormatError
from halo_p2p.groups import ATTN, MLP, PARTS, GroupId, GroupLayout
from halo_p2p.model.block_cache import BlockCache, source_key
from halo_p2p.model.llama2c import Llama2cModel
from halo_p2p.model.paged import PagedShard
from halo_p2p.model.registry import resolve
from halo_p2p.model.shard import GroupShard, SliceWeights

SEQ = 32


@pytest.fixture(scope="module")
def source():
    return Llama2cModel.open(resolve("stories260K").path)


@pytest.fixture(scope="module")
def layout(source):
    return GroupLayout.from_config(source.config)


def _steps(decode: int = 4):
    """(start_pos, T) of a short generation: a 3-token prefill, then ``decode`` one-token steps."""
    return [(0, 3), *[(p, 1) for p in range(3, 3 + decode)]]


def _run(shard, layout, seed=0, check=None, decode=4):
    """Every sync point in order for every step; returns the list of partials."""
    rng = np.random.default_rng(seed)
    out = []
    for start, t in _steps(decode):
        for layer in range(layout.n_layers):
            for part in PARTS:
                x = rng.standard_normal((t, layout.dim)).astype(np.float32)
                out.append(shard.partials(layer, part, x, start))
                if check is not None:
                    check(shard)
    return out


def _non_contiguous(layout):
    return [g for g in layout.all_groups() if g.index != 1 and (g.layer + g.index) % 5 != 0]


@pytest.mark.parametrize(("which", "policy"), [("all", "furthest"), ("subset", "lru")])
def test_partials_equal_group_shard_under_40_percent_budget(source, layout, which, policy) -> None:
    groups = layout.all_groups() if which == "all" else _non_contiguous(layout)
    ref = GroupShard(source, layout, groups, max_seq_len=SEQ)
    budget = int(0.4 * ref.weight_bytes())
    seen = []

    def check(shard):
        s = shard.stats()
        seen.append(s["resident_bytes"])
        assert shard.weight_bytes() <= budget
        assert s["peak_resident_bytes"] <= budget

    with PagedShard(source, layout, groups, max_seq_len=SEQ, memory_budget_bytes=budget, policy=policy) as paged:
        got = _run(paged, layout, check=check)
        stats = paged.stats()
    want = _run(ref, layout)
    assert len(got) == len(want) == len(_steps()) * layout.n_layers * len(PARTS)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == np.float32 and g.shape == w.shape, i
        np.testing.assert_array_equal(g, w, err_msg=f"call {i}")
    for layer in range(layout.n_layers):
        for part in PARTS:
            assert paged.groups_at(layer, part) == ref.groups_at(layer, part)
    # the budget really forced paging: blocks were evicted and loaded again
    assert stats["evictions"] > 0
    assert stats["loads"] > len(paged.order) * 2
    assert max(seen) <= budget


def test_group_weights_source_equals_group_shard(source, layout) -> None:
    groups = _non_contiguous(layout)
    ref = GroupShard(source, layout, groups, max_seq_len=SEQ)
    with PagedShard(SliceWeights(source, layout), layout, groups, max_seq_len=SEQ,
                    memory_budget_bytes=ref.weight_bytes() // 2) as paged:
        got = _run(paged, layout, seed=1, decode=1)
    for g, w in zip(got, _run(ref, layout, seed=1, decode=1), strict=True):
        np.testing.assert_array_equal(g, w)


def test_too_small_budget_names_the_minimum(source, layout) -> None:
    largest = layout.group_params(MLP) * layout.n_mlp * 4    # one layer's whole MLP block, float32
    assert largest > layout.group_params(ATTN) * layout.n_attn * 4
    with pytest.raises(ConfigError, match=rf"at least {largest} bytes"):
        PagedShard(source, layout, layout.all_groups(), max_seq_len=SEQ, memory_budget_bytes=largest - 1)
    # exactly one block fits: still runs, never above the budget, equal results
    ref = GroupShard(source, layout, layout.all_groups(), max_seq_len=SEQ)
    with PagedShard(source, layout, layout.all_groups(), max_seq_len=SEQ, memory_budget_bytes=largest) as paged:
        rng = np.random.default_rng(2)
        for layer in range(layout.n_layers):
            for part in PARTS:
                x = rng.standard_normal((1, layout.dim)).astype(np.float32)
                np.testing.assert_array_equal(paged.partials(layer, part, x, 0), ref.partials(layer, part, x, 0))
                assert paged.stats()["peak_resident_bytes"] <= largest


def test_generous_budget_keeps_everything_after_first_pass(source, layout) -> None:
    groups = layout.all_groups()
    ref = GroupShard(source, layout, groups, max_seq_len=SEQ)
    n_blocks = layout.n_layers * len(PARTS)
    with PagedShard(source, layout, groups, max_seq_len=SEQ, memory_budget_bytes=10 * ref.weight_bytes()) as paged:
        assert paged.weight_bytes() == 0                       # nothing loaded before the first call
        x = np.ones((1, layout.dim), np.float32)
        for layer in range(layout.n_layers):
            for part in PARTS:
                paged.partials(layer, part, x, 0)
        first = paged.stats()
        assert first["loads"] == n_blocks
        assert first["inline_loads"] == 1                       # only the very first block was not prefetched
        assert paged.weight_bytes() == ref.weight_bytes()
        for layer in range(layout.n_layers):
            for part in PARTS:
                paged.partials(layer, part, x, 1)
        second = paged.stats()
    assert second["loads"] == n_blocks
    assert second["evictions"] == 0
    assert second["hits"] - first["hits"] == n_blocks
    assert second["kv_bytes"] > 0 and second["resident_bytes"] == ref.weight_bytes()


def test_without_prefetch_every_load_is_inline(source, layout) -> None:
    groups = layout.all_groups()
    with PagedShard(source, layout, groups, max_seq_len=SEQ, memory_budget_bytes=1 << 30,
                    prefetch_layers=0) as paged:
        _run(paged, layout, decode=1)
        s = paged.stats()
    assert s["prefetch_loads"] == 0 and s["inline_loads"] == layout.n_layers * len(PARTS)
    assert s["wait_s_total"] >= s["load_s_total"] > 0                # nothing hidden
    assert s["hidden_fraction"] <= 0


def test_furthest_policy_loads_less_than_lru_on_cyclic_order(source, layout) -> None:
    groups = layout.all_groups()
    budget = int(0.7 * GroupShard(source, layout, groups, max_seq_len=SEQ).weight_bytes())
    loads = {}
    for policy in ("furthest", "lru"):
        with PagedShard(source, layout, groups, max_seq_len=SEQ, memory_budget_bytes=budget, policy=policy) as paged:
            _run(paged, layout, decode=2)
            loads[policy] = paged.stats()["loads"]
    assert loads["furthest"] < loads["lru"]


class _Failing:
    """A source whose layer-2 tensors cannot be read."""

    def __init__(self, source):
        self.source = source
        self.config = source.config

    def load(self, name, rows=None):
        if name.startswith("layers.2."):
            raise ModelFormatError(f"cannot read {name}")
        return self.source.load(name, rows)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_load_errors_surface_from_partials(source, layout, prefetch) -> None:
    with PagedShard(_Failing(source), layout, [GroupId(layer, MLP, 0) for layer in range(4)], max_seq_len=SEQ,
                    memory_budget_bytes=1 << 20, prefetch_layers=prefetch) as paged:
        x = np.ones((1, layout.dim), np.float32)
        paged.partials(0, MLP, x, 0)
        paged.partials(1, MLP, x, 0)
        with pytest.raises(ModelFormatError, match=r"layers\.2\.w"):
            paged.partials(2, MLP, x, 0)
        assert paged.partials(3, MLP, x, 0).shape == (1, 1, layout.dim)   # the shard still works
        assert paged.stats()["resident_bytes"] == 3 * layout.group_params(MLP) * 4


def _exact(got, want) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == np.float32 and g.shape == w.shape, i
        np.testing.assert_array_equal(g, w, err_msg=f"call {i}")


@pytest.mark.parametrize("weights", ["file", "slices"])
def test_block_cache_is_exact_and_read_by_the_next_shard(source, layout, tmp_path, weights) -> None:
    groups = _non_contiguous(layout)
    ref = GroupShard(source, layout, groups, max_seq_len=SEQ)
    want = _run(ref, layout)
    budget = int(0.4 * ref.weight_bytes())
    w = source if weights == "file" else SliceWeights(source, layout)
    runs = []
    for _ in range(2):                                  # the second shard finds every block on disk
        with PagedShard(w, layout, groups, max_seq_len=SEQ, memory_budget_bytes=budget, block_cache=tmp_path) as paged:
            _exact(_run(paged, layout), want)
            runs.append(paged.stats())
            n_blocks = len(paged.order)
    first, second = runs
    files = sorted((tmp_path / "blocks" / source_key(w)[:16]).glob("*.npy"))
    assert len(files) == n_blocks
    assert sum(f.stat().st_size for f in files) >= ref.weight_bytes()       # float32 blocks plus .npy headers
    # "loads" counts prefetches when scheduled; up to prefetch_layers=2 may not have run yet
    assert first["cache_misses"] == n_blocks and 0 < first["loads"] - 2 <= first["cache_hits"] + n_blocks
    assert first["cache_hits"] + n_blocks <= first["loads"]
    assert second["cache_misses"] == 0 and 0 < second["loads"] - 2 <= second["cache_hits"] <= second["loads"]
    for s in runs:
        assert s["cache_rebuilds"] == s["cache_write_errors"] == 0 and s["evictions"] > 0
        assert s["peak_resident_bytes"] <= budget
    # another set of groups never reads these blocks (the file name covers the indices)
    with PagedShard(w, layout, layout.all_groups(), max_seq_len=SEQ, memory_budget_bytes=budget,
                    block_cache=tmp_path) as other:
        _run(other, layout, decode=0)
        assert other.stats()["cache_misses"] == len(other.order)


@pytest.mark.parametrize("read", ["file", "mmap"])
def test_damaged_cache_files_are_rebuilt(source, layout, tmp_path, caplog, read) -> None:
    groups = layout.all_groups()
    ref = GroupShard(source, layout, groups, max_seq_len=SEQ)
    cache = BlockCache(tmp_path, "0123456789abcdef-test", read=read)
    kw = {"max_seq_len": SEQ, "memory_budget_bytes": int(0.4 * ref.weight_bytes()), "block_cache": cache}
    with PagedShard(source, layout, groups, **kw) as paged:
        assert paged.warm() == len(paged.order)
        assert paged.warm() == 0                                  # nothing missing any more
        assert paged.stats()["loads"] == 0 and paged.weight_bytes() == 0
    files = sorted(cache.folder.glob("*.npy"))
    sizes = {f: f.stat().st_size for f in files}
    truncated, garbage, empty = files[0], files[1], files[2]
    with open(truncated, "r+b") as f:
        f.truncate(sizes[truncated] // 2)
    garbage.write_bytes(b"not a numpy file at all")
    empty.write_bytes(b"")
    np.save(files[3], np.zeros(7, np.float32))                   # a valid .npy of the wrong length
    with caplog.at_level(logging.WARNING, logger="halo_p2p.model.block_cache"), \
            PagedShard(source, layout, groups, **kw) as paged:
        _exact(_run(paged, layout), _run(ref, layout))
        s = paged.stats()
    assert s["cache_rebuilds"] == 4 and s["cache_misses"] == 0
    assert s["loads"] - 2 <= s["cache_hits"] + 4 <= s["loads"]
    assert sum("deleting it" in r.message for r in caplog.records) == 4
    assert {f: f.stat().st_size for f in files} == sizes                # rewritten whole
    assert not list(cache.folder.glob(".*.tmp"))


def test_unwritable_cache_still_computes(source, layout, tmp_path) -> None:
    (tmp_path / "blocks").write_text("a file where the cache folder should be")
    groups = [GroupId(layer, MLP, 0) for layer in range(layout.n_layers)]
    ref = GroupShard(source, layout, groups, max_seq_len=SEQ)
    with PagedShard(source, layout, groups, max_seq_len=SEQ, memory_budget_bytes=ref.weight_bytes() // 2,
                    block_cache=tmp_path) as paged:
        _exact(_run(paged, layout, decode=1), _run(ref, layout, decode=1))
        s = paged.stats()
    assert s["cache_write_errors"] == s["cache_misses"] > 0 and s["cache_hits"] == 0


def test_cache_root_needs_a_source_with_identity(source, layout, tmp_path) -> None:
    class Anonymous:
        config = source.config

        def load(self, name, rows=None):
            return source.load(name, rows)

    with pytest.raises(ConfigError, match="block-cache key"):
        PagedShard(Anonymous(), layout, layout.all_groups(), max_seq_len=SEQ, memory_budget_bytes=1 << 30,
                   block_cache=tmp_path)


def test_library_pages_through_the_user_block_cache(source, layout, tmp_path, monkeypatch) -> None:
    from halo_p2p.node.library import ModelLibrary
    from halo_p2p.plan import PlacementPlan, PlanBody

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = ModelLibrary(["stories260K"], memory_budget_bytes=4 * layout.group_params(MLP) * layout.n_mlp * 2)
    sha = next(iter(library.held))
    body = PlanBody(placement=PlacementPlan.split(layout, ["c", "w"]), config=source.config, max_seq_len=SEQ)
    plan_layout, factory = library.open_for_plan(sha, body)
    assert plan_layout == body.layout
    counts = []
    for _ in range(2):
        with factory(plan_layout.all_groups(), SEQ) as shard:
            assert isinstance(shard, PagedShard)
            _run(shard, plan_layout, decode=0)
            counts.append((shard.stats()["cache_misses"], len(shard.order)))
    assert counts[0][0] == counts[0][1] and counts[1][0] == 0
    assert len(list((tmp_path / "halo-p2p" / "blocks" / sha[:16]).glob("*.npy"))) == counts[0][1]


@pytest.mark.parametrize("kind", ["group", "paged"])
def test_answer_rows_sum_the_partials_and_one_row_skips_forming_them(source, layout, kind) -> None:
    """``answer`` (a worker's reply): each row is the sum of its groups' partials, any subset of
    the held groups, with their norms on request; GroupShard and PagedShard agree."""
    groups = [g for g in layout.all_groups() if g.index % 2 == 0 or g.part == ATTN]
    make = {"group": lambda: GroupShard(source, layout, groups, max_seq_len=16),
            "paged": lambda: PagedShard(source, layout, groups, max_seq_len=16, memory_budget_bytes=1 << 30)}
    shard, ref = make[kind](), GroupShard(source, layout, groups, max_seq_len=16)
    rng = np.random.default_rng(4)
    for pos in range(3):
        for layer in range(layout.n_layers):
            for part in PARTS:
                x = rng.standard_normal((1, layout.dim)).astype(np.float32)
                held = shard.groups_at(layer, part)
                p = ref.partials(layer, part, x, pos)                       # keeps ref's KV cache in step too
                rows = [held[::2], held[1::2]] if len(held) > 1 else [held]
                got, norms = shard.answer(layer, part, x, pos, [r for r in rows if r], norms=True)
                want = np.stack([p[[held.index(g) for g in r]].sum(axis=0) for r in rows if r])
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                flat = [held.index(g) for r in rows for g in r]
                np.testing.assert_allclose(norms, np.linalg.norm(p[flat].reshape(len(flat), -1), axis=1), rtol=1e-5)
                one, none = shard.answer(layer, part, x, pos, [held[1:]], norms=False) if len(held) > 1 else (None, 0)
                if one is not None:                                        # one row of a subset: dense, masked
                    assert none is None
                    np.testing.assert_allclose(one[0], p[1:].sum(axis=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError):
        shard.answer(0, MLP, np.zeros((1, layout.dim), np.float32), 3, [[1]], norms=False)   # an odd group: not held


@pytest.mark.parametrize("kind", ["group", "paged"])
def test_reset_forgets_the_sequence_so_a_gap_is_masked_not_attended(source, layout, kind) -> None:
    """After ``reset`` (the wire ``Reset``), a position after a gap attends to nothing of the
    earlier sequence: the answer equals a fresh shard's; without it the old keys leak in."""
    groups = [g for g in layout.all_groups() if g.part == ATTN]
    make = {"group": lambda: GroupShard(source, layout, groups, max_seq_len=16),
            "paged": lambda: PagedShard(source, layout, groups, max_seq_len=16, memory_budget_bytes=1 << 30)}
    rng = np.random.default_rng(5)
    old, x = (rng.standard_normal((n, layout.dim)).astype(np.float32) for n in (4, 1))
    fresh = make[kind]().partials(0, ATTN, x, 4)                   # positions 0..3 never arrived: masked
    used, reset = make[kind](), make[kind]()
    for shard in (used, reset):
        shard.partials(0, ATTN, old, 0)                            # an earlier sequence wrote positions 0..3
    reset.reset()
    np.testing.assert_array_equal(reset.partials(0, ATTN, x, 4), fresh)
    assert not np.allclose(used.partials(0, ATTN, x, 4), fresh)    # the old keys would be attended


def test_group_weights_have_the_layouts_tensor_shapes(source, layout) -> None:
    """What a coordinator streams (``GroupWeights.group``) is what a worker expects (``GroupLayout.tensor_shapes``)."""
    weights = SliceWeights(source, layout)
    for part in PARTS:
        got = weights.group(GroupId(0, part, 1))
        assert {n: a.shape for n, a in got.items()} == layout.tensor_shapes(part)
