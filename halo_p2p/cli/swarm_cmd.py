"""``halo-peer swarm``: a local test swarm of N peers, in network namespaces when root."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from halo_p2p.cli import checks
from halo_p2p.errors import ConfigError
from halo_p2p.net.link import LinkConditions
from halo_p2p.net.swarmkey import ENV_VAR, generate_swarm_key, save_swarm_key
from halo_p2p.profiles import PeerProfile, load_swarm
from halo_p2p.testbed.netns import DeviceLink, NetnsLan, available

__all__ = ["add_swarm_parser", "cmd_swarm"]

log = logging.getLogger(__name__)


def add_swarm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swarm", help="start a local test swarm (namespaces when root, else loopback)")
    p.add_argument("--peers", type=checks.whole(1, checks.MAX_SWARM_PEERS, example=3, what="peer count"), default=3,
                   help="number of peers (default 3)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model every peer offers")
    p.add_argument("--plr", type=checks.loss_rate, default=0.0,
                   help="packet-loss rate of the lossy peers' links, in [0, 1)")
    p.add_argument("--lossy-peers", type=checks.whole(0, example=1, what="peer count"), default=1, metavar="K",
                   help="how many peers (the last K) are lossy")
    p.add_argument("--delay-ms", type=checks.delay_ms, default=0.0,
                   help="one-way delay of every link (ms; namespaces only)")
    p.add_argument("--jitter-ms", type=checks.delay_ms, default=0.0, help="extra uniform delay (ms; namespaces only)")
    p.add_argument("--swarm-file", default=None, help="a *.swarm.toml listing peers with profiles (overrides above)")
    p.add_argument("--loopback", action="store_true", help="use loopback even when namespaces are available")
    p.add_argument("--duration", type=checks.positive_seconds, default=None,
                   help="stop after this many seconds (default: Ctrl-C or SIGTERM)")


def _specs(args: argparse.Namespace) -> list[PeerProfile]:
    if args.swarm_file:
        return load_swarm(args.swarm_file)

    def link(i: int) -> LinkConditions:                  # flags checked at the edge (cli/checks.py)
        return LinkConditions(plr=args.plr if i >= args.peers - args.lossy_peers else 0.0,
                              delay_s=args.delay_ms / 1000.0, jitter_s=args.jitter_ms / 1000.0)

    return [PeerProfile(name=f"peer{i}", link=link(i)) for i in range(args.peers)]


def _join_argv(spec: PeerProfile, args: argparse.Namespace, *where: str) -> list[str]:
    """The command line of one ``join``; the swarm key is not on it (it goes in ``$HALO_SWARM_KEY``:
    a command line is readable by every local user, a process's environment only by its owner)."""
    argv = [sys.executable, "-m", "halo_p2p", "join", "--model", args.model, "--name", spec.name, "--no-ui", *where]
    return argv + (["--profile", spec.profile] if spec.profile else [])


async def _wait_joined(procs: list[asyncio.subprocess.Process]) -> list[str]:
    lines = []
    for p in procs:
        line = await asyncio.wait_for(p.stdout.readline(), 120) if p.stdout else b""
        if not line.startswith(b"halo-peer: joined as"):
            raise ConfigError("a peer of the swarm failed to start", "run halo-peer join by hand to see why")
        lines.append(line.decode().strip())
    return lines


async def _hold(args: argparse.Namespace) -> None:
    if args.duration is None:
        await asyncio.Event().wait()
    await asyncio.sleep(args.duration)


async def _stop(procs: list[asyncio.subprocess.Process], grace_s: float = 5.0) -> None:
    """SIGTERM every process still running (a ``join`` then leaves the swarm cleanly), SIGKILL after ``grace_s``."""
    running = [p for p in procs if p.returncode is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), grace_s)
    except TimeoutError:
        for p in running:
            if p.returncode is None:
                log.warning("peer process %d did not stop in %.0f s: killing it", p.pid, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        await asyncio.gather(*(p.wait() for p in running))


def _peer_env(env: dict[str, str], tmp: str, spec: PeerProfile) -> dict[str, str]:
    """The environment of one ``join``: its own config folder, so each peer keeps its own peer id."""
    return {**env, "XDG_CONFIG_HOME": str(Path(tmp) / spec.name)}


def _key_file(tmp: str, key: str) -> Path:
    """The swarm key in a 0600 file of the 0700 folder ``tmp``, for the prompt command we print."""
    path = Path(tmp) / "swarm.key"
    save_swarm_key(key, path)
    return path


async def cmd_swarm(args: argparse.Namespace) -> int:
    """Start the swarm and hold it until ``--duration``, Ctrl-C or SIGTERM; every ``join`` started
    is stopped (and the namespaces deleted) on the way out, whichever of them ends it."""
    specs = _specs(args)
    key = generate_swarm_key()
    console = Console()
    ok, why = available()
    with tempfile.TemporaryDirectory(prefix="halo-swarm-") as tmp:        # mode 0700
        key_file = _key_file(tmp, key)
        env = {**os.environ, ENV_VAR: key}
        if ok and not args.loopback:
            devices = [DeviceLink.from_conditions(s.link, seed=i) for i, s in enumerate(specs)]
            async with NetnsLan(f"hs{os.getpid() % 100000}", devices, replace_stale=True) as lan:
                joins = [await lan.spawn(i, _join_argv(s, args, "--address", lan.address(i)),
                                         stdout=asyncio.subprocess.PIPE, env=_peer_env(env, tmp, s))
                         for i, s in enumerate(specs)]
                joined = await _wait_joined(joins)
                _print(console, specs, joined, [lan.address(i) for i in range(len(specs))])
                console.print(f"Prompt it from device 0: [bold]{ENV_VAR}=$(cat {key_file}) ip netns exec {lan.ns(0)} "
                              f"halo-peer chat --address {lan.address(0)}[/]  (Ctrl-C here stops the swarm)")
                await _hold(args)
            return 0
        if not args.loopback:
            console.print(f"[yellow]network namespaces unavailable ({why}); peers run on loopback, loss is emulated "
                          "inside their links and delay is not emulated[/]")
        procs: list[asyncio.subprocess.Process] = []
        try:
            for s in specs:
                argv = _join_argv(s, args, "--interface", "lo", "--emulate-plr", str(s.link.plr))
                procs.append(await asyncio.create_subprocess_exec(*argv, env=_peer_env(env, tmp, s),
                                                                  stdout=asyncio.subprocess.PIPE))
            joined = await _wait_joined(procs)
            _print(console, specs, joined, ["127.0.0.1"] * len(specs))
            console.print(f"Prompt it: [bold]{ENV_VAR}=$(cat {key_file}) halo-peer chat --interface lo[/]  "
                          "(Ctrl-C here stops the swarm)")
            await _hold(args)
        finally:
            await _stop(procs)
    return 0


def _print(console: Console, specs: list[PeerProfile], joined: list[str], addresses: list[str]) -> None:
    table = Table("peer", "address", "PLR", "delay ms", "profile", "status", title=f"test swarm of {len(specs)} peers")
    for s, line, addr in zip(specs, joined, addresses, strict=True):
        table.add_row(s.name, addr, f"{100 * s.link.plr:g} %", f"{1000 * s.link.delay_s:g}", s.profile or "-",
                      line.split(" at ")[0])
    console.print(table)
