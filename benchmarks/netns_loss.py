"""Issue #4 benchmark: real peers in network namespaces, one worker's link at PLR 0 and 5 %.

Three `halo-peer join` devices on an emulated LAN (veth + bridge, nftables loss on device 2's
link, 1 ms one-way delay via the L2 shim), prompts from device 0 (a fourth peer, the coordinator),
SmolLM2, strict and halo. Needs root:

    python benchmarks/netns_loss.py [--tokens 16] [--planner schedule]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halo_p2p.net.swarmkey import generate_swarm_key
from tests.conftest import SMOLLM2_GGUF
from tests.test_swarm_integration import netns_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--planner", choices=("schedule", "split"), default="schedule")
    p.add_argument("--out", type=Path, default=Path("results/netns_loss.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache" / "halo-p2p" / "models"
        cache.mkdir(parents=True)
        (cache / SMOLLM2_GGUF.name).symlink_to(SMOLLM2_GGUF)
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache"), "HALO_SWARM_KEY": generate_swarm_key()}
        res = {f"plr{int(100 * plr)}": asyncio.run(netns_run(env, Path(tmp), plr, planner=args.planner,
                                                             tokens=args.tokens)) for plr in (0.0, 0.05)}
    rows = []
    for cell, by_mode in res.items():
        for mode, r in by_mode.items():
            pt = r["split"]["per_token"][1:]
            rows.append({"cell": cell, "mode": mode, "peers": r["split"]["peers"], "replans": r["split"].get("replans"),
                         "prefill_ms": r["prefill_ms"], "tpot_ms": r["tpot_ms"], "tpot_p95_ms": r["tpot_p95_ms"],
                         "skipped_groups_per_token": r["split"]["mean_skipped_groups"],
                         "wait_ms_per_token": statistics.mean(t["wait_ms"] for t in pt) if pt else None,
                         "resends_per_token": statistics.mean(t["resends"] for t in pt) if pt else None,
                         "text": r["text"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "raw": res}, indent=1))
    # peers/re-plans first: a run that lost the lossy peer (re-planned without it) is no measurement of loss
    print("| PLR | mode | peers | re-plans | prefill (ms) | TPOT median (ms) | p95 (ms) | wait per token (ms) | "
          "skipped groups/token | resends/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell'][3:]} % | {r['mode']} | {r['peers']} | {r['replans']} | {r['prefill_ms']:.0f} | "
              f"{r['tpot_ms']:.0f} | {r['tpot_p95_ms']:.0f} | "
              f"{r['wait_ms_per_token']:.0f} | {r['skipped_groups_per_token']:.2f} | {r['resends_per_token']:.2f} |")


if __name__ == "__main__":
    main()
