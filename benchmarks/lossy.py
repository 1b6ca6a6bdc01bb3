"""HALO's claims with real peers: strict vs halo over a lossy, delayed LAN, with plots.

Real ``halo-peer join`` processes: device 0 (where the prompts run; it joins too) and 3 workers,
the last one unstable. With root, each device is a network namespace on an emulated LAN
(:class:`~halo_p2p.testbed.netns.NetnsLan`): every link 1 ms one-way, the unstable one the cell's
PLR and delay. Else loopback peers: the unstable one drops a PLR share of the frames on its
unreliable channel (halo's); strict's reliable channel and the delay are *not* emulated. A LAN's
conditions are fixed at creation: one LAN and swarm per (PLR, delay) cell. Per cell, from device
0: ``generate`` (greedy) and ``perplexity --chunk-tokens 1`` (a bounded prefix of the held-out
text) with ``--sync strict`` and ``halo``; ``--local`` once.

    python benchmarks/lossy.py [--model smollm2-135m-instruct|stories260K] [--quick] [--out results/lossy]

Writes ``results.json``, ``results.md``, ``tpot_vs_plr.png`` and ``perplexity_vs_plr.png`` (with
matplotlib: ``pip install -e '.[bench]'``) and the joins' logs into ``--out``; prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.heldout import heldout_text  # noqa: E402
from halo_p2p.net.swarmkey import generate_swarm_key  # noqa: E402
from halo_p2p.testbed.netns import DeviceLink, NetnsLan, available  # noqa: E402

SMOLLM2 = REPO.parent / "shared" / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("smollm2-135m-instruct", "stories260K")
MODES = ("local", "strict", "halo")
WORKERS = 3
BASE_DELAY_MS = 1.0
JOIN_TIMEOUT_S, WAIT_PEERS_S = 120.0, 30.0
CHAT_PROMPT = "Write a short story about a robot who learns to paint."
STORY_PROMPT = "Once upon a time"
METRICS = ("tpot_ms", "tpot_p95_ms", "tokens_per_s", "bytes_per_token", "skipped_per_token", "perplexity",
           "token_agreement")
FULL = {"model": MODELS[0], "plrs": [0.0, 0.01, 0.02, 0.05, 0.1], "delays": [1.0, 5.0, 20.0], "tokens": 32,
        "ppl_tokens": 64, "timeout": 1800.0}
QUICK = {"model": MODELS[1], "plrs": [0.0, 0.05], "delays": [1.0], "tokens": 16, "ppl_tokens": 16, "timeout": 120.0}
PINNED_GFLOPS = 10.0
"""The compute rate every process advertises: the probe, run by 5 processes on a busy machine,
varies tenfold, and plans follow it (a peer may get no group at all). Alike rates + ``--planner
split`` give every peer, the unstable one included, an even share."""
BOOT = ("import sys, halo_p2p.node.peer as p; p.measure_gflops = lambda *a, **k: {rate}; "
        "from halo_p2p.cli.main import main; sys.exit(main())")
LOOPBACK_NOTE = (" (loopback: loss emulated on the unstable peer's unreliable channel only, so strict sees none; "
                 "delay NOT emulated; mDNS shows any other swarm on this host)")
Runner = Callable[[list[str], str], Awaitable[dict[str, Any]]]


class BenchError(RuntimeError):
    """A peer or command of the benchmark failed (the message names it and ends with its stderr)."""


def halo(*args: str) -> list[str]:
    """``halo-peer ARGS`` advertising :data:`PINNED_GFLOPS`."""
    return [sys.executable, "-c", BOOT.format(rate=PINNED_GFLOPS), *args]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    """Terminate ``procs`` (SIGKILL after 10 s)."""
    for p in (p for p in procs if p.returncode is None):
        p.terminate()
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), 10)
        except TimeoutError:
            p.kill()
            await p.wait()


async def _communicate(proc: asyncio.subprocess.Process, what: str, timeout_s: float, log: Path) -> dict[str, Any]:
    """The JSON printed by ``proc`` (its stderr goes to ``log``); kills it after ``timeout_s`` seconds."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise BenchError(f"{what}: timed out after {timeout_s:.0f} s") from None
    await asyncio.to_thread(log.write_bytes, err)
    if proc.returncode != 0:
        raise BenchError(f"{what}: exit {proc.returncode}: {err.decode(errors='replace')[-800:]}")
    return json.loads(out)


class LossyBench:
    """One sweep: environment, held-out text, local reference, then one swarm per cell."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp, self.t0 = args, tmp, time.perf_counter()
        self.netns = not args.loopback and available()[0]
        (tmp / "cache" / "halo-p2p" / "models").mkdir(parents=True)
        if SMOLLM2.exists():   # "pulled" without a download
            (tmp / "cache" / "halo-p2p" / "models" / SMOLLM2.name).symlink_to(SMOLLM2)
        elif args.model == MODELS[0]:
            raise BenchError(f"{SMOLLM2} is absent: put the shared folder beside the checkout")
        self.env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "HALO_SWARM_KEY": generate_swarm_key(),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.text_file, self.logs = tmp / "heldout.txt", args.out / "logs"   # every process's stderr (-v)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.reference, self.local_ppl, self.local = [], None, {}   # the local run's ids, perplexity, figures
        self.devices: dict[str, str] = {}   # peer id -> device name, for the per-link bytes

    def log(self, msg: str) -> None:
        """Progress on stderr, with the seconds since the start."""
        _log(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}")

    def peer_env(self, name: str) -> dict[str, str]:
        """The environment of one process: its own ``XDG_CONFIG_HOME``, hence its own peer id."""
        return {**self.env, "XDG_CONFIG_HOME": str(self.tmp / f"cfg-{name}")}

    def prepare_text(self) -> int:
        """Write the longest prefix of the held-out text with at most ``--ppl-tokens`` + 1 ids; returns its ids."""
        from halo_p2p.model.loader import open_model

        tok = open_model(str(SMOLLM2) if self.args.model == MODELS[0] else self.args.model).tokenizer
        text = re.sub(r"\*{3,} ?", "", heldout_text())   # without the topics' underlines of asterisks
        lo, hi = 1, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(tok.encode(text[:mid])) <= self.args.ppl_tokens + 1 else (lo, mid - 1)
        self.text_file.write_text(text[:lo], encoding="utf-8")
        return len(tok.encode(text[:lo]))

    def command(self, what: str, mode: str) -> list[str]:
        """``generate`` (greedy) or ``perplexity`` (token by token) in ``mode`` (local, strict or halo)."""
        sync = ["--local"] if mode == "local" else ["--sync", mode, "--wait-peers", str(WAIT_PEERS_S),
                                                    "--max-peers", str(WORKERS + 1), "--planner", self.args.planner]
        sync += ["--dynamic-placement"] if mode == "halo" and self.args.dynamic_placement else []
        v = [] if mode == "local" else ["-v"]   # the coordinator's INFO log goes to logs/
        if what == "perplexity":
            return halo(*v, what, "--model", self.args.model, "--text-file", str(self.text_file), "--chunk-tokens",
                        "1", "--json", *sync)
        prompt = ["--chat", "--prompt", CHAT_PROMPT] if self.args.model == MODELS[0] else ["--prompt", STORY_PROMPT]
        return halo(*v, what, "--model", self.args.model, *prompt, "--temperature", "0", "--max-tokens",
                    str(self.args.tokens), "--json", *sync)

    async def run_local(self, what: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(*self.command(what, "local"), env=self.peer_env("local"),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return await _communicate(proc, f"{what} local", self.args.timeout, self.logs / f"{what}-local.log")

    @contextlib.asynccontextmanager
    async def swarm(self, plr: float, delay_ms: float | None) -> AsyncIterator[Runner]:
        """Start the 4 joins (one LAN per cell); yields a runner of commands on device 0; always cleans up."""
        n, tag = WORKERS + 1, f"p{round(1000 * plr)}d{delay_ms}"
        lan: NetnsLan | None = None
        procs: list[asyncio.subprocess.Process] = []
        async with contextlib.AsyncExitStack() as stack:
            logs = [await asyncio.to_thread(open, self.logs / f"join-{tag}-dev{i}.log", "wb") for i in range(n)]
            for f in logs:
                stack.callback(f.close)
            if self.netns:
                devices = [DeviceLink(0.0, BASE_DELAY_MS / 1000, 0.0, seed=i) for i in range(n - 1)]
                devices.append(DeviceLink(plr, (delay_ms or BASE_DELAY_MS) / 1000, 0.0, seed=n - 1))
                lan = await stack.enter_async_context(NetnsLan(f"hl{os.getpid() % 100000}", devices,
                                                               replace_stale=True))
            else:
                stack.push_async_callback(_stop, procs)

            async def spawn(i: int, argv: list[str], name: str, stderr: Any) -> asyncio.subprocess.Process:
                kw = {"env": self.peer_env(f"{tag}-{name}"), "stdout": asyncio.subprocess.PIPE, "stderr": stderr}
                if lan is not None:
                    return await lan.spawn(i, [*argv, "--address", lan.address(i)], **kw)
                procs.append(await asyncio.create_subprocess_exec(*argv, "--interface", "lo", **kw))
                return procs[-1]

            joins = []
            for i in range(n):   # on loopback, the unstable peer drops frames inside its links
                loss = [] if lan else ["--emulate-plr", str(plr if i == n - 1 else 0.0)]
                argv = halo("-v", "join", "--model", self.args.model, "--no-ui", "--name", f"dev{i}", *loss)
                joins.append(await spawn(i, argv, f"dev{i}", logs[i]))
            for i, p in enumerate(joins):
                assert p.stdout is not None
                with contextlib.suppress(TimeoutError):
                    line = await asyncio.wait_for(p.stdout.readline(), JOIN_TIMEOUT_S)
                    if line.startswith(b"halo-peer: joined as "):   # "... as PEER_ID (NAME) at ADDRESS:PORT"
                        self.devices[line.split()[3].decode()] = f"dev{i}"
                        continue
                logs[i].flush()
                tail = (await asyncio.to_thread(Path(logs[i].name).read_text, errors="replace"))[-800:]
                raise BenchError(f"peer dev{i} did not join within {JOIN_TIMEOUT_S:.0f} s: {tail}")
            self.log(f"  swarm of {n} peers up")

            async def run(argv: list[str], what: str) -> dict[str, Any]:
                log = self.logs / f"{what.split()[0]}-{what.split()[1]}-{tag}.log"   # e.g. generate-halo-p50d1.0
                return await _communicate(await spawn(0, argv, "c", asyncio.subprocess.PIPE), what, self.args.timeout,
                                          log)

            yield run

    def figures(self, gen: dict[str, Any], ppl: dict[str, Any] | None) -> dict[str, Any]:
        """The metrics of one mode in one cell, from ``generate --json`` and ``perplexity --json``."""
        split, ppl, ref = gen.get("split") or {}, ppl or {}, self.reference
        per_link = {self.devices.get(k, k): v["sent"] + v["received"] for k, v in split.get("link_bytes", {}).items()}
        total, records = sum(per_link.values()), split.get("per_token", [])[1:]
        return {"tpot_ms": gen["tpot_ms"], "tpot_p95_ms": gen["tpot_p95_ms"], "tokens_per_s": gen["tokens_per_s"],
                "bytes_per_token": total / max(1, gen["generated_tokens"]), "link_bytes": per_link,
                "unstable_bytes_share": per_link.get(f"dev{WORKERS}", 0) / total if total else None,
                "skipped_per_token": split.get("mean_skipped_groups", 0.0),
                "wait_ms_per_token": split.get("mean_wait_ms", 0.0),
                "resends_per_token": sum(r["resends"] for r in records) / len(records) if records else 0.0,
                "perplexity": ppl.get("perplexity", self.local_ppl),
                "ppl_skipped_per_token": (ppl.get("split") or {}).get("mean_skipped_groups", 0.0),
                "token_agreement": sum(a == b for a, b in zip(gen["token_ids"], ref, strict=False)) / max(1, len(ref)),
                "generated_tokens": gen["generated_tokens"], "prompt_tokens": gen["prompt_tokens"],
                "peers": split.get("peers", 1), "replans": split.get("replans", 0), "prefill_ms": gen.get("prefill_ms"),
                "counters": split.get("counters", {}), "text": gen["text"]}

    async def cell(self, plr: float, delay_ms: float | None) -> dict[str, Any]:
        """One (PLR, delay) cell: a fresh swarm, strict then halo; ``local`` is the run's one local measurement."""
        t0 = time.perf_counter()
        out: dict[str, Any] = {"plr": plr, "delay_ms": delay_ms, "modes": {"local": self.local}, "errors": {}}
        try:
            async with self.swarm(plr, delay_ms) as run:
                for mode in self.args.modes:
                    label = f"{mode} PLR {100 * plr:g} % delay {delay_ms} ms"
                    try:
                        gen = await run(self.command("generate", mode), f"generate {label}")
                        try:
                            ppl = await run(self.command("perplexity", mode), f"perplexity {label}")
                        except BenchError as e:   # the generation's figures stand; perplexity is missing
                            ppl, out["errors"][mode] = {"perplexity": None}, str(e)
                        out["modes"][mode] = self.figures(gen, ppl)
                    except BenchError as e:
                        out["errors"][mode] = str(e)
                    self.log(f"  {label}: {_brief(out['modes'].get(mode)) or out['errors'][mode]}")
        except Exception as e:   # the swarm did not start (or clean up): the cell is reported as failed
            out["errors"]["swarm"] = f"{type(e).__name__}: {e}"
            self.log(f"  cell PLR {100 * plr:g} % delay {delay_ms} ms failed: {e}")
        out["wall_s"] = time.perf_counter() - t0
        return out

    async def run(self) -> dict[str, Any]:
        """The whole sweep; returns what ``results.json`` holds."""
        load, a = os.getloadavg(), self.args
        delays: list[float | None] = list(a.delays) if self.netns else [None]
        transport = "netns" if self.netns else "loopback"
        n_text = await asyncio.to_thread(self.prepare_text)
        self.log(f"{a.model}: {transport} swarm of 1 coordinator device + {WORKERS} workers; held-out text "
                 f"{n_text} ids; PLR {a.plrs}; delays {delays} ms")
        if not self.netns:
            self.log(f"network namespaces unavailable or --loopback{LOOPBACK_NOTE}")
        ref = await self.run_local("generate")
        self.reference, self.local_ppl = ref["token_ids"], (await self.run_local("perplexity"))["perplexity"]
        self.local = {**self.figures(ref, None), "measured_once": True}
        self.log(f"local: {_brief(self.local)}")
        cells = []
        for delay in delays:
            for plr in a.plrs:
                self.log(f"cell PLR {100 * plr:g} %, delay {delay} ms")
                cells.append(await self.cell(plr, delay))
        return {"model": a.model, "transport": transport, "delay_emulated": self.netns, "devices": WORKERS + 1,
                "unstable_device": WORKERS, "base_delay_ms": BASE_DELAY_MS if self.netns else None,
                "pinned_gflops": PINNED_GFLOPS, "planner": a.planner, "dynamic_placement": a.dynamic_placement,
                "tokens": a.tokens, "ppl_tokens": n_text - 1, "plrs": a.plrs, "delays_ms": delays,
                "modes": ["local", *a.modes], "local_perplexity": self.local_ppl, "reference_tokens": self.reference,
                "cells": cells, "machine": {"cpus": os.cpu_count(), "load_avg": load, "platform": platform.platform()},
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "duration_s": time.perf_counter() - self.t0}


def _brief(m: dict[str, Any] | None) -> str:
    return "" if not m else (f"TPOT {m['tpot_ms']:.1f} ms, skipped {m['skipped_per_token']:.2f}/token, ppl "
                             f"{_f(m['perplexity'], '.3f')}, agreement {100 * m['token_agreement']:.0f} %, "
                             f"peers {m['peers']}, re-plans {m.get('replans', 0)}")


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def tables(res: dict[str, Any]) -> str:
    """``results.md``: every cell and mode, strict vs halo, then the failures."""
    delay = "" if res["delay_emulated"] else LOOPBACK_NOTE
    lines = [f"# Lossy LAN benchmark: {res['model']}", "",
             f"{res['transport']} swarm: {res['devices']} devices, device {res['unstable_device']} unstable{delay}, "
             f"planner {res['planner']}; {res['tokens']} greedy tokens (bytes/token include the prompt's); "
             f"perplexity on {res['ppl_tokens']} held-out tokens, one per forward (local "
             f"{_f(res['local_perplexity'], '.3f')}); {res['duration_s']:.0f} s on {res['machine']['cpus']} CPUs "
             f"(load {res['machine']['load_avg'][0]:.1f}).", "",
             "| delay (ms) | PLR | mode | TPOT median (ms) | TPOT p95 (ms) | tokens/s | bytes/token | "
             "skipped groups/token | perplexity | agreement | peers |", "|" + "---|" * 11]
    for c in res["cells"]:
        for mode in res["modes"]:
            m, head = c["modes"].get(mode), f"| {_f(c['delay_ms'], 'g')} | {100 * c['plr']:g} % | {mode} |"
            if m is None:
                lines.append(f"{head} failed |" + " |" * 7)
                continue
            lines.append(f"{head} {_f(m['tpot_ms'])} | {_f(m['tpot_p95_ms'])} | {_f(m['tokens_per_s'])} | "
                         f"{m['bytes_per_token']:.0f} | {m['skipped_per_token']:.2f} | {_f(m['perplexity'], '.3f')} | "
                         f"{100 * m['token_agreement']:.0f} % | {m['peers']} |")
    lines += ["", "| delay (ms) | PLR | strict TPOT (ms) | halo TPOT (ms) | speedup | halo perplexity (Δ vs local) | "
              "halo agreement |", "|" + "---|" * 7]
    base = res["local_perplexity"]
    for c in res["cells"]:
        s, h = c["modes"].get("strict"), c["modes"].get("halo")
        speed = f"{s['tpot_ms'] / h['tpot_ms']:.2f}x" if s and h and s["tpot_ms"] and h["tpot_ms"] else "-"
        ppl = f"{h['perplexity']:.3f} ({100 * (h['perplexity'] / base - 1):+.2f} %)" if h and h["perplexity"] else "-"
        lines.append(f"| {_f(c['delay_ms'], 'g')} | {100 * c['plr']:g} % | {_f(s and s['tpot_ms'])} | "
                     f"{_f(h and h['tpot_ms'])} | {speed} | {ppl} | {_f(h and 100 * h['token_agreement'], '.0f')} % |")
    failures = [f"- delay {_f(c['delay_ms'], 'g')} ms, PLR {100 * c['plr']:g} %, {what}: {' '.join(why.split())}"
                for c in res["cells"] for what, why in c["errors"].items()]
    return "\n".join([*lines, *(["", "Failures:", "", *failures] if failures else [])]) + "\n"


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """``tpot_vs_plr.png`` (a panel per delay) and ``perplexity_vs_plr.png``; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    delays, colors = res["delays_ms"], {"local": "tab:blue", "strict": "tab:orange", "halo": "tab:green"}
    fig, axes = plt.subplots(1, len(delays), figsize=(4.5 * len(delays), 3.6), squeeze=False, sharey=True)
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for k, (ax, delay) in enumerate(zip(axes[0], delays, strict=True)):
        for mode in res["modes"]:
            pts = [(100 * c["plr"], c["modes"][mode]) for c in res["cells"]
                   if c["delay_ms"] == delay and mode in c["modes"]]
            x, tpot = [p for p, _ in pts], [m["tpot_ms"] for _, m in pts]
            ax.errorbar(x, tpot, yerr=[[0] * len(pts), [m["tpot_p95_ms"] - m["tpot_ms"] for _, m in pts]],
                        marker="o", capsize=3, label=mode, color=colors[mode])
            if mode != "local" and pts:
                ppl = [m["perplexity"] or float("nan") for _, m in pts]   # nan: perplexity failed
                ax2.plot(x, ppl, marker="os^v"[k % 4], linestyle=("-", "--", ":")[k % 3], color=colors[mode],
                         label=f"{mode}, delay {'n/a' if delay is None else f'{delay:g} ms'}")
        ax.set(title="delay not emulated" if delay is None else f"unstable link: {delay:g} ms one-way",
               xlabel="PLR of the unstable link (%)", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TPOT median (ms; bar to p95)")
    axes[0][0].legend()
    fig.suptitle(f"{res['model']}: time per output token, {res['transport']} swarm")
    if res["local_perplexity"]:
        ax2.axhline(res["local_perplexity"], color=colors["local"], linewidth=1, label="local")
    ax2.set(xlabel="PLR of the unstable link (%)", ylabel=f"perplexity ({res['ppl_tokens']} held-out tokens)",
            title=f"{res['model']}: perplexity under loss")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    names = ["tpot_vs_plr.png", "perplexity_vs_plr.png"]
    for f, name in zip((fig, fig2), names, strict=True):
        f.tight_layout()
        f.savefig(out / name, dpi=120)
        plt.close(f)
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI; ``--quick`` picks stories260K, PLR 0/5 %, delay 1 ms and short runs unless given."""
    floats = lambda s: [float(x) for x in s.split(",")]   # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=None, help="default smollm2-135m-instruct (--quick: stories260K)")
    p.add_argument("--quick", action="store_true", help="PLR 0,5 %%, delay 1 ms, 16 tokens, 16 perplexity tokens")
    p.add_argument("--out", type=Path, default=Path("results/lossy"), help="results folder (default results/lossy)")
    p.add_argument("--plrs", type=floats, default=None, help="PLRs of the unstable link, e.g. 0,0.05")
    p.add_argument("--delays", type=floats, default=None, help="one-way delays of the unstable link (ms), e.g. 1,20")
    p.add_argument("--tokens", type=int, default=None, help="greedy tokens per generation (default 32, quick 16)")
    p.add_argument("--ppl-tokens", type=int, default=None, help="held-out tokens scored (default 64, quick 16)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["strict", "halo"],
                   help="swarm modes, e.g. halo (default strict,halo; local always runs once)")
    p.add_argument("--planner", choices=("split", "schedule"), default="split",
                   help="split (default): even shares, the unstable peer's included; schedule: the scheduler's plan")
    p.add_argument("--dynamic-placement", action="store_true", help="pass --dynamic-placement to the halo runs")
    p.add_argument("--loopback", action="store_true", help="loopback peers even when namespaces are available")
    p.add_argument("--timeout", type=float, default=None, help="bound of each command (s; default 1800, quick 120)")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if not all(0 <= x < 1 for x in args.plrs) or any(d < 0 for d in args.delays):
        p.error("PLRs must be in [0, 1) and delays >= 0")
    if not args.modes or not set(args.modes) <= set(MODES[1:]):
        p.error("--modes takes strict and/or halo")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)   # clean up on kill too
    with tempfile.TemporaryDirectory(prefix="halo-lossy-") as tmp:
        return await LossyBench(args, Path(tmp)).run()


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, write the results folder, print the tables; exit 1 if anything failed."""
    args = parse_args(argv)
    try:
        res = asyncio.run(_main(args))
    except BenchError as e:
        _log(f"lossy: error: {e}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _log("lossy: interrupted (peers and namespaces removed)")
        return 130
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    md = tables(res)
    (args.out / "results.md").write_text(md)
    names = plots(res, args.out)
    print(md)
    print(f"{res['duration_s']:.0f} s; wrote {', '.join(['results.json', 'results.md', *names])} to {args.out}")
    return 1 if any(c["errors"] for c in res["cells"]) else 0


if __name__ == "__main__":
    sys.exit(main())
