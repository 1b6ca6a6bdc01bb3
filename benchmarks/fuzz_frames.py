"""Fuzzed frames against ``halo_p2p.wire.codec.decode`` (issue #12): only DecodeError or a valid message.

Draws ``--frames`` frames (default 500,000) from the seeded generator of the test suite
(:class:`tests.wire_fuzz.FrameFuzzer`: bit flips, overwrites, insertions, deletions, truncations,
splices and random tails of every message kind's golden frame, crafted CBOR with bignums, 64-bit
edges, deep nesting, foreign tags, bad tag-40 shapes and dtypes, and hand-written CBOR heads) and
decodes each. Every frame that decodes is encoded and decoded again and must compare equal.

Prints the frame count, the decode rate (decode time only, not generation), the slowest single
decode, the outcomes by type (``DecodeError``, ``VersionMismatch``, each message kind) and by
strategy, and the number of non-project exceptions (any exception other than ``DecodeError`` /
``VersionMismatch``: must be 0; the first few are shown and the exit status is 1). About 15 s.

    .venv/bin/python benchmarks/fuzz_frames.py
    .venv/bin/python benchmarks/fuzz_frames.py --frames 2000000 --seed 7 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from halo_p2p.errors import DecodeError, VersionMismatch  # noqa: E402
from halo_p2p.wire import codec  # noqa: E402
from tests.wire_fuzz import FrameFuzzer, issue_examples  # noqa: E402


def run(n_frames: int, seed: int) -> dict[str, Any]:
    """Decode ``n_frames`` fuzzed frames (plus the issue's examples); return the figures."""
    fuzz = FrameFuzzer(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    by_strategy: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    foreign: list[dict[str, str]] = []
    decode_s = slowest_s = 0.0
    total_bytes = 0
    frames = [("issue", f) for f in issue_examples().values()]
    for i in range(n_frames + len(frames)):
        strategy, frame = frames[i] if i < len(frames) else fuzz.frame()
        total_bytes += len(frame)
        t0 = time.perf_counter()
        try:
            msg = codec.decode(frame)
            outcome = type(msg).__name__
        except (DecodeError, VersionMismatch) as exc:
            outcome = type(exc).__name__
        except Exception as exc:   # a non-project exception: the failure this benchmark looks for
            outcome = f"non-project {type(exc).__name__}"
            if len(foreign) < 10:
                foreign.append({"strategy": strategy, "frame": frame.hex()[:400], "error": repr(exc)[:300]})
        dt = time.perf_counter() - t0
        decode_s += dt
        slowest_s = max(slowest_s, dt)
        if outcome[0].isupper() and outcome not in ("DecodeError", "VersionMismatch"):
            again = codec.decode(codec.encode(msg))
            if again != msg:
                outcome = f"non-project round-trip mismatch {outcome}"
        outcomes[outcome] += 1
        by_strategy[strategy][outcome.split()[0] if outcome in ("DecodeError", "VersionMismatch") else
                              "non-project" if outcome.startswith("non-project") else "message"] += 1
    total = sum(outcomes.values())
    return {
        "frames": total, "seed": seed, "bytes": total_bytes, "decode_s": decode_s,
        "frames_per_s": total / decode_s, "mean_us": 1e6 * decode_s / total, "slowest_ms": 1e3 * slowest_s,
        "outcomes": dict(outcomes.most_common()),
        "by_strategy": {k: dict(v) for k, v in sorted(by_strategy.items())},
        "non_project": sum(v for k, v in outcomes.items() if k.startswith("non-project")),
        "non_project_examples": foreign,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500_000, help="fuzzed frames to decode (default 500000)")
    parser.add_argument("--seed", type=int, default=12, help="the generator's seed (default 12)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    r = run(args.frames, args.seed)
    print(f"frames decoded: {r['frames']:,} (seed {r['seed']}, {r['bytes']:,} bytes)")
    print(f"decode: {r['frames_per_s']:,.0f} frames/s ({r['mean_us']:.1f} us mean, slowest {r['slowest_ms']:.2f} ms)")
    print("outcomes:")
    for name, n in r["outcomes"].items():
        print(f"  {name:<28} {n:>9,}  {100 * n / r['frames']:6.2f} %")
    print("by strategy (message / DecodeError / VersionMismatch / non-project):")
    for name, c in r["by_strategy"].items():
        print(f"  {name:<10} {c.get('message', 0):>7,} {c.get('DecodeError', 0):>9,} {c.get('VersionMismatch', 0):>7,}"
              f" {c.get('non-project', 0):>5,}")
    print(f"non-project exceptions: {r['non_project']}")
    for ex in r["non_project_examples"]:
        print(f"  {ex['strategy']}: {ex['error']}\n    {ex['frame']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 1 if r["non_project"] else 0


if __name__ == "__main__":
    sys.exit(main())
