"""What the activation format on the wire costs in quality: perplexity per ``--wire-dtype`` (issue #10).

Teacher-forced perplexity on held-out text (CPython's ``pydoc_data`` topics, ``heldout.py``), one
token per forward pass, so every token crosses the wire as a decode step would: the model split
over an emulated swarm (the coordinator and ``--peers - 1`` workers in this process, in-memory
links, PLR 0, ``strict`` sync: every answer is summed, only the encoding differs), beside the
same text on one peer. Prints a Markdown table.

    python benchmarks/wire_quality.py --model smollm2-135m-instruct --tokens 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout import heldout_text
from halo_p2p.engine.local import LocalEngine
from halo_p2p.model.loader import open_model
from halo_p2p.model.threads import SWARM_THREADS, set_compute_threads
from halo_p2p.node.emulate import start_emulated_swarm
from halo_p2p.profiles import PeerProfile
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import perplexity
from halo_p2p.wire.messages import WIRE_DTYPES

SMOLLM2 = (Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct-q4_1"
           / "SmolLM2-135M-Instruct.Q4_1.gguf")


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    model = open_model(str(SMOLLM2) if args.model == "smollm2-135m-instruct" and SMOLLM2.exists() else args.model)
    ids = model.tokenizer.encode(heldout_text())[: args.tokens + 1]
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    local = LocalEngine(model.source, max_seq_len=len(ids) + 1)
    ref = await perplexity(local, ids, chunk_tokens=1)
    await local.aclose()
    rows.append({"format": "one peer (float32, no wire)", "perplexity": ref.perplexity,
                 "wall_s": time.perf_counter() - t0})
    set_compute_threads(SWARM_THREADS)
    peers = [PeerProfile(name="coordinator" if i == 0 else f"worker{i}") for i in range(args.peers)]
    for fmt in args.formats:
        t0 = time.perf_counter()
        swarm = await start_emulated_swarm(model.source, peers, SessionOptions(mode="strict", wire_dtype=fmt,
                                                                               max_seq_len=len(ids) + 1))
        try:
            res = await perplexity(swarm, ids, chunk_tokens=1)
        finally:
            await swarm.aclose()
        rows.append({"format": fmt, "perplexity": res.perplexity, "wall_s": time.perf_counter() - t0})
        print(f"{fmt}: {res.perplexity:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=1024, help="scored tokens (default 1024)")
    p.add_argument("--peers", type=int, default=4, help="emulated peers, the coordinator included (default 4)")
    p.add_argument("--formats", default=",".join(WIRE_DTYPES), help="comma-separated wire formats")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.formats = args.formats.split(",")
    rows = asyncio.run(run(args))
    base = {r["format"]: r["perplexity"] for r in rows}
    f16 = base.get("float16")
    print(f"{args.model}, {args.tokens} held-out tokens, {args.peers} emulated peers, strict, PLR 0")
    print("| wire format | perplexity | vs one peer | vs float16 on the wire |")
    print("|---|---|---|---|")
    one = rows[0]["perplexity"]
    for r in rows:
        ppl = float(r["perplexity"])  # type: ignore[arg-type]
        vs16 = f"{100 * (ppl / f16 - 1):+.3f} %" if f16 and r["format"] in WIRE_DTYPES else "-"
        print(f"| {r['format']} | {ppl:.4f} | {100 * (ppl / float(one) - 1):+.3f} % | {vs16} |")  # type: ignore[arg-type]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
