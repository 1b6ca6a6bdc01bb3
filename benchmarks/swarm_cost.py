"""What one decode token costs on real peers: CPU per process, frames, bytes, TPOT (issue #10).

A coordinator (``halo-peer generate``) and ``--workers`` joined peers (``halo-peer join``), on
loopback or in network namespaces (root; a bridge of veth links, ``--plr`` on the last worker's
link by nftables, or ``--delay-ms`` through the userspace shim).
Each configuration runs ``generate`` twice, with ``--short`` and ``--long`` greedy tokens, on the
same swarm; the difference of the two runs divided by the extra tokens is the cost of one decode
token with the prompt and the setup cancelled out:

* CPU-seconds per decode token of every process (``/proc/PID/stat`` utime + stime of each join;
  the coordinator's own ``getrusage`` from ``generate --json``);
* frames and bytes per sync point per worker, each direction (the coordinator's link counters:
  data-channel messages, heartbeats excluded);
* TPOT (median of the long run) and prefill time;
* beside them, one peer alone (``generate --local``) on the same prompt.

    python benchmarks/swarm_cost.py --model smollm2-135m-instruct               # loopback
    sudo python benchmarks/swarm_cost.py --transport netns --plrs 0,0.05 --syncs halo,strict
    python benchmarks/swarm_cost.py --model stories260K --workers 1 --json results/cost.json

Results and the commands of record are in ``docs/benchmarks.md`` §10.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.lossy import BOOT, CHAT_PROMPT, PINNED_GFLOPS, SMOLLM2, BenchError, _communicate, _stop  # noqa: E402
from halo_p2p.net.swarmkey import generate_swarm_key  # noqa: E402
from halo_p2p.testbed.netns import DeviceLink, NetnsLan, available  # noqa: E402

PROMPT = "Once upon a time"
JOIN_TIMEOUT_S, WAIT_PEERS_S, RUN_TIMEOUT_S = 120.0, 30.0, 900.0
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
Runner = Callable[[list[str], str], Awaitable[dict[str, Any]]]


def halo(threads: int | None, *args: str) -> list[str]:
    """``halo-peer ARGS`` advertising :data:`~benchmarks.lossy.PINNED_GFLOPS` (equal shares with
    ``--planner split``); ``threads`` overrides the swarm's torch threads (the threads benchmark)."""
    boot = BOOT.format(rate=PINNED_GFLOPS)
    if threads is not None:
        boot = f"import halo_p2p.model.threads as t; t.SWARM_THREADS = {threads}; " + boot
    return [sys.executable, "-c", boot, *args]


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (utime + stime, all threads) of a live process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CostBench:
    """One swarm per (transport, PLR); generate runs of two lengths per sync mode."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        models = tmp / "cache" / "halo-p2p" / "models"
        models.mkdir(parents=True)
        if SMOLLM2.exists():
            (models / SMOLLM2.name).symlink_to(SMOLLM2)
        self.env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "HALO_SWARM_KEY": generate_swarm_key(),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.logs = tmp / "logs"
        self.logs.mkdir()

    def generate(self, tokens: int, sync: str | None) -> list[str]:
        a = self.args
        where = ["--local"] if sync is None else [
            "--sync", sync, "--planner", a.planner, "--wait-peers", str(WAIT_PEERS_S), "--max-peers",
            str(a.workers + 1)]
        prompt = ["--chat", "--prompt", CHAT_PROMPT] if a.chat else ["--prompt", PROMPT]
        return halo(a.swarm_threads, "generate", "--model", a.model, *prompt, "--temperature", "0", "--max-tokens",
                    str(tokens), "--json", *where, *a.extra)

    @contextlib.asynccontextmanager
    async def swarm(self, netns: bool, plr: float) -> AsyncIterator[tuple[Runner, list[int]]]:
        """Start the joins; yields (a runner of commands on the coordinator's device, join pids)."""
        n = self.args.workers
        procs: list[asyncio.subprocess.Process] = []
        lan: NetnsLan | None = None
        async with contextlib.AsyncExitStack() as stack:
            if netns:
                delay = self.args.delay_ms / 1000     # 0: veth (nft loss), else the userspace shim
                links = [DeviceLink(0.0, delay, 0.0, seed=i) for i in range(n)]
                links.append(DeviceLink(plr, delay, 0.0, seed=n))
                lan = await stack.enter_async_context(NetnsLan(f"hc{os.getpid() % 100000}", links, replace_stale=True))
            stack.push_async_callback(_stop, procs)

            async def spawn(i: int, argv: list[str], name: str, **kw: Any) -> asyncio.subprocess.Process:
                env = {**self.env, "XDG_CONFIG_HOME": str(self.tmp / f"cfg-{name}")}
                if lan is not None:
                    p = await lan.spawn(i, [*argv, "--address", lan.address(i)], env=env, **kw)
                else:
                    p = await asyncio.create_subprocess_exec(*argv, "--interface", "lo", env=env, **kw)
                procs.append(p)
                return p

            joins = []
            for i in range(1, n + 1):
                loss = [] if lan else ["--emulate-plr", str(plr if i == n else 0.0)]
                log = stack.enter_context(open(self.logs / f"join{i}-{plr}.log", "wb"))  # noqa: SIM115, ASYNC230
                argv = halo(self.args.swarm_threads, "join", "--model", self.args.model, "--no-ui", "--name", f"dev{i}",
                            *loss)
                joins.append(await spawn(i, argv, f"dev{i}", stdout=asyncio.subprocess.PIPE, stderr=log))
            for i, p in enumerate(joins, 1):
                assert p.stdout is not None
                line = await asyncio.wait_for(p.stdout.readline(), JOIN_TIMEOUT_S)
                if not line.startswith(b"halo-peer: joined as "):
                    raise BenchError(f"peer dev{i} did not join: {line!r}")

            async def run(argv: list[str], what: str) -> dict[str, Any]:
                p = await spawn(0, argv, "coord", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                return await _communicate(p, what, RUN_TIMEOUT_S, self.logs / f"{what.replace(' ', '-')}.log")

            yield run, [p.pid for p in joins]

    async def measure(self, run: Runner, pids: list[int], sync: str | None) -> dict[str, Any]:
        """Short and long run in one mode: the per-decode-token figures."""
        out = {}
        for tokens in (self.args.short, self.args.long):
            before = [proc_cpu_s(p) for p in pids]
            t0 = time.perf_counter()
            res = await run(self.generate(tokens, sync), f"generate {sync or 'local'} {tokens}")
            res["wall_s"] = time.perf_counter() - t0
            res["join_cpu_s"] = [proc_cpu_s(p) - b for p, b in zip(pids, before, strict=True)]
            out[tokens] = res
        return figures(out[self.args.short], out[self.args.long], self.args.workers)


def figures(short: dict[str, Any], long: dict[str, Any], workers: int) -> dict[str, Any]:
    """Per-decode-token cost from two runs that differ only in the number of generated tokens."""
    d_tokens = long["generated_tokens"] - short["generated_tokens"]
    if d_tokens <= 0:
        raise BenchError(f"the long run generated {long['generated_tokens']} tokens, the short one "
                         f"{short['generated_tokens']}: use a prompt that does not stop early")
    # the coordinator's own CPU over its decode steps (less noisy than the difference of two runs)
    coord = long["decode_cpu_s"] / max(1, len(long["token_ids"]) - 1)
    joins = [(b - a) / d_tokens for a, b in zip(short.get("join_cpu_s", []), long.get("join_cpu_s", []), strict=True)]
    row: dict[str, Any] = {
        "cpu_s_per_token": coord + sum(joins), "coordinator_cpu_s_per_token": coord, "join_cpu_s_per_token": joins,
        "tpot_ms": long["tpot_ms"], "tpot_p95_ms": long["tpot_p95_ms"], "prefill_ms": long["prefill_ms"],
        "tpot_mean_ms": 1000 / long["tokens_per_s"] if long.get("tokens_per_s") else None,
        "prompt_tokens": long["prompt_tokens"], "token_ids": long["token_ids"], "text": long["text"]}
    split_s, split_l = short.get("split"), long.get("split")
    if split_s and split_l:
        n_sync = 2 * split_l["n_layers"]
        links_s, links_l = split_s["link_bytes"], split_l["link_bytes"]

        def delta(key: str) -> list[float]:
            return [(links_l[p][key] - links_s.get(p, {}).get(key, 0)) / d_tokens for p in links_l]

        row.update({
            "peers": split_l["peers"], "replans": split_l.get("replans", 0),
            "bytes_per_token": sum(delta("sent")) + sum(delta("received")),
            "frames_per_token_down": delta("frames_sent"), "frames_per_token_up": delta("frames_received"),
            "skipped_per_token": split_l["mean_skipped_groups"],
            "resends_per_token": statistics.mean(r["resends"] for r in split_l["per_token"][1:]),
            "wait_ms_per_token": split_l["mean_wait_ms"], "counters": split_l.get("counters", {}),
        })
        row["sync_points_per_token"] = n_sync
        row["frames_per_sync_down"] = [f / n_sync for f in row["frames_per_token_down"]]
        row["frames_per_sync_up"] = [f / n_sync for f in row["frames_per_token_up"]]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``docs/benchmarks.md`` §10."""
    head = ("| transport | PLR | mode | peers | CPU-s / token, all | coordinator | joins | "
            "TPOT ms median / mean (p95) | prefill ms | frames / sync / worker down, up | bytes / token | "
            "skipped groups / token | resends / token |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = r["figures"]
        joins = ", ".join(f"{c:.3f}" for c in f.get("join_cpu_s_per_token", [])) or "-"
        frames = "-"
        if "frames_per_sync_down" in f:
            frames = (f"{max(f['frames_per_sync_down']):.2f}, {max(f['frames_per_sync_up']):.2f}")
        out.append(f"| {r['transport']} | {100 * r['plr']:g} % | {r['mode']} | {f.get('peers', 1)} | "
                   f"{f['cpu_s_per_token']:.3f} | {f['coordinator_cpu_s_per_token']:.3f} | {joins} | "
                   f"{f['tpot_ms']:.1f} / {f['tpot_mean_ms']:.1f} ({f['tpot_p95_ms']:.1f}) | {f['prefill_ms']:.0f} | "
                   f"{frames} | "
                   f"{f.get('bytes_per_token', 0):,.0f} | {f.get('skipped_per_token', 0):.2f} | "
                   f"{f.get('resends_per_token', 0):.2f} |")
    return "\n".join(out)


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="halo-cost-") as tmp:
        bench = CostBench(args, Path(tmp))
        netns = args.transport == "netns"
        if netns and not available()[0]:
            raise BenchError(f"network namespaces are unavailable: {available()[1]}")
        for plr in args.plrs:
            async with bench.swarm(netns, plr) as (run, pids):
                if args.local and plr == args.plrs[0]:
                    f = await bench.measure(run, [], None)
                    rows.append({"transport": args.transport, "plr": plr, "mode": "one peer", "figures": f})
                    _log(table(rows[-1:]))
                for sync in args.syncs:
                    f = await bench.measure(run, pids, sync)
                    rows.append({"transport": args.transport, "plr": plr, "mode": sync, "figures": f})
                    _log(table(rows[-1:]))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--workers", type=int, default=3, help="joined peers besides the coordinator (default 3)")
    p.add_argument("--transport", choices=("loopback", "netns"), default="loopback")
    p.add_argument("--plrs", default="0", help="comma-separated PLRs of the last worker's link (default 0)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="one-way delay of every device's link in namespaces (default 0: veth, loss by nftables)")
    p.add_argument("--syncs", default="halo", help="comma-separated sync modes (default halo)")
    p.add_argument("--planner", choices=("split", "schedule"), default="split")
    p.add_argument("--short", type=int, default=8, help="tokens of the short run (default 8)")
    p.add_argument("--long", type=int, default=40, help="tokens of the long run (default 40)")
    p.add_argument("--no-local", dest="local", action="store_false", help="skip the one-peer reference")
    p.add_argument("--chat", action="store_true", help=f"the chat prompt {CHAT_PROMPT!r} (default: {PROMPT!r})")
    p.add_argument("--swarm-threads", type=int, default=None,
                   help="torch threads of every swarm process (default: the program's choice, SWARM_THREADS)")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    p.add_argument("extra", nargs="*", help="more generate arguments, after --")
    args = p.parse_args(argv)
    args.plrs = [float(x) for x in args.plrs.split(",")]
    args.syncs = args.syncs.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(_main(args))
    print(f"{args.model}, 1 coordinator + {args.workers} workers, {args.short} vs {args.long} tokens, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
