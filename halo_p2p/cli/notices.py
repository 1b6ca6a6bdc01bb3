"""Notices: requested conditions that the command cannot honour, said in one line each.

A flag can be valid and still do nothing: ``--plr`` without ``--emulate-peers``, or an emulated
split whose plan runs every group on the coordinator (the load-balancing scheduler prefers that
when the model is small and the workers' links cost more than they save), so the lossy links
carry nothing. The commands print each notice on stderr as ``halo-peer: warning: ...`` and put
the list under ``"warnings"`` in ``--json``.

Pure: reads the flags and the plan, no I/O.
"""

from __future__ import annotations

import argparse
import sys

from halo_p2p.cli.checks import lossy_indices
from halo_p2p.engine.protocol import Engine
from halo_p2p.plan import PlacementPlan
from halo_p2p.session.replan import SplitEngine

__all__ = ["emulated_peer_name", "flag_notices", "notices", "plan_notices", "print_notices"]

_LINK_FLAGS = (("plr", "--plr", 0.0), ("delay_ms", "--delay-ms", 0.0), ("jitter_ms", "--jitter-ms", 0.0),
               ("lossy_peers", "--lossy-peers", None), ("shares", "--shares", None), ("link_seed", "--link-seed", 0))
"""Flags of the emulated split only: (attribute, flag, default)."""

_SPLIT_FIX = "add --planner split, or --shares, to split the model"


def emulated_peer_name(i: int) -> str:
    """The peer id of emulated peer ``i`` (0 is the coordinator)."""
    return "coordinator" if i == 0 else f"worker{i}"


def _given(args: argparse.Namespace, flags: tuple[tuple[str, str, object], ...]) -> list[str]:
    return [flag for attr, flag, default in flags if getattr(args, attr, default) != default]


def flag_notices(args: argparse.Namespace) -> list[str]:
    """Flags that have no effect with the other flags (known before any engine starts)."""
    out: list[str] = []
    n = getattr(args, "emulate_peers", 0)
    if not n:
        ignored = _given(args, _LINK_FLAGS)
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            out.append(f"{', '.join(ignored)} only {verb} to an emulated split (--emulate-peers N): ignored")
    elif args.plr > 0 and not lossy_indices(n, args.lossy_peers):
        why = "it has no workers" if n == 1 else "--lossy-peers 0 picks no worker"
        out.append(f"--plr {args.plr:g} has no effect: {why}")
    if getattr(args, "sync", "halo") != "halo" and getattr(args, "critical_fraction", 0.5) != 0.5:
        out.append(f"--critical-fraction only applies to --sync halo: ignored with --sync {args.sync}")
    return out


def plan_notices(plan: PlacementPlan, args: argparse.Namespace, *, emulated: bool) -> list[str]:
    """What the plan leaves without effect: idle workers, lossy links that carry nothing.

    Args:
        plan: the split's current placement (the coordinator first in ``plan.peers``).
        args: the command's flags (``emulate_peers``, ``plr``, ``lossy_peers``, ``planner``).
        emulated: whether the split runs in this process (``--emulate-peers``).
    """
    others = [p for p in plan.peers if p != plan.coordinator]
    if not others:
        return []
    busy = set(plan.workers())
    split = args.planner == "split" or getattr(args, "shares", None) is not None
    if not busy:
        asked = [f"--emulate-peers {args.emulate_peers}"] if emulated else [f"{len(others)} peer(s) found"]
        if emulated:
            asked += [f"{flag} {getattr(args, attr):g}" for attr, flag, _ in _LINK_FLAGS[:3]
                      if getattr(args, attr)]
        fix = "give the workers a share (--shares)" if split else _SPLIT_FIX
        return [f"{' '.join(asked)}: the plan runs every group on the coordinator, so the workers and their "
                f"links do nothing ({fix})"]
    if emulated and args.plr > 0:
        lossy = [emulated_peer_name(i) for i in lossy_indices(len(plan.peers), args.lossy_peers)]
        if lossy and not busy.intersection(lossy):
            fix = "give the lossy workers a share (--shares)" if split else _SPLIT_FIX
            return [f"--plr {args.plr:g} has no effect: the plan gives no group to the lossy worker(s) "
                    f"{', '.join(lossy)} ({fix})"]
    return []


def notices(engine: Engine, args: argparse.Namespace) -> list[str]:
    """Every notice of a command about to run on ``engine``."""
    out = flag_notices(args)
    if isinstance(engine, SplitEngine):
        st = engine.status()
        out += plan_notices(st.plan, args, emulated=st.emulated)
    return out


def print_notices(lines: list[str]) -> None:
    """Print each notice as one line on stderr."""
    for line in lines:
        print(f"halo-peer: warning: {line}", file=sys.stderr, flush=True)
