"""Peer profiles: what an emulated (or real) device is like, in code or read from small TOML files.

A :class:`PeerProfile` describes one device: its compute (torch threads, a memory budget, a
slowdown relative to this machine, its share of the neuron groups) and its link (packet loss,
one-way delay, jitter, as :class:`~halo_p2p.net.link.LinkConditions`). It is the one peer
description of the emulated swarm (:func:`halo_p2p.node.emulate.start_emulated_swarm`), of
``halo-peer swarm`` and of ``halo-peer join --profile``. ``peers/*.toml`` in the repository
ships a few (``lan``, ``rpi4``, ``rpi5``, ``flaky-wifi``, ``slow-laptop``); ``peers/README.md``
documents the format. A swarm file lists several peers, each a profile plus overrides::

    [[peer]]
    name = "pi-a"
    profile = "rpi4"
    plr = 0.05

Pure: no I/O beyond reading the files, no network. Units: bytes, milliseconds in ``*_ms`` keys,
rates as fractions in ``[0, 1]``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from halo_p2p.errors import ConfigError
from halo_p2p.net.link import LinkConditions

__all__ = [
    "PROFILE_KEYS",
    "PeerProfile",
    "available_profiles",
    "load_profile",
    "load_swarm",
    "parse_bytes",
    "profile_dirs",
    "resolve_profile",
]

log = logging.getLogger(__name__)

_REPO_PEERS = Path(__file__).resolve().parents[1] / "peers"
_SWARM_SUFFIX = ".swarm.toml"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "tb": 1000**4}

PROFILE_KEYS: dict[str, str] = {
    "name": "a peer name: letters, digits, '-', '_' or '.' (at most 64)",
    "description": "free text",
    "threads": "an integer >= 1 (torch threads), or leave it out for the default",
    "memory_budget": 'bytes as an integer >= 1 or a string such as "3GiB" or "512MiB"',
    "compute_slowdown": "a number > 0 (1 = this machine's speed, 4 = four times slower)",
    "share": "a number >= 0 (relative share of the neuron groups), or leave it out for the default",
    "plr": "a number in [0, 1] (probability that one UDP packet is lost, per direction)",
    "delay_ms": "a number >= 0 (one-way delay in milliseconds)",
    "jitter_ms": "a number >= 0 (extra one-way delay drawn uniformly from [0, jitter_ms])",
}
"""The keys a profile file may hold, each with what a valid value looks like."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerProfile:
    """One peer: its compute and its link.

    Attributes:
        name: peer name (a profile file's default is its file name without ``.toml``); an
            emulated peer uses it as its peer id.
        slowdown: compute time multiplier relative to this machine (``> 0``; 4.0 emulates a
            device four times slower; the file key is ``compute_slowdown``).
        memory_budget_bytes: most memory the peer may use for weights, in bytes; ``None`` is
            unlimited.
        share: relative share of the neuron groups (``>= 0``) for the ``split`` planner; ``None``
            lets the planner decide (an emulated swarm then splits equally).
        link: conditions of each direction of the peer's link (to the coordinator, in an emulated
            swarm; ignored for the coordinator itself). The file keys are ``plr``, ``delay_ms``
            and ``jitter_ms``.
        threads: torch threads to use; ``None`` keeps the engine's default.
        description: free text from the file.
        profile: the profile the peer came from (a name or a path), or ``None``.
    """

    name: str
    slowdown: float = 1.0
    memory_budget_bytes: int | None = None
    share: float | None = None
    link: LinkConditions = field(default_factory=LinkConditions)
    threads: int | None = None
    description: str = ""
    profile: str | None = None


def parse_bytes(value: object) -> int:
    """Parse a size: an integer number of bytes, or a string such as ``"3GiB"``, ``"512 MiB"``, ``"2GB"``.

    Raises:
        ConfigError: not a positive size (a float, a bool, an unknown unit, zero or less).
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif m and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        n = 0
    if n < 1:
        raise ConfigError(f"{value!r} is not a size", "use a positive whole number of bytes or e.g. 512MiB, 3GiB, 2GB")
    return n


def _real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(key: str, value: object) -> Any:
    """Validate one profile value; return it converted, or raise ``ValueError`` (or ``ConfigError``
    from :func:`parse_bytes`), which :func:`_fields` turns into a ``ConfigError`` naming the key."""
    if key == "name":
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise ValueError
        return value
    if key == "description":
        if not isinstance(value, str):
            raise ValueError
        return value
    if key == "threads":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError
        return value
    if key == "memory_budget":
        return parse_bytes(value)
    if not _real(value):
        raise ValueError
    v = float(value)  # type: ignore[arg-type]  # value is object: checked to be a real number above
    ok = {"compute_slowdown": v > 0, "share": v >= 0, "plr": 0 <= v <= 1}.get(key, v >= 0)
    if not ok:
        raise ValueError
    return v


_FIELD = {"memory_budget": "memory_budget_bytes", "compute_slowdown": "slowdown"}
_LINK_FIELD = {"plr": "plr", "delay_ms": "delay_s", "jitter_ms": "jitter_s"}


def _with(spec: PeerProfile, fields: dict[str, Any]) -> PeerProfile:
    """``spec`` with validated file ``fields`` applied (link keys go into :attr:`PeerProfile.link`)."""
    link = {_LINK_FIELD[k]: v if k == "plr" else v / 1000.0 for k, v in fields.items() if k in _LINK_FIELD}
    rest = {_FIELD.get(k, k): v for k, v in fields.items() if k not in _LINK_FIELD}
    return replace(spec, link=replace(spec.link, **link), **rest)


def _fields(table: dict[str, Any], where: str, *, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate ``table``'s keys and values; return them by file key (``extra`` keys pass)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in extra:
            continue
        if key not in PROFILE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}",
                              f"use one of {', '.join(PROFILE_KEYS)} (see peers/README.md)")
        try:
            out[key] = _check(key, value)
        except (ValueError, ConfigError):
            raise ConfigError(f"{where}: bad value {key} = {value!r}", f"use {PROFILE_KEYS[key]}") from None
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML table of ``path``; a FIFO or a device is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"profile file {path} is not a regular file", "pass the path of a .toml file")
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"profile file {path} does not exist", "check the path") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", "fix the syntax (see peers/README.md)") from None


def profile_dirs() -> list[Path]:
    """Folders searched for a bare profile name, in order: ``peers/`` of the repository, then ``./peers``."""
    dirs = [_REPO_PEERS, Path.cwd() / "peers"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def available_profiles() -> list[str]:
    """Names of the profiles found in :func:`profile_dirs` (swarm files ``*.swarm.toml`` excluded), sorted."""
    names = {p.name.removesuffix(".toml") for d in profile_dirs() for p in d.glob("*.toml")
             if not p.name.endswith(_SWARM_SUFFIX)}
    return sorted(names)


def resolve_profile(path_or_name: str | Path, *, base: Path | None = None) -> Path:
    """Turn a profile argument into a file path.

    A :class:`~pathlib.Path`, a value with a path separator, or one naming an existing file is a
    path (relative to ``base`` if given, else to the current directory); anything else is a bare
    name (``rpi4`` or ``rpi4.toml``) looked up in ``base`` (if given), then in :func:`profile_dirs`.

    Raises:
        ConfigError: a bare name that no folder holds (the message lists the known names).
    """
    text = str(path_or_name)
    candidate = Path(text) if base is None or Path(text).is_absolute() else base / text
    if isinstance(path_or_name, Path) or "/" in text or candidate.is_file():
        return candidate
    name = text.removesuffix(".toml")
    for d in ([base] if base is not None else []) + profile_dirs():
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    known = ", ".join(available_profiles()) or "none found"
    raise ConfigError(f"unknown peer profile {text!r}",
                      f"use one of: {known}, or a path to a .toml file (searched {_REPO_PEERS} and ./peers)")


def load_profile(path_or_name: str | Path) -> PeerProfile:
    """Load one profile by bare name (``"rpi4"``) or path (``"peers/rpi4.toml"``).

    Args:
        path_or_name: see :func:`resolve_profile`.

    Returns:
        The spec; its ``name`` defaults to the file name without ``.toml``.

    Raises:
        ConfigError: unknown name, unreadable or invalid TOML, an unknown key or a bad value
            (the message names the file and the key, and says what a valid value looks like).
    """
    path = resolve_profile(path_or_name)
    data = _read_toml(path)
    fields = _fields(data, str(path))
    fields.setdefault("name", path.name.removesuffix(".toml"))
    return _with(PeerProfile(name=fields["name"], profile=str(path_or_name)), fields)


def load_swarm(path: str | Path) -> list[PeerProfile]:
    """Load a swarm file: ``[[peer]]`` tables, each a ``name``, an optional ``profile`` and overrides.

    A peer's ``profile`` is a bare name or a path relative to the swarm file; every other key is a
    profile key (see :data:`PROFILE_KEYS`) and overrides the profile's value. Without ``profile``
    the peer starts from the defaults (this machine's speed, a perfect link). The top level may
    hold only ``description`` and the ``peer`` array.

    Returns:
        The peers in file order.

    Raises:
        ConfigError: the file is missing or invalid, a peer lacks a name, two peers share one, a
            profile is unknown, a key is unknown or a value is bad (the message names the file, the
            peer and the key).
    """
    path = Path(path)
    data = _read_toml(path)
    for key in data:
        if key not in ("peer", "description"):
            raise ConfigError(f"{path}: unknown top-level key {key!r}",
                              "a swarm file holds [[peer]] tables and an optional description")
    peers = data.get("peer")
    if not isinstance(peers, list) or not peers or not all(isinstance(p, dict) for p in peers):
        raise ConfigError(f"{path}: no [[peer]] tables", 'add at least one: [[peer]] name = "a" profile = "lan"')
    out: list[PeerProfile] = []
    for n, table in enumerate(peers, 1):
        where = f"{path}: peer #{n}"
        name = table.get("name")
        if name is None:
            raise ConfigError(f"{where} has no name", 'add name = "..." to each [[peer]]')
        where = f"{path}: peer {name!r}"
        overrides = _fields(table, where, extra=("profile",))
        prof = table.get("profile")
        if prof is None:
            spec = PeerProfile(name=overrides["name"])
        elif isinstance(prof, str) and prof:
            try:
                spec = load_profile(resolve_profile(prof, base=path.parent))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e.problem}", e.fix) from None
            spec = replace(spec, profile=prof)
        else:
            raise ConfigError(f"{where}: bad value profile = {prof!r}", "use a profile name or a path to a .toml file")
        spec = _with(spec, overrides)
        if spec.name in {s.name for s in out}:
            raise ConfigError(f"{where}: the name is used twice", "give each [[peer]] its own name")
        out.append(spec)
    log.debug("loaded swarm %s: %d peers", path, len(out))
    return out
