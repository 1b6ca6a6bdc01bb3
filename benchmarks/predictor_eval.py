"""Issue #5 benchmark: the semantic-aware criticality predictor on held-out text.

For one model: (1) recall@k of the predicted top-k groups against the true top-k by partial
norm, per part, at k = 25/50/75 % of each sync point's groups, next to the static weight rule,
a calibrated constant ranking (the per-group mean of the calibration labels) and random;
(2) sparsity: the share of the summed partial norms carried by the top 25 % of groups; (3) cost:
``PredictorPolicy.critical`` for all 2 * n_layers sync points of a token vs the single-peer
TPOT; (4) quality saved: teacher-forced perplexity of the held-out text when, at every sync
point and token, only the top-k groups are kept and the others dropped (zeroed), ranking by
the predictor, random, the static weight rule, the calibrated constant and the oracle (true
norms) — once dropping MLP groups only (attention all kept, like ``StaticRule``) and once
dropping attention and MLP groups. Held-out text: ``benchmarks/heldout.py`` (pydoc_data topics).

    python benchmarks/predictor_eval.py --model stories260K [--calibrate [--ship]] [--eval-tokens 1024]

``--calibrate`` builds the default calibration text (``halo_p2p.model.calibrate.default_corpus``:
self-generated answers to DEFAULT_PROMPTS, seed DEFAULT_SEED, plus stdlib docstrings; ``--corpus``
caches those ids) and fits a fresh predictor; ``--ship`` writes it to the package
data (``halo_p2p/model/data/predictors/<sha256>.npz``). Otherwise the shipped/cached one is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout import heldout_text
from halo_p2p.groups import ATTN, MLP, PARTS, GroupLayout
from halo_p2p.model.calibrate import collect, default_corpus, group_forward, self_generated_corpus, split_windows
from halo_p2p.model.llama import Llama
from halo_p2p.model.loader import open_model
from halo_p2p.model.registry import sha256_file
from halo_p2p.model.shard import mlp_group_scores
from halo_p2p.predictor import (
    Predictor,
    PredictorPolicy,
    fit_predictor,
    load_predictor_for,
    recall_at_k,
    shipped_predictor_path,
    top_mass_share,
)
from halo_p2p.session.criticality import StaticRule

FRACTIONS = (0.25, 0.5, 0.75)
HELDOUT_PROMPTS = ("Tom had a big red ball", "Write a letter to a friend about your holiday.")
HELDOUT_SEED = 99
HELDOUT_NAMES = {"pydoc": "pydoc_data topics", "generated": "self-generated text (other prompts, seed 99)"}
PART_NAMES = {ATTN: "attn", MLP: "mlp"}


def attn_group_scores(source, layout: GroupLayout) -> np.ndarray:
    """Static weight score of attention groups, ``|Wv_g|_F * |Wo[:, g]|_F`` ``(n_layers, n_attn)``."""
    out = np.zeros((layout.n_layers, layout.n_attn))
    for layer in range(layout.n_layers):
        wv, wo = source.load(f"layers.{layer}.wv"), source.load(f"layers.{layer}.wo")
        for g in range(layout.n_attn):
            (a, b), (c, d) = layout.kv_rows(g), layout.q_rows(g)
            out[layer, g] = np.linalg.norm(wv[a:b]) * np.linalg.norm(wo[:, c:d])
    return out


def top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """``(T, n)`` bool, True at the ``k`` largest scores of each row."""
    t, n = scores.shape
    mask = np.zeros((t, n), bool)
    if k >= n:
        mask[:] = True
    elif k > 0:
        mask[np.arange(t)[:, None], np.argpartition(-scores, k - 1, axis=1)[:, :k]] = True
    return mask


def keep_k(layout: GroupLayout, part: int, fraction: float) -> int:
    return max(1, round(fraction * layout.n_groups(part)))


def mean_nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    targets = np.asarray(ids[1:])
    z = logits[:-1].astype(np.float64)
    m = z.max(-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(-1))
    return float((lse - z[np.arange(len(targets)), targets]).sum()), len(targets)


def perplexity(model: Llama, layout: GroupLayout, windows: list[list[int]], select) -> float:
    total, count = 0.0, 0
    for w in windows:
        s, c = mean_nll(group_forward(model, layout, w, select=select), w)
        total, count = total + s, count + c
    return float(np.exp(total / count))


def calibrate(m, model: Llama, layout: GroupLayout, sha: str, args) -> Predictor:
    t0 = time.perf_counter()
    if args.corpus and args.corpus.is_file():          # reuse the sampled text of an earlier run
        corpus, meta = json.loads(args.corpus.read_text())
    else:
        corpus, meta = default_corpus(model, m.tokenizer, chat_template=m.chat_template,
                                      tokens_per_prompt=args.tokens_per_prompt,
                                      doc_tokens_per_module=args.doc_tokens_per_module)
        if args.corpus:
            args.corpus.parent.mkdir(parents=True, exist_ok=True)
            args.corpus.write_text(json.dumps([corpus, meta]))
    if args.doc_tokens_per_module == 0:
        meta["text"] = "self-generated"
    t1 = time.perf_counter()
    data = collect(model, layout, corpus)
    t2 = time.perf_counter()
    pred = fit_predictor(data, model_sha256=sha, rank=args.rank, metadata={"model_name": m.name, **meta})
    t3 = time.perf_counter()
    pred.metadata["calibration_seconds"] = {"generate": round(t1 - t0, 1), "collect": round(t2 - t1, 1),
                                            "fit": round(t3 - t2, 1)}
    print(f"calibration: {data.n_tokens} tokens, generate {t1 - t0:.0f} s, collect {t2 - t1:.0f} s, "
          f"fit {t3 - t2:.0f} s", file=sys.stderr)
    return pred


def run(args) -> dict:
    m = open_model(args.model)
    sha = sha256_file(m.path)
    layout = GroupLayout.from_config(m.source.config)
    window = min(512, m.source.config.max_seq_len)
    model = Llama(m.source, max_seq_len=window)
    if args.calibrate:
        pred = calibrate(m, model, layout, sha, args)
        if args.ship:
            pred.save(shipped_predictor_path(sha))
        if args.save:
            pred.save(args.save)
    else:
        pred = Predictor.load(args.predictor, model_sha256=sha) if args.predictor else load_predictor_for(sha)
        if pred is None:
            raise SystemExit(f"no predictor for {m.name}; run with --calibrate")
    pred.check_layout(layout)
    if args.heldout == "pydoc":
        held = [m.tokenizer.encode(heldout_text())[: args.eval_tokens]]
    else:                                   # in-domain: the model's own text from other prompts and seed
        held = self_generated_corpus(model, m.tokenizer, chat_template=m.chat_template, prompts=HELDOUT_PROMPTS,
                                     tokens_per_prompt=min(window, args.eval_tokens), seed=HELDOUT_SEED)
    windows = split_windows(held, window)
    ho = collect(model, layout, windows)
    print(f"held-out: {ho.n_tokens} tokens in {len(windows)} windows", file=sys.stderr)

    static = {ATTN: attn_group_scores(m.source, layout), MLP: mlp_group_scores(m.source, layout)}
    const = {p: np.asarray(pred.metadata["label_mean"][PART_NAMES[p]]) for p in PARTS} \
        if "label_mean" in pred.metadata else None                    # (n_layers, n_groups) mean log norm
    out: dict = {"model": m.name, "sha256": sha, "heldout": args.heldout,
                 "layout": {"n_layers": layout.n_layers, "n_attn": layout.n_attn,
                 "n_mlp": layout.n_mlp, "mlp_group_size": layout.mlp_group_size},
                 "heldout_tokens": ho.n_tokens, "predictor": pred.metadata, "recall": [], "sparsity": {}, "ppl": []}

    # (1) recall@k and (2) sparsity
    t = ho.n_tokens
    rng = np.random.default_rng(args.seed)
    for part in PARTS:
        name = PART_NAMES[part]
        out["sparsity"][name] = {"top25_mass": top_mass_share(ho.norms[part], 0.25),
                                 "per_layer": [top_mass_share(ho.norms[part][i], 0.25) for i in range(layout.n_layers)]}
        for f in FRACTIONS:
            k = keep_k(layout, part, f)
            row = {"part": name, "fraction": f, "k": k, "n": layout.n_groups(part)}
            rankers = {"predictor": lambda i, part=part: pred.scores(i, part, ho.xn[part][i].astype(np.float32)),
                       "static": lambda i, part=part: np.tile(static[part][i], (t, 1)),
                       "random": lambda i, part=part: rng.random((t, layout.n_groups(part)))}
            if const is not None:
                rankers["calibrated_const"] = lambda i, part=part: np.tile(const[part][i], (t, 1))
            for rname, fn in rankers.items():
                row[rname] = float(np.mean([recall_at_k(fn(i), ho.norms[part][i], k) for i in range(layout.n_layers)]))
            out["recall"].append(row)
            print(json.dumps(row), file=sys.stderr)

    # (3) cost of critical() for all sync points of a token, vs TPOT of a single peer
    policy = PredictorPolicy(pred, 0.5)
    static_rule = StaticRule(static[MLP], layout.n_attn, 0.5)
    n_tok = min(t, 200)
    xs = [[[np.ascontiguousarray(ho.xn[p][i][j:j + 1], np.float32) for p in PARTS] for i in range(layout.n_layers)]
          for j in range(n_tok)]
    costs = {}
    for pname, pol in (("predictor", policy), ("static_rule", static_rule)):
        per_token = []
        for _ in range(3):
            t0 = time.perf_counter()
            for j in range(n_tok):
                for i in range(layout.n_layers):
                    for p in PARTS:
                        pol.critical(i, p, xs[j][i][p])
            per_token.append((time.perf_counter() - t0) / n_tok)
        costs[pname] = min(per_token)
    ids = windows[0]
    model.forward(np.asarray(ids[:8]), 0)
    steps = []
    for pos in range(8, 8 + args.tpot_tokens):
        t0 = time.perf_counter()
        model.forward(np.asarray([ids[pos]]), pos)
        steps.append(time.perf_counter() - t0)
    tpot = statistics.median(steps)
    out["cost"] = {"sync_points": 2 * layout.n_layers, "predictor_us_per_token": 1e6 * costs["predictor"],
                   "static_rule_us_per_token": 1e6 * costs["static_rule"], "tpot_ms": 1e3 * tpot,
                   "predictor_share_of_tpot": costs["predictor"] / tpot}
    print(json.dumps(out["cost"]), file=sys.stderr)

    # (4) quality saved: perplexity with the dropped groups zeroed
    base = perplexity(model, layout, windows, None)
    out["ppl_full"] = base
    print(f"full model perplexity {base:.4f}", file=sys.stderr)
    for scenario in ("mlp", "all"):
        for f in FRACTIONS:
            row = {"drop": scenario, "fraction": f, "k_attn": layout.n_attn if scenario == "mlp" else
                   keep_k(layout, ATTN, f), "k_mlp": keep_k(layout, MLP, f)}
            rankers = {
                "predictor": lambda layer, part, xn, norms: pred.scores(layer, part, xn),
                "random": lambda layer, part, xn, norms: rng.random(norms.shape),
                "static": lambda layer, part, xn, norms: np.tile(static[part][layer], (len(xn), 1)),
                "oracle": lambda layer, part, xn, norms: norms,
            }
            if const is not None:
                rankers["calibrated_const"] = lambda layer, part, xn, norms: np.tile(const[part][layer], (len(xn), 1))
            for rname, score in rankers.items():
                def select(layer, part, xn, norms, score=score, f=f, scenario=scenario):
                    if scenario == "mlp" and part == ATTN:
                        return None
                    return top_mask(score(layer, part, xn, norms), keep_k(layout, part, f))
                row[rname] = perplexity(model, layout, windows, select)
            out["ppl"].append(row)
            print(json.dumps(row), file=sys.stderr)
    return out


def _num(x: float) -> str:
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def tables(res: dict) -> str:
    lay = res["layout"]
    cal = res["predictor"]
    lines = [f"### {res['model']} ({lay['n_layers']} layers, {lay['n_attn']} attention groups, {lay['n_mlp']} MLP "
             f"groups of {lay['mlp_group_size']} neurons per layer; calibrated on {cal.get('calibration_tokens')} "
             f"tokens of {cal.get('text', 'given')} text, evaluated on {res['heldout_tokens']} held-out tokens of "
             f"{HELDOUT_NAMES[res.get('heldout', 'pydoc')]})", "",
             "Recall@k (share of the true top-k groups by partial norm that the ranking puts in its top k):", "",
             "| part | critical fraction | k / groups | predictor | calibrated constant | static weight rule "
             "| random |",
             "|---|---|---|---|---|---|---|"]
    for r in res["recall"]:
        lines.append(f"| {r['part']} | {100 * r['fraction']:.0f} % | {r['k']} / {r['n']} | {r['predictor']:.3f} | "
                     f"{r.get('calibrated_const', float('nan')):.3f} | {r['static']:.3f} | {r['random']:.3f} |")
    s = res["sparsity"]
    lines += ["", f"Sparsity: the top 25 % of groups carry {100 * s['attn']['top25_mass']:.1f} % (attention) and "
              f"{100 * s['mlp']['top25_mass']:.1f} % (MLP) of the summed partial norms (mean over tokens and "
              "layers; 25 % means no concentration).", ""]
    c = res["cost"]
    lines += [f"Cost: `PredictorPolicy.critical` for all {c['sync_points']} sync points of a token: "
              f"{c['predictor_us_per_token']:.0f} µs = {100 * c['predictor_share_of_tpot']:.2f} % of the single-peer "
              f"TPOT ({c['tpot_ms']:.1f} ms); `StaticRule`: {c['static_rule_us_per_token']:.0f} µs.", "",
              f"Perplexity of the held-out text when only the top-k groups are kept at every sync point "
              f"(full model: {res['ppl_full']:.3f}):", "",
              "| dropped | critical fraction | kept attn / MLP per layer | predictor | calibrated constant "
              "| static weight rule | random | oracle |", "|---|---|---|---|---|---|---|---|"]
    for r in res["ppl"]:
        what = "MLP only" if r["drop"] == "mlp" else "attn + MLP"
        lines.append(f"| {what} | {100 * r['fraction']:.0f} % | {r['k_attn']} / {r['k_mlp']} | "
                     f"{_num(r['predictor'])} | {_num(r.get('calibrated_const', float('nan')))} | "
                     f"{_num(r['static'])} | {_num(r['random'])} | {_num(r['oracle'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260K")
    p.add_argument("--predictor", type=Path, help="a predictor .npz (default: cache, then shipped)")
    p.add_argument("--calibrate", action="store_true", help="fit a fresh predictor on self-generated text")
    p.add_argument("--ship", action="store_true", help="with --calibrate: write it to the package data")
    p.add_argument("--save", type=Path, help="with --calibrate: also save it here")
    p.add_argument("--tokens-per-prompt", type=int, default=256)
    p.add_argument("--doc-tokens-per-module", type=int, default=256, help="0: self-generated text only")
    p.add_argument("--corpus", type=Path, help="with --calibrate: JSON of the calibration ids, written once, reused")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--heldout", choices=("pydoc", "generated"), default="pydoc",
                   help="pydoc_data topics, or the model's own text from other prompts and seed")
    p.add_argument("--tpot-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--report", type=Path, help="only print the tables of a saved result JSON")
    args = p.parse_args()
    if args.report:
        print(tables(json.loads(args.report.read_text())))
        return
    res = run(args)
    out = args.out or Path(f"results/predictor_eval_{res['model']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(tables(res))


if __name__ == "__main__":
    main()
