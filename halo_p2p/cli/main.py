"""``halo-peer``: argument parsing, the one ``asyncio.run``, and one-line errors.

Every value is checked at the edge (:mod:`halo_p2p.cli.checks`): a bad flag is one line,
``halo-peer: error: ...``, and exit status 2 (argparse's usage error). An error once the command
runs is one line too, with status 1. SIGTERM stops a command as Ctrl-C does (its peers, children
and sockets are closed on the way out), with status 143.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from halo_p2p import __version__
from halo_p2p.cli import checks
from halo_p2p.errors import ConfigError, HaloError
from halo_p2p.wire.messages import SYNC_MODES, WIRE_DTYPES

__all__ = ["main"]

log = logging.getLogger(__name__)

EXIT_USAGE = 2
"""Exit status of a bad flag or value (as argparse)."""
EXIT_TERMINATED = 128 + signal.SIGTERM
"""Exit status after SIGTERM (143)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``halo-peer: error: <problem> (<fix>)``, status 2."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        if not line.endswith(")"):
            line += f" (see {self.prog} --help)"
        self.exit(EXIT_USAGE, f"halo-peer: error: {line}\n")


def _sampling_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
    p.add_argument("--max-tokens", type=checks.count, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=checks.temperature, default=temperature,
                   help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=checks.top_p, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9)")
    p.add_argument("--seed", type=checks.seed, default=None, help="sampling seed >= 0 (default: random)")


def _model_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", default=default, help=f"known model name or file path (default {default})")
    p.add_argument("--tokenizer", default=None, help="tokenizer file for a llama2.c .bin model")
    p.add_argument("--ctx", type=checks.whole(2, example=2048, what="token count"), default=None,
                   help="KV-cache length in tokens (default: model context, at most 4096)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weight dtype; float16 halves decode memory traffic (default float32)")


def _split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split model, emulated in this process over in-memory lossy links")
    g.add_argument("--emulate-peers", type=checks.whole(0, checks.MAX_EMULATED_PEERS, example=4, what="peer count"),
                   default=0, metavar="N",
                   help="run the model split over N emulated peers (the coordinator and N-1 workers; 0: off)")
    g.add_argument("--sync", choices=SYNC_MODES, default="halo",
                   help="strict: wait for every partial (reliable channel); strict-unreliable: wait for every "
                        "partial over the unreliable channel with FEC and resends; halo: skip late non-critical "
                        "groups (default)")
    g.add_argument("--plr", type=checks.loss_rate, default=0.0,
                   help="packet-loss rate of the lossy workers' links, in [0, 1)")
    g.add_argument("--lossy-peers", type=checks.whole(0, example=1, what="peer count"), default=None, metavar="K",
                   help="how many workers (the last K) get --plr (default: all)")
    g.add_argument("--delay-ms", type=checks.delay_ms, default=0.0, help="one-way delay of every worker link (ms)")
    g.add_argument("--jitter-ms", type=checks.delay_ms, default=0.0, help="extra uniform delay of every link (ms)")
    g.add_argument("--rto-ms", type=checks.rto_ms, default=200.0,
                   help="retransmission timeout of the reliable channel used by strict (ms, default 200)")
    g.add_argument("--shares", type=checks.shares, default=None,
                   help="relative group shares per peer, e.g. 1,2,1 (default equal)")
    g.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="q8_0",
                   help="activation format on the wire: q8_0 (8-bit blocks, default), float16, float32 (lossless)")
    g.add_argument("--critical-fraction", type=checks.fraction, default=0.5,
                   help="share of MLP groups the coordinator always waits for in halo mode, in [0, 1] (default 0.5)")
    g.add_argument("--mlp-group-size", type=checks.whole(1, example=64, what="group size"), default=None,
                   help="neurons per MLP group (a divisor of the model's MLP width)")
    g.add_argument("--link-seed", type=checks.seed, default=0, help="seed of the emulated losses (default 0)")
    g.add_argument("--dynamic-placement", action="store_true",
                   help="the coordinator computes the critical MLP groups of lossy peers itself, per token")
    g.add_argument("--planner", choices=("schedule", "split"), default="schedule",
                   help="schedule: load-balancing scheduler (default); split: shares by compute rate / --shares")


def add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("swarm")
    g.add_argument("--swarm-key", type=checks.swarm_key_text, default=None,
                   help="swarm key (default: $HALO_SWARM_KEY, then the key file of init); other local users can "
                        "read a command line, so prefer $HALO_SWARM_KEY or the key file")
    g.add_argument("--interface", default=None, help="network interface to use (default: the first private LAN one)")
    g.add_argument("--address", type=checks.ipv4, default=None, help="IPv4 address to use (overrides --interface)")
    g.add_argument("--peer", type=checks.peer_address, action="append", default=[], metavar="HOST:PORT",
                   help="a peer to dial when multicast does not work (repeatable)")


def _swarm_args(p: argparse.ArgumentParser) -> None:
    add_network_args(p)
    p.add_argument("--local", action="store_true", help="run on this peer only, even if a swarm is around")
    p.add_argument("--wait-peers", type=checks.seconds, default=3.0, metavar="S",
                   help="seconds to wait for peers holding the model (default 3)")
    p.add_argument("--max-peers", type=checks.whole(1, example=3, what="peer count"), default=None,
                   help="use at most this many workers (>= 1; --local for none)")


def build_parser() -> argparse.ArgumentParser:
    """The ``halo-peer`` parser with one sub-command per job."""
    parser = _Parser(
        prog="halo-peer", description="Loss-tolerant distributed LLM inference on edge devices.")
    parser.add_argument("--version", action="version", version=f"halo-peer {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list known and local models")

    p = sub.add_parser("pull", help="download a known model into the cache and verify it")
    p.add_argument("name", help="known model name, e.g. smollm2-135m-instruct")

    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(p, "stories260K")
    p.add_argument("--prompt", required=True, help="prompt text ('' for BOS only)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _sampling_args(p, temperature=0.8)
    _split_args(p)
    _swarm_args(p)

    p = sub.add_parser("perplexity", help="teacher-forced perplexity of a text file")
    _model_args(p, "stories260K")
    p.add_argument("--text-file", required=True, help="UTF-8 text to score")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--chunk-tokens", type=checks.count, default=256,
                   help="tokens per forward pass; 1 scores like decoding (relaxed sync applies)")
    _split_args(p)
    _swarm_args(p)

    p = sub.add_parser("chat", help="chat in the terminal")
    _model_args(p, "smollm2-135m-instruct")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    _sampling_args(p, temperature=0.7)
    _split_args(p)
    _swarm_args(p)

    p = sub.add_parser("calibrate", help="train the semantic-aware predictor of a model on a text")
    _model_args(p, "smollm2-135m-instruct")
    p.add_argument("--text-file", required=True, help="UTF-8 calibration text (not your evaluation text)")
    p.add_argument("--rank", type=checks.whole(1, example=32, what="rank"), default=None,
                   help="inner rank of the per-layer scorers (default: full)")
    p.add_argument("--max-tokens", type=checks.whole(64, example=4096, what="token count"), default=4096,
                   help="calibration tokens at most, >= 64 (default 4096)")

    p = sub.add_parser("init", help="create the swarm key (copy it to every device)")
    p.add_argument("--force", action="store_true", help="replace an existing key")

    p = sub.add_parser("join", help="join the swarm: be discoverable and compute for coordinators")
    p.add_argument("--model", action="append", default=[], help="model to offer (repeatable; default: all local)")
    p.add_argument("--name", type=checks.display_name, default=None, help="display name (default: the peer id)")
    p.add_argument("--peer-id", type=checks.peer_id, default=None,
                   help="peer id (default: kept in ~/.config/halo-p2p/peer-id)")
    p.add_argument("--port", type=checks.port, default=0, help="signaling TCP port, 0-65535 (default 0: any free port)")
    p.add_argument("--profile", default=None, help="device profile, e.g. rpi4 or peers/rpi4.toml")
    p.add_argument("--no-ui", action="store_true", help="no live view (for services and scripts)")
    p.add_argument("--emulate-plr", type=checks.loss_rate, default=0.0, metavar="P",
                   help="drop this share of activation frames in this peer's links, in [0, 1) (tests on loopback)")
    add_network_args(p)

    p = sub.add_parser("peers", help="list the peers on the LAN")
    p.add_argument("--wait", type=checks.seconds, default=2.0, help="seconds to listen (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--peer-id", type=checks.peer_id, default=None, help=argparse.SUPPRESS)
    add_network_args(p)

    from halo_p2p.cli.swarm_cmd import add_swarm_parser

    add_swarm_parser(sub)

    p = sub.add_parser("bench", help="measure prefill speed, decode TPOT and peak memory")
    _model_args(p, "stories260K")
    p.add_argument("--prompt-tokens", type=checks.count, default=128, help="prompt length (default 128)")
    p.add_argument("--tokens", type=checks.count, default=64, help="tokens to decode (default 64)")
    p.add_argument("--repeat", type=checks.count, default=3, help="runs; the best prefill is kept (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``halo-peer``; returns the exit status (0 ok, 1 error, 2 bad flag, 130 interrupted, 143 terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checks.check_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_run(args))
    except HaloError as exc:
        print(f"halo-peer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("halo-peer: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("halo-peer: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


class _Terminated(Exception):
    """The command was stopped by SIGTERM (and cleaned up)."""


async def _run(args: argparse.Namespace) -> int:
    """The command, stopped by SIGTERM as asyncio stops it on Ctrl-C: its task is cancelled, so every
    ``finally`` runs (peers closed, child processes stopped, namespaces deleted)."""
    from halo_p2p.cli import commands  # heavy imports (torch) only after parsing

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        if not terminated and task is not None:     # a second SIGTERM does not interrupt the cleanup
            terminated = True
            log.info("SIGTERM: stopping")
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError):     # not the main thread, or no signals (Windows)
        log.debug("SIGTERM handler not installed")
    try:
        return await commands.run(args)
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
