"""Issues #3 and #10: strict, strict-unreliable and halo synchronization over emulated lossy links.

One coordinator + 3 workers in this process (in-memory links, one-way delay 2 ms); one worker's
link at PLR 0/1/5/10 %. For each PLR and mode: TPOT of greedy decoding, greedy-token agreement
with a single peer, and (halo) perplexity of held-out text scored token by token (so relaxed
synchronization applies to every scored token). A lost packet on the reliable channel used by
strict costs an RTO (200 ms, doubling), as in SCTP/TCP; strict-unreliable waits for every answer
on the unreliable channel with FEC and Resend, as halo does for critical groups.

    python benchmarks/tp_loss.py --model smollm2-135m-instruct [--predictor] [--no-uplink-fec]
                                 [--out results/tp_loss.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout import heldout_text
from halo_p2p.engine.local import LocalEngine
from halo_p2p.model.chat import Message
from halo_p2p.model.loader import open_model
from halo_p2p.model.threads import SWARM_THREADS, set_compute_threads
from halo_p2p.net.link import Channel, LinkConditions
from halo_p2p.node.emulate import start_emulated_swarm
from halo_p2p.node.library import file_sha256
from halo_p2p.predictor import PredictorPolicy, load_predictor_for
from halo_p2p.profiles import PeerProfile
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import Generator, perplexity

PROMPT = "Write a short story about a robot who learns to paint."


async def decode(engine, tokenizer, ids, n):
    gen = Generator(engine, tokenizer)
    tokens = [e.token_id async for e in gen.stream(ids, SamplingParams(temperature=0, max_tokens=n))]
    return tokens, gen.stats


async def run(args) -> dict:
    model = open_model(args.model)
    tok = model.tokenizer
    if model.chat_template:
        ids = tok.encode(model.chat_template.render([Message("user", PROMPT)]))
    else:
        ids = tok.encode("Once upon a time")
    text_ids = tok.encode(heldout_text())[: args.ppl_tokens]
    predictor = load_predictor_for(file_sha256(model.path)) if args.predictor else None
    if args.predictor and predictor is None:
        raise SystemExit(f"no predictor for {model.name}: run halo-peer calibrate first")
    local = LocalEngine(model.source, max_seq_len=1024)
    base_tokens, base_stats = await decode(local, tok, ids, args.tokens)
    base_ppl = await perplexity(local, text_ids)
    await local.aclose()
    out = {"model": model.name, "prompt": PROMPT, "tokens": args.tokens, "ppl_tokens": len(text_ids) - 1,
           "wire_dtype": args.wire_dtype,
           "criticality": "predictor" if predictor is not None else "static rule",
           "uplink_fec": not args.no_uplink_fec,
           "delay_ms": args.delay_ms, "rto_ms": args.rto_ms, "local": {
               "tpot_ms": base_stats.tpot_ms, "perplexity": base_ppl.perplexity}, "runs": []}
    print(f"local: TPOT {base_stats.tpot_ms:.1f} ms, perplexity {base_ppl.perplexity:.4f}", file=sys.stderr)
    set_compute_threads(SWARM_THREADS)     # 4 emulated peers, each a compute thread, as halo-peer does
    for plr in args.plrs:
        for mode in args.modes:
            link = LinkConditions(delay_s=args.delay_ms / 1000, rto_s=args.rto_ms / 1000)
            lossy = LinkConditions(plr=plr, delay_s=args.delay_ms / 1000, rto_s=args.rto_ms / 1000)
            peers = [PeerProfile(name="c"), PeerProfile(name="w1", link=link), PeerProfile(name="w2", link=link),
                     PeerProfile(name="w3", link=lossy)]
            options = SessionOptions(mode=mode, wire_dtype=args.wire_dtype, max_seq_len=1024)
            policy = (PredictorPolicy(predictor, args.critical_fraction, attn_critical=1.0)
                      if predictor is not None and mode == "halo" else None)
            swarm = await start_emulated_swarm(model.source, peers, options, critical_fraction=args.critical_fraction,
                                               seed=args.seed, policy=policy, uplink_parity=not args.no_uplink_fec)
            t0 = time.perf_counter()

            def wire_bytes(sw=swarm) -> tuple[int, int]:   # (downlink, uplink) payload bytes, both channels
                down = sum(link.stats[c].bytes_sent for link in sw.links.values() for c in Channel)
                return down, sum(s.bytes_sent for node in sw.members for s in node.status().served)

            try:
                before = wire_bytes()
                tokens, stats = await decode(swarm, tok, ids, args.tokens)
                down, up = (a - b for a, b in zip(wire_bytes(), before, strict=True))
                records = swarm.status().records[1:]
                ppl = None
                if mode == "halo" and args.ppl_tokens:
                    ppl = (await perplexity(swarm, text_ids, chunk_tokens=1)).perplexity
            finally:
                await swarm.aclose()
            agree = sum(a == b for a, b in zip(tokens, base_tokens, strict=False)) / max(1, len(base_tokens))
            waits = [r.wait_s * 1000 for r in records]
            row = {"plr": plr, "mode": mode, "tpot_ms": stats.tpot_ms, "tpot_p95_ms": stats.tpot_p95_ms,
                   "token_agreement": agree, "perplexity": ppl,
                   "mean_wait_ms": statistics.mean(waits) if waits else None,
                   "mean_skipped_groups": statistics.mean(r.skipped for r in records) if records else None,
                   "resends_per_token": statistics.mean(sum(s.resends for s in r.syncs) for r in records)
                   if records else None,
                   "rebuilt_groups_per_token": statistics.mean(sum(s.recovered for s in r.syncs) for r in records)
                   if records else None,
                   # the whole decode (prompt included) per generated token
                   "downlink_kb_per_token": down / 1e3 / max(1, len(tokens)),
                   "uplink_kb_per_token": up / 1e3 / max(1, len(tokens)),
                   "wall_s": time.perf_counter() - t0}
            out["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
    return out


def table(res: dict) -> str:
    rows = ["| PLR | strict TPOT (ms) | strict-unreliable TPOT (ms) | halo TPOT (ms) | halo vs strict | "
            "halo vs strict-unreliable | halo TPOT vs PLR 0 | halo skipped groups/token | rebuilt chunks/token | "
            "resends/token | halo uplink KB/token | halo token agreement | halo perplexity (Δ vs PLR 0) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["plr"], r["mode"]): r for r in res["runs"]}
    base = by.get((0.0, "halo"), {})

    def ms(r: dict | None) -> str:
        return f"{r['tpot_ms']:.1f}" if r else "-"

    for plr in sorted({r["plr"] for r in res["runs"]}):
        s, u, h = by.get((plr, "strict")), by.get((plr, "strict-unreliable")), by.get((plr, "halo"))
        if not h:
            continue
        speed = f"{s['tpot_ms'] / h['tpot_ms']:.2f}x" if s else "-"
        fair = f"{u['tpot_ms'] / h['tpot_ms']:.2f}x" if u else "-"
        rel = f"{h['tpot_ms'] / base['tpot_ms']:.2f}x" if base else "-"
        ppl = h["perplexity"]
        dppl = f"{ppl:.3f} ({100 * (ppl / base['perplexity'] - 1):+.2f} %)" if ppl and base.get("perplexity") else "-"
        rows.append(f"| {100 * plr:g} % | {ms(s)} | {ms(u)} | {ms(h)} | {speed} | {fair} | {rel} | "
                    f"{h['mean_skipped_groups']:.2f} | {h.get('rebuilt_groups_per_token') or 0:.2f} | "
                    f"{h['resends_per_token']:.2f} | {h.get('uplink_kb_per_token', 0):.1f} | "
                    f"{100 * h['token_agreement']:.0f} % | {dppl} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--plrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.01, 0.05, 0.1])
    p.add_argument("--modes", type=lambda s: s.split(","), default=["strict", "strict-unreliable", "halo"])
    p.add_argument("--wire-dtype", default="q8_0", help="activation format on the wire (default q8_0)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=200)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--rto-ms", type=float, default=200.0)
    p.add_argument("--critical-fraction", type=float, default=0.5)
    p.add_argument("--predictor", action="store_true",
                   help="halo: the semantic-aware predictor picks the critical MLP groups (default: static rule)")
    p.add_argument("--no-uplink-fec", action="store_true", help="workers send no parity chunks with their answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/tp_loss.json"))
    args = p.parse_args()
    res = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
