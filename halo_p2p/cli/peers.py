"""The swarm commands: ``init``, ``join``, ``peers``, ``swarm``, and swarm mode for prompts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from halo_p2p.cli.spark import sparkline
from halo_p2p.discovery import CombinedDiscovery, Discovery, StaticDiscovery
from halo_p2p.discovery.mdns import MdnsDiscovery, interface_addresses
from halo_p2p.errors import ConfigError, HaloError
from halo_p2p.model.loader import LoadedModel
from halo_p2p.model.threads import SWARM_THREADS, set_compute_threads
from halo_p2p.net.swarmkey import ENV_VAR, find_swarm_key, generate_swarm_key, load_swarm_key, save_swarm_key
from halo_p2p.node.library import HeldModel, ModelLibrary, file_sha256
from halo_p2p.node.peer import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    NodeConfig,
    PeerNode,
    ServedStatus,
    choose_address,
    config_dir,
    load_peer_id,
)
from halo_p2p.node.swarm import open_swarm_engine
from halo_p2p.profiles import load_profile
from halo_p2p.session.replan import SplitEngine

__all__ = ["cmd_init", "cmd_join", "cmd_peers", "offers_caption", "optional_swarm_key", "swarm_engine"]

log = logging.getLogger(__name__)

err = Console(stderr=True)


def key_path() -> Path:
    return config_dir() / "swarm.key"


def swarm_key(args: argparse.Namespace) -> bytes:
    """The swarm key of ``--swarm-key``, ``$HALO_SWARM_KEY`` or the key file.

    Raises:
        ConfigError: none of them, or the key is unusable (see :func:`load_swarm_key`).
    """
    return load_swarm_key(explicit=args.swarm_key, env=os.environ, path=key_path())


def optional_swarm_key(args: argparse.Namespace) -> bytes | None:
    """The swarm key, or ``None`` when none is configured (a prompt then runs on this device).

    Raises:
        ConfigError: a key is configured but unusable (corrupt, readable by others, a FIFO...).
    """
    return find_swarm_key(explicit=args.swarm_key, env=os.environ, path=key_path())


def pick_address(args: argparse.Namespace) -> str:
    if args.address:
        return args.address
    if args.interface:
        return interface_addresses(args.interface)[0]
    import ifaddr  # zeroconf's own dependency: lists the interfaces

    candidates = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)]
    return choose_address(candidates)


def make_discovery(args: argparse.Namespace, address: str) -> Discovery:
    mdns = MdnsDiscovery(interfaces=[address])
    return CombinedDiscovery(mdns, StaticDiscovery(args.peer)) if args.peer else mdns


async def cmd_init(args: argparse.Namespace) -> int:
    path = key_path()
    save_swarm_key(generate_swarm_key(), path, force=args.force)
    err.print(f"swarm key written to {path} (mode 0600). Copy it to every device of the swarm "
              f"(same path), or set ${ENV_VAR}.")
    return 0


def _profile_config(args: argparse.Namespace) -> tuple[float, int]:
    slowdown, budget = 1.0, DEFAULT_MEMORY_BUDGET_BYTES
    if args.profile:
        spec = load_profile(args.profile)
        slowdown = max(1.0, spec.slowdown)
        budget = spec.memory_budget_bytes or budget
    return slowdown, budget


async def start_node(args: argparse.Namespace, library: ModelLibrary, *, suffix: str = "",
                     observer: bool = False) -> PeerNode:
    """Start this device's node; an ``observer`` (``halo-peer peers``) offers no memory, so no
    coordinator uses it."""
    key = swarm_key(args)
    address = pick_address(args)
    peer_id = (args.peer_id if getattr(args, "peer_id", None) else load_peer_id()) + suffix
    slowdown, budget = _profile_config(args) if hasattr(args, "profile") else (1.0, DEFAULT_MEMORY_BUDGET_BYTES)
    set_compute_threads(SWARM_THREADS)      # a share of each layer: extra threads only spin
    budget = 0 if observer else budget
    config = NodeConfig(peer_id=peer_id, name=getattr(args, "name", None) or peer_id, address=address,
                        swarm_key=key, port=getattr(args, "port", 0), memory_budget_bytes=budget, slowdown=slowdown,
                        emulated_plr=getattr(args, "emulate_plr", 0.0))
    node = PeerNode(config, library, make_discovery(args, address))
    try:
        await node.start()
    except BaseException:
        await node.aclose()
        raise
    return node


def status_table(node: PeerNode) -> Table:
    st = node.status()
    table = Table(title=f"halo-peer {st.name} ({st.peer_id}) at {st.address}:{st.port}",
                  caption=f"models: {', '.join(st.models) or '-'} · {offers_caption(st.refused)}")
    for col in ("peer", "address", "role", "models", "GFLOP/s", "groups", "RTT ms", "loss", "bytes out/in",
                "TPOT ms (last tokens)"):
        table.add_column(col)
    served = {s.coordinator: s for s in st.served}
    for p in st.peers:
        s = served.pop(p.peer_id, None)
        table.add_row(p.name, p.address, "coordinator of a session here" if s else "peer",
                      ", ".join(m.split("@")[0] for m in p.models), f"{p.compute_gflops:.0f}", *_served(s))
    for coord, s in served.items():
        table.add_row(coord, "-", "coordinator (prompt)", "-", "-", *_served(s))
    return table


def offers_caption(counters: Mapping[str, int]) -> str:
    """The connector's counters in words: ``offers: 3 accepted, 2 refused (bad-mac 2)``.

    ``refused_<cause>`` counters are summed and listed by cause; ``accepted`` and ``failed``
    are named; other counters (``peer_connections``) are left out.
    """
    refused = {k.removeprefix("refused_").replace("_", "-"): v for k, v in counters.items()
               if k.startswith("refused_") and v}
    parts = [f"{counters.get('accepted', 0)} accepted"]
    total = sum(refused.values())
    parts.append(f"{total} refused" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(refused.items()))})"
                                       if refused else ""))
    if counters.get("failed"):
        parts.append(f"{counters['failed']} failed")
    return "offers: " + ", ".join(parts)


def _served(s: ServedStatus | None) -> tuple[str, str, str, str, str]:
    if s is None:
        return "-", "-", "-", "-", "-"
    rtt = f"{s.rtt_ms:.1f}" if s.rtt_ms is not None else "-"
    plr = f"{100 * s.plr:.1f} %" if s.plr is not None else "-"
    tpot = s.tpot_ms
    spark = f"{tpot[-1]:.0f} {sparkline(tpot, floor=None)}" if tpot else "-"
    return str(s.groups), rtt, plr, f"{s.bytes_sent / 1e6:.1f}/{s.bytes_received / 1e6:.1f} MB", spark


async def cmd_join(args: argparse.Namespace) -> int:
    _, budget = _profile_config(args)
    library = await asyncio.to_thread(lambda: ModelLibrary(args.model or None, memory_budget_bytes=budget))
    if not library.held:
        raise ConfigError("this peer holds no model", "pull one (halo-peer pull smollm2-135m-instruct) or pass --model")
    node = await start_node(args, library)
    print(f"halo-peer: joined as {node.peer_id} ({node.config.name}) at {node.config.address}:{node.connector.port}",
          flush=True)
    try:
        if args.no_ui or not sys.stdout.isatty():
            await asyncio.Event().wait()
        with Live(status_table(node), refresh_per_second=2, console=Console()) as live:
            while True:
                await asyncio.sleep(1.0)
                live.update(status_table(node))
    finally:
        await node.aclose()


async def cmd_peers(args: argparse.Namespace) -> int:
    node = await start_node(args, ModelLibrary([]), suffix=f"-o{os.getpid()}", observer=True)
    try:
        await asyncio.sleep(args.wait)
        peers = sorted(node.discovery.peers().values(), key=lambda p: p.name)
    finally:
        await node.aclose()
    if args.json:
        import json

        print(json.dumps([{"peer_id": p.peer_id, "name": p.name, "address": p.address, "models": list(p.models),
                           "cores": p.cores, "compute_gflops": p.compute_gflops,
                           "memory_budget_bytes": p.memory_budget_bytes} for p in peers]))
        return 0
    table = Table("peer", "id", "address", "models", "cores", "GFLOP/s", "memory", title=f"{len(peers)} peer(s)")
    for p in peers:
        table.add_row(p.name, p.peer_id, p.address, ", ".join(p.models), str(p.cores), f"{p.compute_gflops:.0f}",
                      f"{p.memory_budget_bytes / 2**30:.1f} GiB")
    Console().print(table)
    return 0


async def swarm_engine(args: argparse.Namespace, model: LoadedModel) -> SplitEngine | None:
    """The discovered swarm as an engine that owns this device's node, or ``None`` to run locally.

    Local when ``--local`` is given, when no swarm key exists (``halo-peer init`` not run), or
    when no peer holding the model answers within ``--wait-peers`` seconds.
    """
    from halo_p2p.cli.commands import session_options, session_setup

    if args.local:
        return None
    if optional_swarm_key(args) is None:
        log.info("no swarm key: running on this peer only (halo-peer init creates a swarm)")
        return None
    digest = await asyncio.to_thread(file_sha256, model.path)
    held = HeldModel(model.name, digest, model)
    library = ModelLibrary([])
    library.held[digest] = held
    setup, predictor = await session_setup(args, model)
    node = await start_node(args, library, suffix=f"-c{os.getpid()}")
    try:
        return await open_swarm_engine(node, held, session_options(args, model), setup, wait_s=args.wait_peers,
                                       max_workers=args.max_peers, predictor=predictor, own_node=True)
    except HaloError as exc:
        await node.aclose()
        log.warning("%s; running on this peer only", exc)
        return None
    except BaseException:
        await node.aclose()
        raise
