"""``benchmarks/lossy.py``: the quick sweep over real peers, and its tables on a synthetic result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import lossy
from halo_p2p.testbed.netns import available

REPO = Path(__file__).resolve().parents[1]


def _result(plrs: tuple[float, ...] = (0.0, 0.05)) -> dict:
    """A results.json-shaped dict with made-up figures (no peers involved)."""
    def mode(tpot: float, ppl: float) -> dict:
        return {"tpot_ms": tpot, "tpot_p95_ms": 2 * tpot, "tokens_per_s": 1000 / tpot, "bytes_per_token": 1e4,
                "skipped_per_token": 0.5, "perplexity": ppl, "token_agreement": 0.75, "peers": 5}

    cells = [{"plr": p, "delay_ms": 1.0, "errors": {}, "modes": {
        "local": mode(3.0, 10.0), "strict": mode(100 + 1000 * p, 10.0), "halo": mode(100.0, 10.5)}} for p in plrs]
    return {"model": "stories260K", "transport": "netns", "delay_emulated": True, "devices": 4, "unstable_device": 3,
            "planner": "split", "tokens": 16, "ppl_tokens": 16, "local_perplexity": 10.0, "duration_s": 12.0,
            "machine": {"cpus": 2, "load_avg": [1.0, 1.0, 1.0]}, "modes": list(lossy.MODES), "delays_ms": [1.0],
            "plrs": list(plrs), "cells": cells}


def test_quick_defaults_and_overrides() -> None:
    args = lossy.parse_args(["--quick"])
    assert (args.model, args.plrs, args.delays, args.tokens) == ("stories260K", [0.0, 0.05], [1.0], 16)
    args = lossy.parse_args(["--plrs", "0,0.1", "--tokens", "8"])
    assert (args.model, args.plrs, args.delays, args.tokens) == ("smollm2-135m-instruct", [0.0, 0.1],
                                                                 [1.0, 5.0, 20.0], 8)
    with pytest.raises(SystemExit):
        lossy.parse_args(["--plrs", "1.5"])


def test_tables_and_plots_of_a_synthetic_result(tmp_path: Path) -> None:
    res = _result()
    res["cells"][1]["errors"]["halo"] = "generate halo: timed out after 120 s"
    del res["cells"][1]["modes"]["halo"]
    md = lossy.tables(res)
    rows = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 6 + 2                                   # 2 cells x 3 modes, then strict vs halo per cell
    assert all(row.count("|") == 12 for row in rows[:6])        # a failed mode keeps the table's columns
    assert "| 1 | 5 % | halo | failed |" in md and "- delay 1 ms, PLR 5 %, halo: generate halo: timed out" in md
    assert "| 1 | 0 % | 100.0 | 100.0 | 1.00x | 10.500 (+5.00 %) | 75 % |" in md
    pytest.importorskip("matplotlib")
    assert lossy.plots(res, tmp_path) == ["tpot_vs_plr.png", "perplexity_vs_plr.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("tpot_vs_plr.png", "perplexity_vs_plr.png"))


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.timeout(330)
def test_quick_sweep_over_real_peers(tmp_path: Path) -> None:
    """The quick sweep: every cell measured in every mode, and halo not slower than strict at PLR 5 %."""
    ok, why = available()
    argv = [sys.executable, str(REPO / "benchmarks" / "lossy.py"), "--quick", "--out", str(tmp_path)]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired as e:      # the benchmark's own bounds should have fired first
        pytest.fail(f"the quick sweep took over 300 s: {e.stderr}")
    path = tmp_path / "results.json"
    if not path.exists():
        pytest.fail(f"no results.json (exit {run.returncode}): {run.stderr[-2000:]}")
    res = json.loads(path.read_text())
    if all("did not join" in c["errors"].get("swarm", "") for c in res["cells"]):
        pytest.skip(f"no swarm could start (namespaces: {why}; loopback peers did not join): "
                    f"{res['cells'][0]['errors']['swarm'][:300]}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert res["transport"] == ("netns" if ok else "loopback")
    assert res["model"] == "stories260K" and res["modes"] == ["local", "strict", "halo"]
    assert sorted(c["plr"] for c in res["cells"]) == [0.0, 0.05] == res["plrs"]
    for c in res["cells"]:
        assert c["errors"] == {}, c["errors"]
        assert sorted(c["modes"]) == ["halo", "local", "strict"]
        for mode, m in c["modes"].items():
            assert all(m[k] is not None for k in lossy.METRICS), (c["plr"], mode, m)
            assert m["peers"] == (1 if mode == "local" else 5), (c["plr"], mode)   # coordinator + 4 joins
            assert (m["bytes_per_token"] > 0) == (mode != "local")
    lossy5 = next(c for c in res["cells"] if c["plr"] == 0.05)["modes"]
    assert lossy5["halo"]["tpot_ms"] <= lossy5["strict"]["tpot_ms"], (lossy5["halo"], lossy5["strict"])
    assert lossy5["halo"]["unstable_bytes_share"] > 0              # the unstable peer did compute groups
    md = (tmp_path / "results.md").read_text()
    assert "| 1 | 5 % | halo |" in md and md in run.stdout
