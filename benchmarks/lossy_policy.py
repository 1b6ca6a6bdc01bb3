"""Issue #5 benchmark: which criticality policy loses the least quality under packet loss.

The real-time benchmarks (``quality.py``, ``tp_loss.py``) mix the policy's effect with timing
(deadline misses) and with the luck of which ~100-1000 partials a seed loses: one unlucky loss
moves a 150-token perplexity by a percent. This benchmark removes both. It replays the loss
process of the 1 coordinator + 3 workers setting (equal split, the last worker's link lossy, all
attention groups critical, half of each layer's MLP groups critical) inside one teacher-forced
forward (``halo_p2p.model.calibrate.group_forward``) and averages over many seeds:

* at each token and layer, the lossy worker's MLP input is lost with the probability that its
  downlink FEC (2 data chunks + 1 parity) fails; then all its non-critical groups are missing;
* otherwise each of its non-critical MLP groups is missing with the probability that its partial
  is lost: ``1 - (1-p)^2`` for 2 chunks without uplink FEC, ``1 - (1-p)^3 - 3p(1-p)^2`` with the
  ``PartialParity`` frame;
* critical groups are always summed (the coordinator waits for them, or computes them itself).

The policies rank the 24 MLP groups per token: the static rule (weight-norm scores, the same for
every token), the semantic-aware predictor, a random ranking, and the oracle (true partial
norms). Held-out text: CPython's pydoc topics (``heldout.py``), never used for calibration.

    python benchmarks/lossy_policy.py [--plr 0.05] [--seeds 8] [--eval-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout import heldout_text
from benchmarks.predictor_eval import mean_nll, top_mask
from halo_p2p.groups import ATTN, MLP, GroupLayout
from halo_p2p.model.calibrate import group_forward, split_windows
from halo_p2p.model.llama import Llama
from halo_p2p.model.loader import open_model
from halo_p2p.model.shard import mlp_group_scores
from halo_p2p.node.library import file_sha256
from halo_p2p.plan import PlacementPlan
from halo_p2p.predictor import load_predictor_for
from halo_p2p.wire.fec import delivery_probability


def group_loss(plr: float, uplink_fec: bool) -> float:
    """Probability that a 2-chunk partial cannot be summed."""
    return 1 - delivery_probability(2, 1 if uplink_fec else 0, plr)


def run(args: argparse.Namespace) -> dict:
    m = open_model(args.model)
    layout = GroupLayout.from_config(m.source.config)
    window = min(512, m.source.config.max_seq_len)
    model = Llama(m.source, max_seq_len=window)
    pred = load_predictor_for(file_sha256(m.path))
    if pred is None:
        raise SystemExit(f"no predictor for {m.name}: run halo-peer calibrate first")
    windows = split_windows([m.tokenizer.encode(heldout_text())[: args.eval_tokens]], window)
    plan = PlacementPlan.split(layout, ["c", "w1", "w2", "w3"], coordinator="c")
    lossy = {layer: np.array([g for g, p in plan.owners_at(layer, MLP).items() if p == "w3"])
             for layer in range(layout.n_layers)}
    k = round(args.critical_fraction * layout.n_mlp)
    static = mlp_group_scores(m.source, layout)
    rankers = {
        "static rule": lambda layer, xn, norms, rng: np.tile(static[layer], (len(xn), 1)),
        "predictor": lambda layer, xn, norms, rng: pred.scores(layer, MLP, xn),
        "random": lambda layer, xn, norms, rng: rng.random(norms.shape),
        "oracle": lambda layer, xn, norms, rng: norms,
    }

    def ppl(select) -> float:
        total, count = 0.0, 0
        for w in windows:
            s, c = mean_nll(group_forward(model, layout, w, select=select), w)
            total, count = total + s, count + c
        return math.exp(total / count)

    full = ppl(None)
    q_in = 1 - delivery_probability(2, 1, args.plr)
    out = {"model": m.name, "plr": args.plr, "seeds": args.seeds, "tokens": sum(len(w) - 1 for w in windows),
           "critical_mlp_groups": k, "lossy_groups_per_layer": len(lossy[0]), "input_loss": q_in,
           "full": full, "rows": []}
    print(f"full model perplexity {full:.4f}", file=sys.stderr)
    for fec in (False, True):
        q = group_loss(args.plr, fec)
        for name, score in rankers.items():
            values, dropped = [], []
            for seed in range(args.seeds):
                rng, rank_rng = np.random.default_rng(seed), np.random.default_rng(10_000 + seed)
                n_drop = [0]

                def select(layer, part, xn, norms, score=score, rng=rng, rank_rng=rank_rng, q=q, n_drop=n_drop):
                    if part == ATTN:
                        return None
                    crit = top_mask(score(layer, xn, norms, rank_rng), k)               # (T, G)
                    t = len(xn)
                    gone = np.zeros_like(crit)
                    gone[:, lossy[layer]] = rng.random((t, len(lossy[layer]))) < q
                    gone[rng.random(t) < q_in, :] |= np.isin(np.arange(crit.shape[1]), lossy[layer])
                    gone &= ~crit
                    n_drop[0] += int(gone.sum())
                    return ~gone

                values.append(ppl(select))
                dropped.append(n_drop[0] / out["tokens"])
            row = {"uplink_fec": fec, "group_loss": q, "policy": name, "ppl_mean": statistics.mean(values),
                   "ppl_sd": statistics.stdev(values) if len(values) > 1 else 0.0, "ppls": values,
                   "dropped_per_token": statistics.mean(dropped)}
            row["delta_pct"] = 100 * (row["ppl_mean"] / full - 1)
            out["rows"].append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "ppls"}), file=sys.stderr)
    return out


def table(res: dict) -> str:
    lines = [f"{res['model']}, {res['tokens']} held-out tokens, PLR {100 * res['plr']:g} % on the lossy worker, "
             f"{res['seeds']} seeds; full model perplexity {res['full']:.4f}", "",
             "| uplink FEC | group loss | policy | dropped groups/token | perplexity (mean ± sd over seeds) "
             "| Δ vs full |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {'yes' if r['uplink_fec'] else 'no'} | {100 * r['group_loss']:.2f} % | {r['policy']} | "
                     f"{r['dropped_per_token']:.2f} | {r['ppl_mean']:.4f} ± {r['ppl_sd']:.4f} | "
                     f"{r['delta_pct']:+.2f} % |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--plr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--critical-fraction", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=Path("results/lossy_policy.json"))
    args = p.parse_args()
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
