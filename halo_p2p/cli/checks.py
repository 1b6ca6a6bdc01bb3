"""The edge checks of ``halo-peer``: one converter per kind of value, and the checks across flags.

Every flag gets its ``type=`` here, so a bad value stops the command before anything starts
(no model loaded, no socket opened). A converter raises :class:`argparse.ArgumentTypeError` with
one line, the problem and the fix in parentheses, which the parser prints as
``halo-peer: error: argument --flag: ...`` and exits with status 2. Values that are only wrong
together (``--lossy-peers`` beyond the workers of ``--emulate-peers``) are checked by
:func:`check_args` after parsing. A secret (``--swarm-key``) never appears in a message.

Pure: no I/O.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
from collections.abc import Callable

from halo_p2p.discovery.info import validate_field
from halo_p2p.discovery.static import parse_peer_address
from halo_p2p.errors import ConfigError
from halo_p2p.net.link import RTO_MAX_S
from halo_p2p.net.swarmkey import parse_swarm_key

__all__ = [
    "MAX_DELAY_MS",
    "MAX_EMULATED_PEERS",
    "MAX_SWARM_PEERS",
    "check_args",
    "count",
    "delay_ms",
    "display_name",
    "fraction",
    "ipv4",
    "loss_rate",
    "lossy_indices",
    "peer_address",
    "peer_id",
    "port",
    "positive_seconds",
    "real",
    "rto_ms",
    "seconds",
    "seed",
    "shares",
    "swarm_key_text",
    "temperature",
    "top_p",
    "whole",
]

MAX_EMULATED_PEERS = 64
"""Most peers ``--emulate-peers`` runs in one process."""
MAX_SWARM_PEERS = 64
"""Most ``join`` processes ``halo-peer swarm`` starts on one machine."""
MAX_DELAY_MS = 60_000.0
"""Longest emulated one-way delay or jitter, in milliseconds (a minute)."""


def _bad(problem: str, fix: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{problem} ({fix})")


def whole(low: int, high: int | None = None, *, example: int | None = None,
          what: str = "whole number") -> Callable[[str], int]:
    """A converter to an ``int`` in ``[low, high]`` (no upper bound if ``high`` is None)."""
    span = f"from {low} to {high}" if high is not None else f"{low} or more"
    fix = f"use {span}" + (f", e.g. {example}" if example is not None else "")

    def convert(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise _bad(f"{text[:40]!r} is not a {what}", fix) from None
        if value < low or (high is not None and value > high):
            raise _bad(f"{value} is out of range", fix)
        return value

    convert.__name__ = what
    return convert


def real(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
         example: float | None = None, what: str = "number") -> Callable[[str], float]:
    """A converter to a finite ``float`` in the interval ``low .. high`` (each end open or closed)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    if high is None:
        span = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        span = f"a number in {left}{low:g}, {high:g}{right}"
    fix = f"use {span}" + (f", e.g. {example:g}" if example is not None else "")

    def convert(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise _bad(f"{text[:40]!r} is not a {what}", fix) from None
        if not math.isfinite(value):
            raise _bad(f"{text.strip()!r} is not a finite {what}", fix)
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise _bad(f"{value:g} is out of range", fix)
        return value

    convert.__name__ = what
    return convert


fraction = real(0.0, 1.0, what="fraction")
"""A fraction in ``[0, 1]``."""
loss_rate = real(0.0, 1.0, high_open=True, example=0.05, what="loss rate")
"""A packet-loss rate in ``[0, 1)`` (a link that loses everything is no link)."""


port = whole(0, 65535, example=7700, what="port number")
"""A TCP or UDP port, ``0..65535`` (0: any free port)."""


def ipv4(text: str) -> str:
    """An IPv4 address in dotted form (``--address``)."""
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise _bad(f"{text[:60]!r} is not an IPv4 address",
                   "use A.B.C.D, e.g. 192.168.1.20, or --interface NAME") from None


def peer_address(text: str) -> str:
    """A ``--peer HOST:PORT`` value, checked (the text is kept; :mod:`discovery.static` parses it again)."""
    try:
        parse_peer_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--peer ")) from None
    return text.strip()


def peer_id(text: str) -> str:
    """A peer id: 1-48 characters ``[A-Za-z0-9_-]``, starting with a letter or digit."""
    try:
        validate_field("peer_id", text, False)
    except ConfigError as exc:
        raise _bad(f"{text[:60]!r} is not a peer id", exc.fix or "") from None
    return text


def display_name(text: str) -> str:
    """A display name: 1-63 bytes of printable text."""
    try:
        validate_field("name", text, False)
    except ConfigError as exc:
        raise _bad(f"{text[:60]!r} is not a display name", exc.fix or "") from None
    return text


def swarm_key_text(text: str) -> str:
    """A swarm key in text form; the message on a bad one gives its length, never the text."""
    try:
        parse_swarm_key(text, source="--swarm-key")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def shares(text: str) -> list[float]:
    """``--shares``: comma-separated finite numbers ``>= 0``, at least one of them positive."""
    fix = "use relative shares >= 0 separated by commas, e.g. --shares 1,2,1"
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise _bad(f"{text[:60]!r} is not a list of numbers", fix) from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(v > 0 for v in values):
        raise _bad(f"{text[:60]!r} has a negative, infinite or NaN share, or no positive one", fix)
    return values


rto_ms = real(0.0, 1000 * RTO_MAX_S, low_open=True, example=200, what="timeout in ms")
"""A retransmission timeout in milliseconds, ``(0, 60000]``."""
delay_ms = real(0.0, MAX_DELAY_MS, example=2, what="delay in ms")
"""An emulated one-way delay or jitter in milliseconds, ``[0, 60000]``."""
seconds = real(0.0, example=3, what="duration in seconds")
"""A wait in seconds, finite and ``>= 0``."""
positive_seconds = real(0.0, low_open=True, example=60, what="duration in seconds")
"""A duration in seconds, finite and ``> 0``."""
temperature = real(0.0, example=0.8, what="temperature")
"""A sampling temperature, finite and ``>= 0`` (0: greedy)."""
top_p = real(0.0, 1.0, low_open=True, example=0.9, what="probability mass")
"""A nucleus mass in ``(0, 1]``."""
seed = whole(0, example=42, what="seed")
"""A random seed, a whole number ``>= 0``."""
count = whole(1, example=64, what="count")
"""A count, a whole number ``>= 1``."""


def lossy_indices(n_peers: int, lossy_peers: int | None) -> list[int]:
    """The emulated peers given ``--plr``: the last ``lossy_peers`` workers (default every worker).

    Peer 0 is the coordinator and is never lossy. Shared by the emulated engine and its notices.
    """
    lossy = n_peers - 1 if lossy_peers is None else lossy_peers
    return [i for i in range(1, n_peers) if i >= n_peers - lossy]


def check_args(args: argparse.Namespace) -> None:
    """The checks across flags, after parsing.

    Raises:
        ConfigError: two flags that cannot hold together (the caller prints it as a usage error).
    """
    n = getattr(args, "emulate_peers", 0)
    if n and getattr(args, "lossy_peers", None) is not None and args.lossy_peers > n - 1:
        raise ConfigError(f"--lossy-peers {args.lossy_peers} is more than the {n - 1} worker(s) of "
                          f"--emulate-peers {n}", f"use --lossy-peers 0 to {n - 1}")
    if n and getattr(args, "shares", None) is not None and len(args.shares) != n:
        raise ConfigError(f"--shares has {len(args.shares)} values for {n} peers",
                          "give one share per peer, the coordinator first")
    if args.command == "swarm" and args.swarm_file is None and args.lossy_peers > args.peers:
        raise ConfigError(f"--lossy-peers {args.lossy_peers} is more than the {args.peers} peer(s) of --peers",
                          f"use --lossy-peers 0 to {args.peers}")
