"""The sub-commands of ``halo-peer`` (called by :func:`halo_p2p.cli.main.main`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from halo_p2p.cli.checks import lossy_indices
from halo_p2p.cli.notices import emulated_peer_name, notices, print_notices
from halo_p2p.engine.local import LocalEngine
from halo_p2p.engine.protocol import Engine
from halo_p2p.errors import ConfigError, ModelNotFound
from halo_p2p.model.chat import Message, require_template
from halo_p2p.model.loader import LoadedModel, open_model
from halo_p2p.model.pull import pull
from halo_p2p.model.registry import KNOWN_MODELS, list_models
from halo_p2p.model.threads import LOCAL_THREADS, SWARM_THREADS, set_compute_threads
from halo_p2p.net.link import LinkConditions
from halo_p2p.node.emulate import start_emulated_swarm
from halo_p2p.node.library import file_sha256
from halo_p2p.predictor import Predictor, load_predictor_for
from halo_p2p.profiles import PeerProfile
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.bench import bench
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import Generator, perplexity
from halo_p2p.session.replan import SplitEngine
from halo_p2p.session.setup import Critical, Planner, SessionSetup

__all__ = ["run"]

log = logging.getLogger(__name__)

err = Console(stderr=True)


async def run(args: argparse.Namespace) -> int:
    """Dispatch ``args.command``; returns the exit status."""
    from halo_p2p.cli import peers, swarm_cmd

    handler = {
        "models": cmd_models, "pull": cmd_pull, "generate": cmd_generate,
        "perplexity": cmd_perplexity, "chat": cmd_chat, "bench": cmd_bench,
        "calibrate": cmd_calibrate, "init": peers.cmd_init, "join": peers.cmd_join, "peers": peers.cmd_peers,
        "swarm": swarm_cmd.cmd_swarm,
    }[args.command]
    if args.command in ("join", "peers"):
        peers.swarm_key(args)               # a missing, corrupt or unsafe key fails before anything starts
    elif hasattr(args, "local") and not args.local and not args.emulate_peers:
        peers.optional_swarm_key(args)      # a corrupt or unsafe key fails before the model loads
    return await handler(args)


def sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_tokens)


async def cmd_models(args: argparse.Namespace) -> int:
    table = Table("name", "format", "size", "status", "path", title="models")
    for m in list_models():
        size = f"{m.size_bytes / 1e6:.1f} MB" if m.size_bytes else "?"
        table.add_row(m.name, m.format, size, m.status, str(m.path or ""))
    Console().print(table)
    return 0


def _pull_with_progress(name: str) -> Path:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"pull {name}", total=None)

        def report(phase: str, done: int, total: int | None) -> None:
            progress.update(task, description=f"{phase} {name}", completed=done, total=total)

        return pull(name, progress=report)


async def cmd_pull(args: argparse.Namespace) -> int:
    path = await asyncio.to_thread(_pull_with_progress, args.name)
    err.print(f"[green]ok[/] {args.name}: {path}")
    return 0


async def load(args: argparse.Namespace) -> LoadedModel:
    """Open ``--model``; a known model that is not downloaded yet is pulled first."""
    try:
        return await asyncio.to_thread(open_model, args.model, tokenizer_path=args.tokenizer)
    except ModelNotFound:
        if args.model not in KNOWN_MODELS:
            raise
        err.print(f"model {args.model} is not downloaded yet: pulling it")
        await asyncio.to_thread(_pull_with_progress, args.model)
        return await asyncio.to_thread(open_model, args.model, tokenizer_path=args.tokenizer)


async def make_engine(args: argparse.Namespace, model: LoadedModel) -> Engine:
    """A local engine, or an emulated split model with ``--emulate-peers N``."""
    if getattr(args, "emulate_peers", 0):
        return await emulated_engine(args, model)
    if hasattr(args, "local"):
        from halo_p2p.cli.peers import swarm_engine

        engine = await swarm_engine(args, model)
        if engine is not None:
            return engine
    set_compute_threads(LOCAL_THREADS)              # the whole model here: large products pay for threads
    return await asyncio.to_thread(LocalEngine, model.source, max_seq_len=args.ctx, dtype=args.dtype)


async def session_setup(args: argparse.Namespace, model: LoadedModel, *,
                        planner: Planner | str | None = None) -> tuple[SessionSetup, Predictor | None]:
    """The split-model choices of the flags, the same for an emulated and a real swarm.

    ``halo`` waits for the semantic-aware predictor's critical groups when this model has one
    (calibrated or shipped, default group size), else for the static rule's; the strict modes
    wait for every group.
    """
    predictor = None
    if args.sync == "halo" and args.mlp_group_size is None:
        predictor = load_predictor_for(await asyncio.to_thread(file_sha256, model.path))
    setup = SessionSetup(planner=Planner.of(planner or args.planner),
                         critical=Critical.PREDICTOR if args.sync == "halo" else Critical.ALL,
                         critical_fraction=args.critical_fraction, mlp_group_size=args.mlp_group_size,
                         dynamic_placement=args.dynamic_placement)
    return setup, predictor


def session_options(args: argparse.Namespace, model: LoadedModel) -> SessionOptions:
    ctx = args.ctx or min(model.source.config.max_seq_len, 2048)
    return SessionOptions(mode=args.sync, wire_dtype=args.wire_dtype, max_seq_len=ctx)


async def emulated_engine(args: argparse.Namespace, model: LoadedModel) -> SplitEngine:
    n = args.emulate_peers                          # flags checked at the edge (cli/checks.py)
    set_compute_threads(SWARM_THREADS)              # N emulated peers, each a compute thread on its own share
    shares = args.shares or [1.0] * n
    lossy = lossy_indices(n, args.lossy_peers)
    profiles = []
    for i in range(n):
        link = LinkConditions(plr=args.plr if i in lossy else 0.0, delay_s=args.delay_ms / 1000,
                              jitter_s=args.jitter_ms / 1000, rto_s=args.rto_ms / 1000)
        profiles.append(PeerProfile(name=emulated_peer_name(i), share=shares[i], link=link))
    setup, predictor = await session_setup(args, model, planner=Planner.SPLIT if args.shares else None)
    return await start_emulated_swarm(model.source, profiles, session_options(args, model),
                                      mlp_group_size=setup.mlp_group_size, critical=setup.critical,
                                      critical_fraction=setup.critical_fraction, seed=args.link_seed,
                                      planner=setup.planner, dynamic=setup.dynamic_placement, predictor=predictor)


def split_report(engine: Engine, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The per-token synchronization figures of a split model (empty for a local engine).

    ``max_wall_ms`` is the slowest decode step's wall time, a lost peer's stall included
    (detection, re-plan and replay); ``replan_events`` says when, why and at what cost the plan
    changed."""
    if not isinstance(engine, SplitEngine):
        return {}
    st = engine.status()
    emulated = st.emulated
    return {"split": {
        "peers": len(st.peers), "sync": args.sync,
        "n_layers": st.plan.layout.n_layers, "wire_dtype": st.wire_dtype,
        "emulated": emulated,
        "plr": args.plr if emulated else None, "delay_ms": args.delay_ms if emulated else None,
        "peer_ids": list(st.peers),
        "weight_bytes": dict(st.weight_bytes) if st.weight_bytes is not None else None,
        "counters": dict(st.counters),
        "link_bytes": {peer: {"sent": ls.bytes_sent, "received": ls.bytes_received, "frames_sent": ls.frames_sent,
                              "frames_received": ls.frames_received, "rtt_ms": ls.rtt_ms,
                              "measured_plr": ls.measured_plr}
                       for peer, ls in st.links.items()},
        "mean_wait_ms": st.summary.mean_wait_ms,
        "mean_skipped_groups": st.summary.mean_skipped_groups,
        "criticality_recall": st.summary.criticality_recall,
        "replans": st.replans,
        "moved_groups": st.moved_groups,
        "lost_peers": sorted(st.lost),
        "replan_events": [e.as_dict() for e in st.events],     # why, whom, silence before, cost
        "max_wall_ms": max((1000 * r.wall_s for r in st.records[1:] if r.wall_s is not None), default=None),
        "per_token": [r.as_dict() for r in st.records],         # wall_ms (stalls included) next to wait_ms
    }}


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def chat_prompt(model: LoadedModel, messages: list[Message]) -> str:
    return require_template(model.chat_template, model.name).render(messages, add_generation_prompt=True)


async def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling(args)
    model = await load(args)
    if args.chat:
        system = [Message("system", args.system)] if args.system else []
        ids = model.tokenizer.encode(chat_prompt(model, [*system, Message("user", args.prompt)]))
    else:
        ids = model.tokenizer.encode(args.prompt)
    engine = await make_engine(args, model)
    try:
        warnings = notices(engine, args)
        print_notices(warnings)
        gen = Generator(engine, model.tokenizer)
        pieces: list[str] = []
        async for event in gen.stream(ids, params):
            pieces.append(event.text)
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        report = split_report(engine, args)
    finally:
        await engine.aclose()
    s = gen.stats
    if args.json:
        print(json.dumps({
            "model": model.name, "text": "".join(pieces), "token_ids": s.token_ids,
            "prompt_tokens": s.prompt_tokens, "generated_tokens": len(s.token_ids),
            "stop_reason": s.stop_reason, "prefill_ms": 1000 * s.prefill_s,
            "tpot_ms": s.tpot_ms, "tpot_p95_ms": s.tpot_p95_ms, "tokens_per_s": s.tokens_per_s,
            "cpu_s": _cpu_s(), "decode_cpu_s": s.decode_cpu_s, "warnings": warnings, **report,
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


async def cmd_perplexity(args: argparse.Namespace) -> int:
    text = await _read_text(Path(args.text_file))
    model = await load(args)
    ids = model.tokenizer.encode(text)
    engine = await make_engine(args, model)
    try:
        warnings = notices(engine, args)
        print_notices(warnings)
        result = await perplexity(engine, ids, chunk_tokens=args.chunk_tokens)
        report = split_report(engine, args)
    finally:
        await engine.aclose()
    if args.json:
        if report:
            report["split"].pop("per_token")
        print(json.dumps({"model": model.name, "tokens": result.tokens, "mean_nll": result.mean_nll,
                          "perplexity": result.perplexity, "warnings": warnings, **report}))
    else:
        print(f"{model.name}: {result.tokens} tokens, mean NLL {result.mean_nll:.4f} nats, "
              f"perplexity {result.perplexity:.3f}")
    return 0


async def cmd_calibrate(args: argparse.Namespace) -> int:
    from halo_p2p.model.calibrate import run_calibration
    from halo_p2p.predictor import default_predictor_path

    text = await _read_text(Path(args.text_file))
    model = await load(args)
    ids = model.tokenizer.encode(text)[: args.max_tokens]
    if len(ids) < 64:
        raise ConfigError(f"{args.text_file} has only {len(ids)} tokens", "calibrate on a few thousand tokens")
    digest = await asyncio.to_thread(file_sha256, model.path)
    err.print(f"calibrating {model.name} on {len(ids)} tokens of {args.text_file} ...")
    predictor = await asyncio.to_thread(run_calibration, model.source, ids, model_sha256=digest, rank=args.rank,
                                        metadata={"text_file": str(args.text_file)})
    path = default_predictor_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(predictor.save, path)
    err.print(f"[green]ok[/] predictor saved to {path}; sessions of this model use it from now on")
    return 0


async def _read_text(path: Path) -> str:
    try:
        return await asyncio.to_thread(path.read_text, encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"text file {path} does not exist", "check the --text-file path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start})",
                          "convert it to UTF-8") from None


async def cmd_chat(args: argparse.Namespace) -> int:
    from halo_p2p.cli.chat import ChatApp

    model = await load(args)
    require_template(model.chat_template, model.name)
    engine = await make_engine(args, model)
    try:
        print_notices(notices(engine, args))
        app = ChatApp(model, Generator(engine, model.tokenizer), sampling(args), system=args.system)
        if args.prompt is not None:
            await app.answer(args.prompt)
        else:
            await app.loop()
    finally:
        await engine.aclose()
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    model = await load(args)
    engine = await make_engine(args, model)
    if args.prompt_tokens + args.tokens > engine.max_seq_len:
        raise ConfigError(f"{args.prompt_tokens}+{args.tokens} tokens exceed the context "
                          f"({engine.max_seq_len})", "lower --prompt-tokens/--tokens or raise --ctx")
    seed_text = ("Once upon a time, in a small village by the sea, there lived an old fisherman "
                 "who told stories about the stars. ")
    base = model.tokenizer.encode(seed_text) or [1]
    prompt = (base * (args.prompt_tokens // len(base) + 1))[: args.prompt_tokens]
    try:
        result = await bench(engine, prompt, args.tokens, repeat=args.repeat)
    finally:
        await engine.aclose()
    weights = engine.model.weight_bytes() if isinstance(engine, LocalEngine) else 0
    figures = {"model": model.name, "weight_bytes": weights, **result.as_dict()}
    if args.json:
        print(json.dumps(figures))
        return 0
    table = Table("figure", "value", title=f"bench {model.name} (1 peer)")
    table.add_row("prefill", f"{result.prefill_tokens_per_s:.1f} tokens/s ({result.prompt_tokens} tokens)")
    table.add_row("decode TPOT median", f"{result.tpot_median_ms:.2f} ms")
    table.add_row("decode TPOT p95", f"{result.tpot_p95_ms:.2f} ms")
    table.add_row("decode speed", f"{result.decode_tokens_per_s:.1f} tokens/s")
    table.add_row("weights (resident)", f"{weights / 1e6:.1f} MB")
    table.add_row("peak RSS", f"{result.peak_rss_bytes / 1e6:.1f} MB")
    Console().print(table)
    return 0

