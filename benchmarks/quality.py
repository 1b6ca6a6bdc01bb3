"""Issue #5 benchmark: quality under loss, the placeholder rule vs the semantic-aware predictor.

SmolLM2 on a coordinator and 3 workers over in-memory links (2 ms one-way), the last worker's
link at 5 % PLR, halo synchronization, the SAME placement (equal split: the same groups on the
lossy peer) and the SAME number of critical groups per sync point (half of each layer's groups
for MLP; all attention groups for the static rule). Perplexity of held-out text (CPython's
pydoc topics, see heldout.py) scored token by token, so relaxed sync applies to every token.
Each configuration also toggles uplink FEC (a PartialParity frame per group) and per-token
dynamic placement:

    python benchmarks/quality.py [--tokens 150] [--plr 0.05] [--only predictor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout import heldout_text
from halo_p2p.engine.local import LocalEngine
from halo_p2p.model.loader import open_model
from halo_p2p.net.link import LinkConditions
from halo_p2p.node.emulate import start_emulated_swarm
from halo_p2p.node.library import file_sha256
from halo_p2p.predictor import PredictorPolicy, load_predictor_for
from halo_p2p.profiles import PeerProfile
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import perplexity


async def run(args: argparse.Namespace) -> dict:
    model = open_model(args.model)
    ids = model.tokenizer.encode(heldout_text())[: args.tokens + 1]
    predictor = load_predictor_for(file_sha256(model.path))
    if predictor is None:
        raise SystemExit(f"no predictor for {model.name}: run halo-peer calibrate first")
    local = LocalEngine(model.source, max_seq_len=1024)
    base = (await perplexity(local, ids)).perplexity
    await local.aclose()
    out = {"model": model.name, "tokens": len(ids) - 1, "plr": args.plr, "local": base, "runs": {}}
    print(f"local perplexity {base:.4f}", file=sys.stderr)
    def pred() -> PredictorPolicy:
        return PredictorPolicy(predictor, 0.5, attn_critical=1.0)

    # name: (PLR, policy (None = the placeholder static rule), dynamic placement, uplink FEC)
    configs = {
        "static rule, PLR 0": (0.0, None, False, True),
        "static rule (placeholder, #3), no uplink FEC": (args.plr, None, False, False),
        "static rule + uplink FEC": (args.plr, None, False, True),
        "predictor, no uplink FEC": (args.plr, pred(), False, False),
        "predictor + uplink FEC": (args.plr, pred(), False, True),
        "predictor + uplink FEC + dynamic placement": (args.plr, pred(), True, True),
    }
    for name, (plr, policy, dynamic, parity) in configs.items():
        if args.only and not any(o in name for o in args.only):
            continue
        near = LinkConditions(delay_s=0.002)
        peers = [PeerProfile(name="c"), PeerProfile(name="w1", link=near), PeerProfile(name="w2", link=near),
                 PeerProfile(name="w3", link=LinkConditions(plr=plr, delay_s=0.002))]
        swarm = await start_emulated_swarm(model.source, peers, SessionOptions(mode="halo", max_seq_len=1024),
                                           critical_fraction=0.5, policy=policy, dynamic=dynamic, seed=args.seed,
                                           uplink_parity=parity)
        try:
            ppl = (await perplexity(swarm, ids, chunk_tokens=1)).perplexity
            recs = swarm.status().records
            skipped = sum(r.skipped for r in recs) / len(recs)
            taken = sum(s.taken_over for r in recs for s in r.syncs) / len(recs)
            rebuilt = sum(s.recovered for r in recs for s in r.syncs) / len(recs)
            wait_ms = 1000 * sum(r.wait_s for r in recs) / len(recs)
        finally:
            await swarm.aclose()
        out["runs"][name] = {"perplexity": ppl, "vs_local_pct": 100 * (ppl / base - 1),
                             "skipped_groups_per_token": skipped, "taken_over_per_token": taken,
                             "rebuilt_groups_per_token": rebuilt, "wait_ms_per_token": wait_ms}
        print(name, json.dumps(out["runs"][name]), file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--plr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/quality.json"))
    p.add_argument("--only", nargs="*", help="run only the configurations whose name contains one of these")
    args = p.parse_args()
    res = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"| configuration (halo) | perplexity | vs local | skipped groups/token | rebuilt/token | "
          f"taken over/token | wait ms/token |\n|---|---|---|---|---|---|---|\n"
          f"| local (1 peer) | {res['local']:.4f} | - | - | - | - | - |")
    for name, r in res["runs"].items():
        print(f"| {name} | {r['perplexity']:.4f} | {r['vs_local_pct']:+.2f} % | {r['skipped_groups_per_token']:.2f} | "
              f"{r['rebuilt_groups_per_token']:.2f} | {r['taken_over_per_token']:.2f} | {r['wait_ms_per_token']:.0f} |")


if __name__ == "__main__":
    main()
