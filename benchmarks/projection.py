"""Projected TPOT of strict vs halo synchronization on a Raspberry Pi cluster (discrete-event simulation).

Simulates halo-p2p's wire protocol 2 (halo_p2p.testbed.sim) on 8 Raspberry Pi 4B on 1 GbE, with the CPU
of halo-p2p's own Python network stack (measured here, scaled to a Pi core), groups placed by the
load-balancing scheduler as the node places them, for TinyLlama-1.1B and Llama-2-7B at PLR
0/1/5/10 % on every worker link, next to HALO's reported 3.41x (Zheng et al., INFOCOM 2026,
arXiv 2601.11676). Modes: strict with the brief's transport (every lost packet waits for the
RTO, 200 ms = Linux's TCP_RTO_MIN), strict with a Linux-like TCP (SACK fast retransmit,
RACK-TLP), strict-unreliable (FEC, deadlines and Resend, every group critical) and halo.
Assumptions and sources: benchmarks/projection.md.

    python benchmarks/projection.py [--tokens 64] [--device rpi4b] [--out results/projection.json]
    python benchmarks/projection.py --sensitivity        # Llama-2-7B at 5 %: one assumption at a time
    python benchmarks/projection.py --measure-cpu        # the stack's CPU per frame on this machine
    python benchmarks/projection.py --calibrate-local [--measured results/tp_loss.json]
                                                         # the in-process SmolLM2 emulation, predicted
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import statistics
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from halo_p2p.groups import GroupId, GroupLayout
from halo_p2p.plan import PlacementPlan
from halo_p2p.testbed.sim import (
    LLAMA2_7B,
    NATIVE_STACK,
    RPI4_SCALE,
    SHAPES,
    SMOLLM2_135M,
    X86_STACK,
    Cluster,
    Device,
    LinkModel,
    SimOptions,
    StackCost,
    gbe_link,
    rpi4b,
    rpi5,
    simulate,
    uniform_cluster,
)

PAPER_SPEEDUP = 3.41   # HALO abstract: 8 Raspberry Pi, 5 % packet loss, vs strict synchronization
DEVICES = {"rpi4b": rpi4b, "rpi5": rpi5}
MODES = (("strict", "strict", False), ("strict_linux", "strict", True),       # key, mode, Linux TCP
         ("strict_unreliable", "strict-unreliable", False), ("halo", "halo", False))


def run(shape_name: str, cluster: Cluster, mode: str, tokens: int, seed: int, plan: PlacementPlan | None = None,
        **opts: object) -> dict:
    res = simulate(SHAPES[shape_name], cluster, SimOptions(mode=mode, tokens=tokens, seed=seed, **opts),  # type: ignore[arg-type]
                   plan=plan)
    return res.as_dict()


def row(shape: str, device: Device, n: int, plr: float, tokens: int, seed: int, *, link: dict | None = None,
        lossy: list[int] | None = None, plan: PlacementPlan | None = None, stack_on_compute: bool = True,
        **opts: object) -> dict:
    """One shape at one PLR in every mode (the same cluster, links and options)."""
    out: dict = {"shape": shape, "plr": plr}
    for key, mode, linux in MODES:
        cluster = uniform_cluster(device, n, gbe_link(plr, linux_tcp=linux, **(link or {})), lossy=lossy,
                                  stack_on_compute=stack_on_compute)
        out[key] = run(shape, cluster, mode, tokens, seed, plan, **opts)
    for key, _, _ in MODES[:3]:
        out[f"speedup_{key}"] = out[key]["tpot_ms"] / out["halo"]["tpot_ms"]
    return out


def project(args: argparse.Namespace) -> dict:
    """The main table: per shape and PLR, the four modes."""
    rows = []
    for shape in args.shapes:
        for plr in args.plrs:
            t0 = time.perf_counter()
            r = row(shape, DEVICES[args.device](), args.devices, plr, args.tokens, args.seed)
            r["wall_s"] = time.perf_counter() - t0
            rows.append(r)
            print(f"{shape} PLR {plr:.0%}: done in {r['wall_s']:.1f} s", file=sys.stderr)
    return {"device": args.device, "devices": args.devices, "tokens": args.tokens, "seed": args.seed,
            "paper_speedup_plr5": PAPER_SPEEDUP, "rows": rows}


def table(res: dict) -> str:
    out = [f"{res['devices']} x {res['device']}, 1 GbE, {res['tokens']} tokens, seed {res['seed']} "
           f"(HALO paper at 5 %: {PAPER_SPEEDUP}x)", "",
           "| model | PLR | strict, RTO per loss | strict, Linux TCP | strict-unreliable | halo | halo vs strict RTO "
           "| halo vs Linux TCP | halo vs strict-unreliable | halo skipped groups/token | halo lost importance "
           "| halo Resends/token | stack CPU/token, all devices (halo) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        h = r["halo"]
        out.append(f"| {r['shape']} | {100 * r['plr']:g} % | {r['strict']['tpot_ms']:.1f} | "
                   f"{r['strict_linux']['tpot_ms']:.1f} | {r['strict_unreliable']['tpot_ms']:.1f} | "
                   f"{h['tpot_ms']:.1f} | "
                   f"{r['speedup_strict']:.2f}x | {r['speedup_strict_linux']:.2f}x | "
                   f"{r['speedup_strict_unreliable']:.2f}x | {h['skipped_groups']:.1f} | "
                   f"{100 * h['lost_importance']:.2f} % | {h['resends']:.1f} | {h['stack_ms']:.0f} |")
    return "\n".join(out)


def sensitivity(args: argparse.Namespace) -> dict:
    """Llama-2-7B at 5 % on 8 devices: change one assumption at a time."""
    base, rows = rpi4b(), []
    layout = LLAMA2_7B.layout()
    split = PlacementPlan.split(layout, ["c", *(f"w{i:02d}" for i in range(1, args.devices))])
    variants: list[tuple[str, Device, dict]] = [   # name, device, row() keywords
        (f"baseline (RPi 4B, Python stack x{RPI4_SCALE:g}, node's placement, RTO 200 ms)", base, {}),
        ("RTO 1 s (aiortc SCTP)", base, {"link": {"rto_s": 1.0}}),
        ("RTO 20 ms", base, {"link": {"rto_s": 0.02}}),
        ("Pi core 2.7x slower than x86 (Python n-body, low end)", rpi4b(stack=X86_STACK.scaled(2.7)), {}),
        ("Pi core 8.1x slower than x86 (Python n-body, high end)", rpi4b(stack=X86_STACK.scaled(8.1)), {}),
        ("stack at this machine's x86 speed", rpi4b(stack=X86_STACK), {}),
        ("native stack (5 us per frame, no per-vector cost)", rpi4b(stack=NATIVE_STACK), {}),
        ("free stack (no CPU)", rpi4b(stack=StackCost()), {}),
        ("stack on a core of its own (parallel to compute)", base, {"stack_on_compute": False}),
        ("stack-aware placement (scheduler knows the stack's CPU)", base, {"stack_aware": True}),
        ("float16 on the wire", base, {"wire_dtype": "float16"}),
        ("no FEC", base, {"fec": False}),
        ("equal split (PlacementPlan.split)", base, {"plan": split}),
        ("equal split, native stack", rpi4b(stack=NATIVE_STACK), {"plan": split}),
        ("critical fraction 0.25", base, {"critical_fraction": 0.25}),
        ("deadlines seeded by the scheduler", base, {"initial_deadline_s": None}),
        ("Raspberry Pi 5 (its stack 2.2x slower than x86)", rpi5(), {}),
        ("loss on 3 of 7 workers only", base, {"lossy": [0, 1, 2]}),
    ]
    for name, dev, kw in variants:
        r = row("llama2-7b", dev, args.devices, 0.05, args.tokens, args.seed, **kw)  # type: ignore[arg-type]
        r["variant"] = name
        rows.append(r)
        h = r["halo"]
        note = " (diverged)" if h["diverged"] else ""
        print(f"| {name} | {r['strict']['tpot_ms']:.1f} | {r['strict_linux']['tpot_ms']:.1f} | "
              f"{r['strict_unreliable']['tpot_ms']:.1f} | {h['tpot_ms']:.1f}{note} | {r['speedup_strict']:.2f}x | "
              f"{r['speedup_strict_linux']:.2f}x | {h['workers_used']} | {h['skipped_groups']:.1f} | "
              f"{100 * h['lost_importance']:.2f} % | {h['resends']:.0f} |", flush=True)
    return {"sensitivity": rows}


# -- calibration against this machine -------------------------------------------------------------

class _RandomWeights:
    """Random float32 group weights of a shape (the GroupWeights protocol of GroupShard)."""

    def __init__(self, config, layout: GroupLayout) -> None:
        self.config, self.layout, self._rng = config, layout, np.random.default_rng(0)

    def group(self, gid: GroupId) -> dict[str, np.ndarray]:
        shapes = self.layout.tensor_shapes(gid.part)
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
    from halo_p2p.wire.framing import answer_template, encode_frames
    from halo_p2p.wire.quant import wire_format

    layout = SMOLLM2_135M.layout()
    weights = _RandomWeights(SMOLLM2_135M.config(), layout)
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
        fmt = wire_format("q8_0")
        template = answer_template(1, 5, 1, 1, n_groups=8, norms=False, fmt=fmt)
        frame = encode_frames(template, np.ones(layout.dim, np.float32), fmt, reliable=False, parity=False)[1][0]
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
    half = m["frame_cpu_s"] / 2
    dev = Device("this-machine", m["seconds_per_param"], 1 << 40, StackCost(frame_tx_s=half, frame_rx_s=half),
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
        for mode in ("strict", "strict-unreliable", "halo"):
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


# -- the network stack's CPU on this machine (halo_p2p.testbed.sim.cpu) -----------------------------------

_BURST_HDR = struct.Struct("!IHHHH")   # round, index, frames down, frames up, pause (us)
_BURSTS = [(1, 1), (1, 5), (5, 1), (5, 5), (2, 3), (3, 2)]


async def _cpu_child() -> None:
    """The worker side of --measure-cpu: answer each burst with its ``k_up`` frames after the pause."""
    from halo_p2p.net.link import Channel
    from halo_p2p.net.webrtc import Handshake

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def reply(msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    hs = await Handshake.answer(json.loads(await stdin.readline())["offer"])
    reply({"answer": hs.local_sdp})
    link = await hs.open(local_id="w", remote_id="c", timeout_s=10, heartbeat_interval_s=2.0, dead_after_s=20.0)

    async def serve() -> None:
        while True:
            _, data = await link.recv()
            rnd, idx, k_down, k_up, pause = _BURST_HDR.unpack_from(data)
            if idx == k_down - 1:
                await asyncio.sleep(pause / 1e6)
                for i in range(k_up):
                    frame = _BURST_HDR.pack(rnd, i, k_down, k_up, 0) + bytes(len(data) - 12)
                    await link.send(Channel.UNRELIABLE, frame)

    task = asyncio.create_task(serve())
    t0 = time.process_time()
    while (cmd := json.loads(await stdin.readline()))["cmd"] != "quit":
        if cmd["cmd"] == "start":
            t0 = time.process_time()
            reply({})
        else:
            reply({"cpu_s": time.process_time() - t0})
    task.cancel()
    await link.aclose()


async def _link_cpu(rounds: int, size: int, pause_us: int) -> dict:
    """Two processes, one WebRtcLink over 127.0.0.1: bursts of ``k_down`` frames answered by ``k_up``
    frames after a pause on each side; CPU per round fitted as ``a + k_down * tx + k_up * rx``
    (coordinator) and ``a + k_down * rx + k_up * tx`` (worker)."""
    from halo_p2p.net.link import Channel
    from halo_p2p.net.webrtc import Handshake, pin_host_addresses

    pin_host_addresses(["127.0.0.1"])
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--cpu-child", stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None

    async def ask(msg: dict) -> dict:
        child.stdin.write((json.dumps(msg) + "\n").encode())     # type: ignore[union-attr]
        await child.stdin.drain()                                 # type: ignore[union-attr]
        return json.loads(await asyncio.wait_for(child.stdout.readline(), 60))   # type: ignore[union-attr]

    try:
        offer = await Handshake.offer()
        await offer.accept_answer((await ask({"offer": offer.local_sdp}))["answer"])
        link = await offer.open(local_id="c", remote_id="w", timeout_s=10, heartbeat_interval_s=2.0,
                                dead_after_s=20.0)
        rows, rnd, lost = [], 0, 0
        for k_down, k_up in _BURSTS * 2:
            await ask({"cmd": "start"})
            t0 = time.process_time()
            for _ in range(rounds):
                rnd += 1
                await asyncio.sleep(pause_us / 1e6)
                for i in range(k_down):
                    frame = _BURST_HDR.pack(rnd, i, k_down, k_up, pause_us) + bytes(size - 12)
                    await link.send(Channel.UNRELIABLE, frame)
                got = 0
                while got < k_up:
                    try:
                        _, data = await asyncio.wait_for(link.recv(), 0.5)
                    except TimeoutError:
                        lost += 1
                        break
                    got += _BURST_HDR.unpack_from(data)[0] == rnd
            mine = (time.process_time() - t0) / rounds
            rows.append((k_down, k_up, mine, (await ask({"cmd": "stop"}))["cpu_s"] / rounds))
        child.stdin.write(b'{"cmd": "quit"}\n')
        await link.aclose()
        await asyncio.wait_for(child.wait(), 15)
    finally:
        if child.returncode is None:
            child.kill()                 # by pid: only the process this benchmark started
            await child.wait()
    design = np.array([[1, kd, ku] for kd, ku, _, _ in rows], float)
    c = np.linalg.lstsq(design, np.array([r[2] for r in rows]), rcond=None)[0]
    w = np.linalg.lstsq(design, np.array([r[3] for r in rows]), rcond=None)[0]
    return {"rows": rows, "lost": lost, "coordinator": {"round_s": c[0], "tx_s": c[1], "rx_s": c[2]},
            "worker": {"round_s": w[0], "rx_s": w[1], "tx_s": w[2]}}


def _protocol_cpu(dim: int, n_workers: int = 7, groups: int = 4, reps: int = 200) -> dict:
    """CPU of the session's own framing per sync point (no link): the coordinator's inputs out and
    answers in for ``n_workers`` workers, one worker's input in and answer out (Q8_0, no parity)."""
    from halo_p2p.session.sync import SyncPoint, answer_layout
    from halo_p2p.wire import codec
    from halo_p2p.wire.framing import answer_chunks, answer_template, encode_frames, input_template
    from halo_p2p.wire.quant import wire_format
    from halo_p2p.wire.vector import ChunkedVector

    fmt = wire_format("q8_0")
    x = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    held = {f"w{i}": list(range(i * groups, (i + 1) * groups)) for i in range(n_workers)}
    crit = frozenset(g for gs in held.values() for g in gs[:1])
    outs = {p: encode_frames(answer_template(1, 5, 3, 1, n_groups=groups, norms=True, fmt=fmt), x, fmt,
                             reliable=False, parity=False, norms=np.ones(groups, np.float16))[1] for p in held}
    send = recv = w_in = w_out = 0.0
    for _ in range(reps):
        t0 = time.process_time()
        answers = {p: answer_layout(gs, crit, split=False) for p, gs in held.items()}
        chunks = {p: answer_chunks(answer_template(1, 5, 3, 1, n_groups=groups, norms=True, fmt=fmt), dim, fmt,
                                   reliable=False) for p in held}
        sp = SyncPoint(5, 3, 1, n_tokens=1, dim=dim, answers=answers, chunks=chunks, critical=crit, fmt=fmt,
                       sent_at_s=0.0)
        ins = [encode_frames(input_template(1, 5, 3, 1, start_pos=7, n_tokens=1, groups=a.groups,
                                            segments=a.segments, fmt=fmt), x, fmt, reliable=False, parity=False)[1]
               for a in answers.values()]
        t1 = time.process_time()
        for p, frames in outs.items():
            for f in frames:
                sp.add(p, codec.decode(f), 0.0)
        sp.close(0.0)
        t2 = time.process_time()
        vec = None
        for f in ins[0]:
            m = codec.decode(f)
            vec = vec or ChunkedVector(fmt, dim, m.n_data, m.n_parity)
            vec.add(m.chunk, m.offset, m.data)
        vec.values()                                        # type: ignore[union-attr]
        t3 = time.process_time()
        encode_frames(answer_template(1, 5, 3, 1, n_groups=groups, norms=True, fmt=fmt), x, fmt, reliable=False,
                      parity=False, norms=np.ones(groups, np.float16))
        t4 = time.process_time()
        send, recv, w_in, w_out = send + t1 - t0, recv + t2 - t1, w_in + t3 - t2, w_out + t4 - t3
    n_frames = len(outs["w0"])
    return {"dim": dim, "frames_per_vector": n_frames, "coordinator_send_s": send / reps / n_workers,
            "coordinator_recv_s": recv / reps / n_workers, "worker_in_s": w_in / reps, "worker_out_s": w_out / reps}


def measure_cpu(args: argparse.Namespace) -> dict:
    """The numbers behind halo_p2p.testbed.sim.cpu.X86_STACK, measured again on this machine."""
    link = {pause: asyncio.run(_link_cpu(args.cpu_rounds, 1100, pause)) for pause in (0, 3000)}
    proto = [_protocol_cpu(dim) for dim in (576, 2048, 4096)]
    for pause, r in link.items():
        c, w = r["coordinator"], r["worker"]
        print(f"link, {pause / 1000:g} ms pause: coordinator {1e6 * c['tx_s']:.0f} us/frame sent, "
              f"{1e6 * c['rx_s']:.0f} us/frame received, {1e6 * c['round_s']:.0f} us/round; worker "
              f"{1e6 * w['tx_s']:.0f} / {1e6 * w['rx_s']:.0f} / {1e6 * w['round_s']:.0f} us ({r['lost']} bursts lost)")
    for r in proto:
        print(f"protocol, dim {r['dim']} ({r['frames_per_vector']} frames per vector): coordinator "
              f"{1e6 * r['coordinator_send_s']:.0f} us per input sent, {1e6 * r['coordinator_recv_s']:.0f} us per "
              f"answer received; worker {1e6 * r['worker_in_s']:.0f} us per input, "
              f"{1e6 * r['worker_out_s']:.0f} us per answer")
    print(f"halo_p2p.testbed.sim.cpu.X86_STACK in use: {X86_STACK}")
    return {"link": link, "protocol": proto, "x86_stack": dataclasses.asdict(X86_STACK)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["tinyllama-1.1b", "llama2-7b"])
    p.add_argument("--plrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.01, 0.05, 0.1])
    p.add_argument("--local-plrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.01, 0.05, 0.1])
    p.add_argument("--device", choices=sorted(DEVICES), default="rpi4b")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sensitivity", action="store_true", help="Llama-2-7B at 5 %%, one assumption at a time")
    p.add_argument("--calibrate-local", action="store_true", help="predict the in-process SmolLM2 emulation")
    p.add_argument("--measure-cpu", action="store_true", help="the network stack's CPU per frame on this machine")
    p.add_argument("--cpu-rounds", type=int, default=150, help="rounds per burst shape of --measure-cpu")
    p.add_argument("--cpu-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measured", help="tp_loss.py JSON to compare with (default: results/tp_loss*.json)")
    p.add_argument("--out", type=Path, default=Path("results/projection.json"))
    args = p.parse_args()
    if args.cpu_child:
        from halo_p2p.net.webrtc import pin_host_addresses

        pin_host_addresses(["127.0.0.1"])
        asyncio.run(_cpu_child())
        return
    if args.measure_cpu:
        res = measure_cpu(args)
    elif args.calibrate_local:
        res = calibrate_local(args)
    elif args.sensitivity:
        print("| variant | strict, RTO (ms) | strict, Linux TCP (ms) | strict-unreliable (ms) | halo (ms) "
              "| halo vs strict RTO | halo vs Linux TCP | workers used (halo) | halo skipped/token "
              "| halo lost importance | halo Resends/token |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        res = sensitivity(args)
    else:
        res = project(args)
        print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
