"""Projected TPOT of strict vs halo synchronization on a Raspberry Pi cluster (discrete-event simulation).

Simulates halo-p2p's protocol (halo_p2p.sim) on 8 Raspberry Pi 4B on 1 GbE, groups placed by the
load-balancing scheduler, for TinyLlama-1.1B and Llama-2-7B at PLR 0/1/2/5/10 % on every worker
link, next to HALO's reported 3.41x (Zheng et al., INFOCOM 2026, arXiv 2601.11676). Strict is
projected with the brief's transport (every lost packet waits for the RTO, 200 ms = Linux's
TCP_RTO_MIN) and with a Linux-like TCP (SACK fast retransmit, RACK-TLP). Assumptions and sources:
benchmarks/projection.md.

    python benchmarks/projection.py [--tokens 64] [--device rpi4b] [--out results/projection.json]
    python benchmarks/projection.py --sensitivity        # Llama-2-7B at 5 %: one assumption at a time
    python benchmarks/projection.py --calibrate-local [--measured results/tp_loss.json]
                                                         # the in-process SmolLM2 emulation, predicted
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from halo_p2p.groups import GroupId
from halo_p2p.plan import PlacementPlan
from halo_p2p.sim import (
    AIORTC_FRAME_CPU_S,
    SHAPES,
    SMOLLM2_135M,
    Cluster,
    Device,
    LinkModel,
    SimOptions,
    gbe_link,
    rpi4b,
    rpi5,
    simulate,
    uniform_cluster,
)

PAPER_SPEEDUP = 3.41   # HALO abstract: 8 Raspberry Pi, 5 % packet loss, vs strict synchronization
DEVICES = {"rpi4b": rpi4b, "rpi5": rpi5}


def run(shape_name: str, cluster: Cluster, mode: str, tokens: int, seed: int, **opts: object) -> dict:
    res = simulate(SHAPES[shape_name], cluster, SimOptions(mode=mode, tokens=tokens, seed=seed, **opts))  # type: ignore[arg-type]
    return res.as_dict()


def project(args: argparse.Namespace) -> dict:
    """The main table: per shape and PLR, strict (two transports) and halo."""
    rows = []
    for shape in args.shapes:
        for plr in args.plrs:
            t0 = time.perf_counter()
            row = {"shape": shape, "plr": plr}
            for key, link, mode in (("strict", gbe_link(plr), "strict"),
                                    ("strict_linux", gbe_link(plr, linux_tcp=True), "strict"),
                                    ("halo", gbe_link(plr), "halo")):
                cluster = uniform_cluster(DEVICES[args.device](), args.devices, link)
                row[key] = run(shape, cluster, mode, args.tokens, args.seed)
            row["speedup"] = row["strict"]["tpot_ms"] / row["halo"]["tpot_ms"]
            row["speedup_linux"] = row["strict_linux"]["tpot_ms"] / row["halo"]["tpot_ms"]
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{shape} PLR {plr:.0%}: done in {row['wall_s']:.1f} s", file=sys.stderr)
    return {"device": args.device, "devices": args.devices, "tokens": args.tokens, "seed": args.seed,
            "paper_speedup_plr5": PAPER_SPEEDUP, "rows": rows}


def table(res: dict) -> str:
    out = [f"{res['devices']} x {res['device']}, 1 GbE, {res['tokens']} tokens, seed {res['seed']} "
           f"(HALO paper at 5 %: {PAPER_SPEEDUP}x)", "",
           "| model | PLR | strict TPOT (ms), RTO per loss | halo TPOT (ms) | speedup | strict TPOT (ms), Linux TCP "
           "| speedup vs Linux TCP | halo skipped groups/token | halo lost importance | halo Resends/token |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        h = r["halo"]
        out.append(f"| {r['shape']} | {100 * r['plr']:g} % | {r['strict']['tpot_ms']:.1f} | {h['tpot_ms']:.1f} | "
                   f"{r['speedup']:.2f}x | {r['strict_linux']['tpot_ms']:.1f} | {r['speedup_linux']:.2f}x | "
                   f"{h['skipped_groups']:.1f} | {100 * h['lost_importance']:.2f} % | {h['resends']:.1f} |")
    return "\n".join(out)


def sensitivity(args: argparse.Namespace) -> dict:
    """Llama-2-7B at 5 % on 8 devices: change one assumption at a time."""
    base_dev, rows = rpi4b(), []
    aiortc = replace(base_dev, frame_cpu_s=AIORTC_FRAME_CPU_S)
    variants = [   # name, device, link, lossy workers (None: all), halo options
        ("baseline (RPi 4B, native stack, RTO 200 ms)", base_dev, gbe_link(0.05), None, {}),
        ("RTO 1 s (aiortc SCTP)", base_dev, gbe_link(0.05, rto_s=1.0), None, {}),
        ("RTO 20 ms", base_dev, gbe_link(0.05, rto_s=0.02), None, {}),
        ("RTO 5 ms", base_dev, gbe_link(0.05, rto_s=0.005), None, {}),
        ("Linux TCP (SACK + RACK-TLP)", base_dev, gbe_link(0.05, linux_tcp=True), None, {}),
        ("Raspberry Pi 5", rpi5(), gbe_link(0.05), None, {}),
        ("loss on 3 of 7 workers only", base_dev, gbe_link(0.05), [0, 1, 2], {}),
        ("critical fraction 0.25", base_dev, gbe_link(0.05), None, {"critical_fraction": 0.25}),
        ("critical fraction 1.0 (halo waits for all)", base_dev, gbe_link(0.05), None, {"critical_fraction": 1.0}),
        ("deadlines seeded by the scheduler", base_dev, gbe_link(0.05), None, {"initial_deadline_s": None}),
        ("aiortc per-frame CPU 90 us", aiortc, gbe_link(0.05), None, {}),
        ("aiortc per-frame CPU 90 us, deadlines seeded by the scheduler", aiortc, gbe_link(0.05), None,
         {"initial_deadline_s": None}),
    ]
    for name, dev, link, lossy, halo_opts in variants:
        cluster = uniform_cluster(dev, args.devices, link, lossy=lossy)
        s = run("llama2-7b", cluster, "strict", args.tokens, args.seed)
        h = run("llama2-7b", cluster, "halo", args.tokens, args.seed, **halo_opts)
        rows.append({"variant": name, "strict": s, "halo": h, "speedup": s["tpot_ms"] / h["tpot_ms"]})
        note = " (diverged: Resend storm)" if h["diverged"] else ""
        print(f"| {name} | {s['tpot_ms']:.1f} | {h['tpot_ms']:.1f}{note} | {s['tpot_ms'] / h['tpot_ms']:.2f}x | "
              f"{h['skipped_groups']:.1f} | {100 * h['lost_importance']:.2f} % | {h['resends']:.0f} |", flush=True)
    return {"sensitivity": rows}


# -- calibration against this machine -------------------------------------------------------------

class _RandomWeights:
    """Random float32 group weights of a shape (the GroupWeights protocol of GroupShard)."""

    def __init__(self, config, mlp_group_size: int) -> None:
        self.config, self.g, self._rng = config, mlp_group_size, np.random.default_rng(0)

    def group(self, gid: GroupId) -> dict[str, np.ndarray]:
        c, g = self.config, self.g
        width = c.q_per_kv * c.head_dim
        shapes = ({"wq": (width, c.dim), "wk": (c.head_dim, c.dim), "wv": (c.head_dim, c.dim), "wo": (c.dim, width)}
                  if gid.part == 0 else {"w1": (g, c.dim), "w3": (g, c.dim), "w2": (c.dim, g)})
        return {k: self._rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}


def measure_local(n_workers: int = 3, repeats: int = 60) -> dict[str, float]:
    """Per-sync-point compute (fixed + per parameter) and per-frame stack cost on this machine.

    Compute: ``GroupShard.partials`` of SmolLM2-shaped random weights on 4 compute threads at
    once (as the in-process emulation runs them on this machine's cores), for 1 and 3 attention
    groups and 6 and 24 MLP groups; seconds per parameter from the MLP points, a fixed part per
    sync point per part (least squares), plus one awaited ComputeThread hand-off (also the
    coordinator's trunk step per sync point). Frames: encode, send over a MemoryLink, receive and
    decode 1160-byte Partial frames on one event loop (send + receive). Frames and hand-off are
    timed while 4 threads compute partials, as the event loop competes with them in a decode step.
    """
    from concurrent.futures import ThreadPoolExecutor

    from halo_p2p.model.shard import GroupShard
    from halo_p2p.net.link import Channel
    from halo_p2p.net.memory import memory_link_pair
    from halo_p2p.wire import codec
    from halo_p2p.wire.messages import Partial

    layout = SMOLLM2_135M.layout()
    weights = _RandomWeights(SMOLLM2_135M.config(), layout.mlp_group_size)
    cases = [(0, [0]), (0, [0, 1, 2]), (1, list(range(6))), (1, list(range(24)))]   # (part, groups), layer 0
    shards = [GroupShard(weights, layout, [GroupId(0, part, i) for i in idx], max_seq_len=256) for part, idx in cases]
    x = np.random.default_rng(1).standard_normal((1, layout.dim)).astype(np.float32)

    def one(shard: GroupShard, part: int) -> float:
        t0 = time.perf_counter()
        for pos in range(repeats):
            shard.partials(0, part, x, pos)
        return (time.perf_counter() - t0) / repeats

    points = []
    with ThreadPoolExecutor(n_workers + 1) as pool:
        for shard, (part, idx) in zip(shards, cases, strict=True):
            times = list(pool.map(lambda _, s=shard, p=part: one(s, p), range(n_workers + 1)))
            points.append((part, len(idx) * layout.group_params(part), statistics.median(times)))
    fits = {part: np.polyfit([p for q, p, _ in points if q == part], [t for q, _, t in points if q == part], 1)
            for part in (0, 1)}
    slope = fits[1][0]             # MLP groups hold most parameters; attention's extra cost is fixed

    async def frames(n: int = 3000) -> float:
        a, b = memory_link_pair("c", "w", seed=0)
        frame = codec.encode(Partial(session=1, step=5, layer=1, part=1, group=2, offset=0,
                                     data=np.zeros(563, np.float16)))
        t0 = time.perf_counter()
        for _ in range(n):
            await b.send(Channel.UNRELIABLE, codec.encode(codec.decode(frame)))
        for _ in range(n):
            _, data = await a.recv()
            codec.decode(data)
        elapsed = (time.perf_counter() - t0) / n
        await a.aclose()
        await b.aclose()
        return elapsed

    async def handoff(n: int = 300) -> float:
        """One RMSNorm on a ComputeThread, awaited: the coordinator's trunk step per sync point."""
        import torch

        from halo_p2p.engine.compute import ComputeThread
        from halo_p2p.model.llama import rms_norm

        thread, gain = ComputeThread("calibrate"), torch.ones(layout.dim)
        t0 = time.perf_counter()
        for _ in range(n):
            await thread.run(lambda: rms_norm(torch.from_numpy(x), gain, 1e-5).numpy())
        elapsed = (time.perf_counter() - t0) / n
        thread.close()
        return elapsed

    # the event loop shares the cores (and the GIL) with the peers' compute threads: measure the
    # frames and the hand-off while 4 threads compute partials, as during a decode step
    import threading

    stop = threading.Event()

    def busy(shard: GroupShard) -> None:
        pos = 0
        while not stop.is_set():
            shard.partials(0, 1, x, pos)
            pos += 1

    with ThreadPoolExecutor(n_workers + 1) as pool:
        for _ in range(n_workers + 1):
            pool.submit(busy, shards[2])
        try:
            per_frame, hop = asyncio.run(frames()), asyncio.run(handoff())
        finally:
            stop.set()
    overhead = tuple(hop + max(0.0, float(fits[part][1] + (fits[part][0] - slope) * np.mean(
        [p for q, p, _ in points if q == part]))) for part in (0, 1))
    return {"seconds_per_param": max(float(slope), 1e-12), "sync_overhead_s": overhead,
            "frame_cpu_s": per_frame, "trunk_s": hop, "points": points}


def calibrate_local(args: argparse.Namespace) -> dict:
    """Predict benchmarks/tp_loss.py's setup: SmolLM2-135M, coordinator + 3 workers in one process,
    equal split, 2 ms one way, the third worker's link at the PLR; compare with results/tp_loss*.json."""
    m = measure_local()
    print(f"measured (params, s): {m['points']}", file=sys.stderr)
    print(f"measured: {1e12 * m['seconds_per_param']:.2f} ps/param, "
          f"{', '.join(f'{1e6 * o:.0f}' for o in m['sync_overhead_s'])} us per attention, MLP sync point, "
          f"{1e6 * m['frame_cpu_s']:.1f} us per frame (send + receive), {1e6 * m['trunk_s']:.0f} us trunk "
          "hand-off", file=sys.stderr)
    dev = Device("this-machine", m["seconds_per_param"], 1 << 40, frame_cpu_s=m["frame_cpu_s"] / 2,
                 sync_overhead_s=m["sync_overhead_s"])
    layout = SMOLLM2_135M.layout()
    plan = PlacementPlan.split(layout, ["c", "w01", "w02", "w03"])
    measured = {}
    pattern = args.measured or str(Path(__file__).resolve().parents[1] / "results/tp_loss*.json")
    for path in sorted(glob.glob(pattern)):
        for r in json.loads(Path(path).read_text()).get("runs", []):
            measured[(r["plr"], r["mode"])] = (r["tpot_ms"], Path(path).name)
    rows = []
    print("| PLR | mode | simulated TPOT (ms) | measured TPOT (ms) | sim skipped/token | sim Resends/token |")
    print("|---|---|---|---|---|---|")
    for plr in args.local_plrs:
        for mode in ("strict", "halo"):
            link = LinkModel(one_way_s=0.002, bandwidth_bytes_per_s=None, jitter_s=0.0, rto_s=0.2, overhead_bytes=0)
            cluster = Cluster(dev, (dev,) * 3, (link, link, replace(link, plr=plr)), shared_stack=True,
                              stack_per_message=True, trunk_s=m["trunk_s"])
            res = simulate(SMOLLM2_135M, cluster, SimOptions(mode=mode, tokens=args.tokens, seed=args.seed,
                                                             initial_deadline_s=0.5), plan=plan).as_dict()
            meas = measured.get((plr, mode))
            rows.append({"plr": plr, "mode": mode, "sim": res, "measured_tpot_ms": meas[0] if meas else None})
            shown = f"{meas[0]:.1f} ({meas[1]})" if meas else "-"
            print(f"| {100 * plr:g} % | {mode} | {res['tpot_ms']:.1f} | {shown} | {res['skipped_groups']:.2f} "
                  f"| {res['resends']:.2f} |")
    return {"measured_costs": {k: v for k, v in m.items() if k != "points"}, "points": m["points"], "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["tinyllama-1.1b", "llama2-7b"])
    p.add_argument("--plrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.01, 0.02, 0.05, 0.1])
    p.add_argument("--local-plrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.01, 0.05, 0.1])
    p.add_argument("--device", choices=sorted(DEVICES), default="rpi4b")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sensitivity", action="store_true", help="Llama-2-7B at 5 %%, one assumption at a time")
    p.add_argument("--calibrate-local", action="store_true", help="predict the in-process SmolLM2 emulation")
    p.add_argument("--measured", help="tp_loss.py JSON to compare with (default: results/tp_loss*.json)")
    p.add_argument("--out", type=Path, default=Path("results/projection.json"))
    args = p.parse_args()
    if args.calibrate_local:
        res = calibrate_local(args)
    elif args.sensitivity:
        print("| variant | strict TPOT (ms) | halo TPOT (ms) | speedup | halo skipped/token | halo lost importance "
              "| halo Resends/token |")
        print("|---|---|---|---|---|---|---|")
        res = sensitivity(args)
    else:
        res = project(args)
        print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
