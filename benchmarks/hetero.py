"""Issue #5 benchmark: the scheduler's plan vs an equal split on heterogeneous peers.

A coordinator and three workers with 1x, 0.5x and 0.25x this machine's compute (emulated
slowdowns 1, 2, 4), each offering 40 % of the model's fp32 weight bytes, over in-memory links
(1 ms one-way, no loss), strict synchronization, greedy decoding of SmolLM2:

    python benchmarks/hetero.py [--model smollm2-135m-instruct] [--tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halo_p2p.model.loader import open_model
from halo_p2p.net.link import LinkConditions
from halo_p2p.node.emulate import start_emulated_swarm
from halo_p2p.profiles import PeerProfile
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import Generator

ORDER = ("coordinator", "w1x", "w0_5x", "w0_25x")
"""Peers in the order of the table's share column."""


async def run(args: argparse.Namespace) -> dict:
    model = open_model(args.model)
    tok = model.tokenizer
    c = model.source.config
    full = 4 * (c.n_layers * (c.dim * (2 * c.n_heads * c.head_dim + 2 * c.n_kv_heads * c.head_dim)
                              + 3 * c.dim * c.hidden_dim) + c.vocab_size * c.dim)
    budget = int(0.4 * full)
    link = LinkConditions(delay_s=0.001)
    out = {"model": model.name, "budget_bytes": budget, "runs": {}}
    for planner in ("split", "schedule"):
        peers = [PeerProfile(name="coordinator", memory_budget_bytes=budget),
                 PeerProfile(name="w1x", slowdown=1, link=link, memory_budget_bytes=budget),
                 PeerProfile(name="w0_5x", slowdown=2, link=link, memory_budget_bytes=budget),  # ids: [A-Za-z0-9_-]
                 PeerProfile(name="w0_25x", slowdown=4, link=link, memory_budget_bytes=budget)]
        swarm = await start_emulated_swarm(model.source, peers, SessionOptions(mode="strict", max_seq_len=512),
                                           planner=planner, critical="all")
        try:
            gen = Generator(swarm, tok)
            ids = tok.encode("The history of the printing press")
            _ = [e async for e in gen.stream(ids, SamplingParams(temperature=0, max_tokens=args.tokens))]
            status = swarm.status()
            shares = {p: round(share, 3) for p, share in status.shares().items()}
            out["runs"][planner] = {"tpot_ms": gen.stats.tpot_ms, "tpot_p95_ms": gen.stats.tpot_p95_ms,
                                    "shares": shares, "weight_bytes": dict(status.weight_bytes or {})}
            print(planner, json.dumps(out["runs"][planner]), file=sys.stderr)
        finally:
            await swarm.aclose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--out", type=Path, default=Path("results/hetero.json"))
    args = p.parse_args()
    res = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    s, h = res["runs"]["split"], res["runs"]["schedule"]
    print("| plan | TPOT median (ms) | p95 (ms) | shares (coordinator, 1x, 0.5x, 0.25x) |\n|---|---|---|---|")
    for name, r in (("equal split", s), ("scheduler", h)):
        shares = ", ".join(str(r["shares"].get(n, 0.0)) for n in ORDER)
        print(f"| {name} | {r['tpot_ms']:.1f} | {r['tpot_p95_ms']:.1f} | {shares} |")
    print(f"\nscheduler / equal split TPOT: {h['tpot_ms'] / s['tpot_ms']:.2f}")


if __name__ == "__main__":
    main()
