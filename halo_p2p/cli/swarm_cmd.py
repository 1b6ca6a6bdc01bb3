"""``halo-peer swarm``: a local test swarm of N peers, in network namespaces when root."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from halo_p2p.errors import ConfigError
from halo_p2p.net.link import LinkConditions
from halo_p2p.net.swarmkey import generate_swarm_key
from halo_p2p.profiles import PeerProfile, load_swarm
from halo_p2p.testbed.netns import DeviceLink, NetnsLan, available

__all__ = ["add_swarm_parser", "cmd_swarm"]

log = logging.getLogger(__name__)


def add_swarm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swarm", help="start a local test swarm (namespaces when root, else loopback)")
    p.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model every peer offers")
    p.add_argument("--plr", type=float, default=0.0, help="packet-loss rate of the lossy peers' links")
    p.add_argument("--lossy-peers", type=int, default=1, metavar="K", help="how many peers (the last K) are lossy")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every link (ms; namespaces only)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform delay (ms; namespaces only)")
    p.add_argument("--swarm-file", default=None, help="a *.swarm.toml listing peers with profiles (overrides above)")
    p.add_argument("--loopback", action="store_true", help="use loopback even when namespaces are available")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")


def _specs(args: argparse.Namespace) -> list[PeerProfile]:
    if args.swarm_file:
        return load_swarm(args.swarm_file)
    if args.peers < 1 or not 0 <= args.plr < 1:
        raise ConfigError(f"--peers {args.peers} / --plr {args.plr}", "use --peers >= 1 and --plr in [0, 1)")
    def link(i: int) -> LinkConditions:
        return LinkConditions(plr=args.plr if i >= args.peers - args.lossy_peers else 0.0,
                              delay_s=args.delay_ms / 1000.0, jitter_s=args.jitter_ms / 1000.0)

    return [PeerProfile(name=f"peer{i}", link=link(i)) for i in range(args.peers)]


def _join_argv(spec: PeerProfile, args: argparse.Namespace, key: str, *where: str) -> list[str]:
    argv = [sys.executable, "-m", "halo_p2p", "join", "--model", args.model, "--name", spec.name, "--swarm-key", key,
            "--no-ui", *where]
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


async def cmd_swarm(args: argparse.Namespace) -> int:
    specs = _specs(args)
    key = generate_swarm_key()
    console = Console()
    ok, why = available()
    if ok and not args.loopback:
        devices = [DeviceLink.from_conditions(s.link, seed=i) for i, s in enumerate(specs)]
        async with NetnsLan(f"hs{os.getpid() % 100000}", devices, replace_stale=True) as lan:
            procs = [await lan.spawn(i, _join_argv(s, args, key, "--address", lan.address(i)),
                                     stdout=asyncio.subprocess.PIPE) for i, s in enumerate(specs)]
            joined = await _wait_joined(procs)
            _print(console, specs, joined, [lan.address(i) for i in range(len(specs))])
            console.print(f"Prompt it from device 0: [bold]ip netns exec {lan.ns(0)} halo-peer chat --address "
                          f"{lan.address(0)} --swarm-key {key}[/]  (Ctrl-C here stops the swarm)")
            await _hold(args)
        return 0
    if not args.loopback:
        console.print(f"[yellow]network namespaces unavailable ({why}); peers run on loopback, loss is emulated "
                      "inside their links and delay is not emulated[/]")
    with tempfile.TemporaryDirectory(prefix="halo-swarm-") as tmp:
        procs = []
        for s in specs:
            env = {**os.environ, "XDG_CONFIG_HOME": str(Path(tmp) / s.name)}   # one peer id each
            argv = _join_argv(s, args, key, "--interface", "lo", "--emulate-plr", str(s.link.plr))
            procs.append(await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE))
        try:
            joined = await _wait_joined(procs)
            _print(console, specs, joined, ["127.0.0.1"] * len(specs))
            console.print(f"Prompt it: [bold]HALO_SWARM_KEY={key} halo-peer chat --interface lo[/]  "
                          "(Ctrl-C here stops the swarm)")
            await _hold(args)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)
    return 0


def _print(console: Console, specs: list[PeerProfile], joined: list[str], addresses: list[str]) -> None:
    table = Table("peer", "address", "PLR", "delay ms", "profile", "status", title=f"test swarm of {len(specs)} peers")
    for s, line, addr in zip(specs, joined, addresses, strict=True):
        table.add_row(s.name, addr, f"{100 * s.link.plr:g} %", f"{1000 * s.link.delay_s:g}", s.profile or "-",
                      line.split(" at ")[0])
    console.print(table)
