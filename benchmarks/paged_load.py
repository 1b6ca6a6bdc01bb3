"""Paged neuron-group weights (HALO load/compute pipeline) on SmolLM2-135M Q4_1.

Decodes ``--tokens`` tokens through a loop calling ``partials`` for every sync point of the
shard in order (random but fixed ``(1, dim)`` inputs, ``start_pos`` = token index), after one
warm-up token that is not measured. Cases, each in its own process so peak RSS is its own:

* ``w1-*``: a worker holding 1/4 of the groups (``PlacementPlan.split(layout, [c, w1, w2, w3])``,
  w1's groups); the paged budget is 40 % of the FULL model's float32 projection bytes, which is
  more than w1's share, so after the first pass every block stays resident.
* ``all-*``: one peer holding every group with a budget of 40 % of them (the hard case), paged
  with prefetch 2 and the furthest-next-use policy, with LRU, and without prefetch.
* ``*-cached``: the same with a block cache (``PagedShard(block_cache=...)``): a fresh cache
  folder (under ``--cache-root``, default the system temporary folder; deleted afterwards) is
  filled by :meth:`PagedShard.warm` before the clock starts (``warm_s``), so every load copies a
  float32 block from the cache file (``readinto``; ``-mmap``: memory-mapped, then ``np.copyto``)
  instead of dequantizing Q4_1; ``-prefetch4`` loads 4 sync points ahead instead of 2.

``resident`` rows use :class:`GroupShard` (everything loaded up front). ``checksum`` (float64
sum of every partial) must match between a case's resident and paged rows: they are exact.

    python benchmarks/paged_load.py [--model PATH] [--tokens 32] [--budget 0.4] [--threads 1]
                                    [--cases all-resident all-paged ...] [--cache-root DIR] [--no-probe]

``--threads`` sets OMP/MKL threads of torch in the case processes (default 1: on this
2-core shared box, 2 OpenMP threads under contention cost ~20x per small matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from halo_p2p.groups import GroupLayout
from halo_p2p.model.block_cache import BlockCache, source_key
from halo_p2p.model.gguf import GgufModel
from halo_p2p.model.paged import PagedShard
from halo_p2p.model.shard import GroupShard
from halo_p2p.plan import PlacementPlan

MODEL = "/work/shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
CASES = {  # name: (groups, shard kind, prefetch, policy, block cache read mode or None)
    "w1-resident": ("w1", "resident", 0, "-", None),
    "w1-paged": ("w1", "paged", 2, "furthest", None),
    "all-resident": ("all", "resident", 0, "-", None),
    "all-paged": ("all", "paged", 2, "furthest", None),
    "all-paged-lru": ("all", "paged", 2, "lru", None),
    "all-paged-noprefetch": ("all", "paged", 0, "furthest", None),
    "all-paged-cached": ("all", "paged", 2, "furthest", "file"),
    "all-paged-cached-mmap": ("all", "paged", 2, "furthest", "mmap"),
    "all-paged-cached-prefetch4": ("all", "paged", 4, "furthest", "file"),
    "all-paged-cached-noprefetch": ("all", "paged", 0, "furthest", "file"),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(name: str, args: argparse.Namespace) -> dict:
    which, kind, prefetch, policy, cached = CASES[name]
    source = GgufModel.open(args.model)
    layout = GroupLayout.from_config(source.config)
    everything = layout.all_groups()
    full_bytes = sum(layout.group_params(g.part) * 4 for g in everything)
    groups = everything if which == "all" else PlacementPlan.split(layout, ["c", "w1", "w2", "w3"]).groups_of("w1")
    share_bytes = sum(layout.group_params(g.part) * 4 for g in groups)
    budget = int(args.budget * (full_bytes if which == "w1" else share_bytes))
    rss0 = _rss_mb()
    root = cache = None
    if cached:
        root = Path(tempfile.mkdtemp(prefix="paged-cache-", dir=args.cache_root))
        cache = BlockCache(root, source_key(source), read=cached)
    t0 = time.perf_counter()
    if kind == "resident":
        shard = GroupShard(source, layout, groups, max_seq_len=args.tokens + 8)
    else:
        shard = PagedShard(source, layout, groups, max_seq_len=args.tokens + 8, memory_budget_bytes=budget,
                           prefetch_layers=prefetch, policy=policy, block_cache=cache)
    build_s = time.perf_counter() - t0
    warm_s = None
    if root is not None:
        t0 = time.perf_counter()
        shard.warm()                                        # fill the cache: every block dequantized once
        warm_s = time.perf_counter() - t0
    points = sorted({(g.layer, g.part) for g in groups})
    rng = np.random.default_rng(0)
    inputs = {p: rng.standard_normal((1, layout.dim)).astype(np.float32) for p in points}
    checksum, per_token = 0.0, []
    for pos in range(args.tokens + 1):                      # token 0 warms up (first loads)
        t = time.perf_counter()
        for layer, part in points:
            out = shard.partials(layer, part, inputs[(layer, part)] * (1 + 0.01 * pos), pos)
            checksum += float(out.sum(dtype=np.float64))
        dt = time.perf_counter() - t
        if pos == 0:
            first_s = dt
            if kind == "paged":
                shard.reset_stats()
        else:
            per_token.append(dt)
    row = {"case": name, "groups": len(groups), "sync_points": len(points), "share_mb": share_bytes / 2**20,
           "full_mb": full_bytes / 2**20, "build_s": build_s, "first_token_s": first_s,
           "token_ms_mean": 1e3 * float(np.mean(per_token)), "token_ms_median": 1e3 * float(np.median(per_token)),
           "checksum": checksum, "rss_before_mb": rss0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "weight_mb": shard.weight_bytes() / 2**20, "budget_mb": budget / 2**20 if kind == "paged" else None,
           "warm_s": warm_s}
    if kind == "paged":
        s = shard.stats()
        row |= {k: s[k] for k in ("load_s_total", "wait_s_total", "compute_s_total", "hidden_fraction", "loads",
                                  "prefetch_loads", "inline_loads", "hits", "evictions", "cache_hits",
                                  "cache_misses", "cache_rebuilds")}
        row["peak_resident_mb"] = s["peak_resident_bytes"] / 2**20
        row["kv_mb"] = s["kv_bytes"] / 2**20
        row["hidden_bound"] = min(1.0, s["compute_s_total"] / s["load_s_total"]) if s["load_s_total"] else 1.0
        row["load_ms_per_block"] = 1e3 * s["load_s_total"] / max(1, s["loads"])
        shard.close()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    return row


def overlap_probe(args: argparse.Namespace) -> dict:
    """How far block loading (numpy dequantization) and torch compute overlap, in two threads of
    one process (sharing the GIL) and in two processes (sharing only the CPUs)."""
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    source = GgufModel.open(args.model)
    layout = GroupLayout.from_config(source.config)
    groups = [g for g in layout.all_groups() if g.layer < 4]
    shard = GroupShard(source, layout, groups, max_seq_len=64)
    x = np.ones((1, layout.dim), np.float32)
    points = sorted({(g.layer, g.part) for g in groups})

    def compute(reps: int) -> float:
        t = time.perf_counter()
        for i in range(reps):
            for p in points:
                shard.partials(*p, x, i % 32)
        return time.perf_counter() - t

    load(source), compute(2)                                # warm caches
    reps = max(1, round(load(source) / (compute(4) / 4)))  # compute about as long as one load pass
    ctx = mp.get_context("fork")                          # the child runs numpy only, no torch

    def in_child() -> tuple[Callable[[], object], Callable[[], object]]:
        go, q = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=lambda: (go.wait(), q.put(load(source))))
        proc.start()                                      # forked before the clock starts
        time.sleep(0.3)
        return go.set, lambda: (q.get(), proc.join())

    rounds: dict[str, list[float]] = {"load_s": [], "compute_s": [], "thread_overlap": [], "process_overlap": []}
    with ThreadPoolExecutor(1) as pool:
        def in_thread() -> tuple[Callable[[], object], Callable[[], object]]:
            fut: list = []
            return lambda: fut.append(pool.submit(load, source)), lambda: fut[0].result()

        for _ in range(args.probe_rounds):                # interleaved: the box's load drifts
            t_load, t_comp = load(source), compute(reps)
            both = {"thread": _concurrently(in_thread(), compute, reps),
                    "process": _concurrently(in_child(), compute, reps)}
            rounds["load_s"].append(t_load)
            rounds["compute_s"].append(t_comp)
            for mode, t in both.items():
                rounds[f"{mode}_overlap"].append((t_load + t_comp - t) / min(t_load, t_comp))
    return {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in rounds.items()}


def load(source: GgufModel) -> float:
    """Dequantize every projection of layers 0-3 (what paging the whole layers loads)."""
    t = time.perf_counter()
    for layer in range(4):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            source.load(f"layers.{layer}.{name}")
    return time.perf_counter() - t


def _concurrently(load_job: tuple[Callable[[], object], Callable[[], object]], compute: Callable[[int], float],
                  reps: int) -> float:
    """Wall time of a background load (``load_job`` = (start, join)) beside ``reps`` compute passes."""
    start, join = load_job
    t = time.perf_counter()
    start()
    compute(reps)
    join()
    return time.perf_counter() - t


def _table(rows: list[dict]) -> str:
    head = ("| case | groups (MB fp32) | budget MB | first token s | ms/token (mean / median) | load s | wait s "
            "| hidden | bound | loads (prefetch/inline) | load ms/block | cache hits | hits | peak resident MB | KV MB "
            "| peak RSS MB | checksum |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        paged = "load_s_total" in r

        def f(key: str, fmt: str, r: dict = r, paged: bool = paged) -> str:
            return format(r[key], fmt) if paged else "-"

        loads = f"{r['loads']} ({r['prefetch_loads']}/{r['inline_loads']})" if paged else "-"
        lines.append(
            f"| {r['case']} | {r['groups']} ({r['share_mb']:.0f}) | {f('budget_mb', '.0f')} | {r['first_token_s']:.2f} "
            f"| {r['token_ms_mean']:.1f} / {r['token_ms_median']:.1f} | {f('load_s_total', '.2f')} "
            f"| {f('wait_s_total', '.2f')} | {f('hidden_fraction', '.3f')} | {f('hidden_bound', '.3f')} "
            f"| {loads} | {f('load_ms_per_block', '.1f')} | {f('cache_hits', 'd')} | {f('hits', 'd')} "
            f"| {f('peak_resident_mb', '.1f')} | {f('kv_mb', '.1f')} "
            f"| {r['peak_rss_mb']:.0f} | {r['checksum']:.6e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.4, help="budget as a fraction (see the module docstring)")
    p.add_argument("--threads", type=int, default=1, help="torch OMP/MKL threads per case process")
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--case", help=argparse.SUPPRESS)        # run one case and print its JSON row
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-rounds", type=int, default=9)
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--cache-root", type=Path, help="folder for the *-cached cases' temporary block caches")
    p.add_argument("--no-probe", action="store_true", help="skip the load/compute overlap probe")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    if args.probe:
        print(json.dumps(overlap_probe(args)))
        return
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    base = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens), "--budget", str(args.budget),
            "--probe-rounds", str(args.probe_rounds)]
    if args.cache_root:
        base += ["--cache-root", str(args.cache_root)]
    rows = []
    for name in args.cases:
        out = subprocess.run([*base, "--case", name], env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['token_ms_mean']:.1f} ms/token", file=sys.stderr)
    print(_table(rows))
    for r in rows:
        if r.get("warm_s") is not None:
            print(f"{r['case']}: cache filled by warm() in {r['warm_s']:.2f} s before the measurement")
    probe = None
    if args.no_probe:
        if args.out:
            args.out.write_text(json.dumps({"rows": rows, "probe": probe, "threads": args.threads}, indent=2))
        return
    probe = json.loads(subprocess.run([*base, "--probe"], env=env, check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
    pr = {k: f"{v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]" for k, v in probe.items()}
    print(f"\noverlap probe (layers 0-3, {args.probe_rounds} rounds, median [min, max], {args.threads} torch "
          f"thread(s)): load alone {pr['load_s']} s, compute alone {pr['compute_s']} s; overlap (fraction of the "
          f"shorter hidden) in two threads {pr['thread_overlap']}, in two processes {pr['process_overlap']}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "probe": probe, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
