"""What a peer announces about itself: :class:`PeerInfo`, validated field by field (no I/O).

Every implementation of :class:`~halo_p2p.discovery.protocol.Discovery` exchanges these
records; :mod:`~halo_p2p.discovery.txt` encodes them for mDNS and checks decoded fields with
the same :func:`validate_field` rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from halo_p2p.errors import ConfigError

__all__ = ["PROTOCOL_VERSION", "PeerInfo", "model_entry", "validate_field"]

PROTOCOL_VERSION: Final = 1
"""Version of the halo-p2p peer protocol announced in TXT key ``v``; peers of another version are refused."""

PEER_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
NAME_MAX_BYTES: Final = 63
MODEL_ENTRY_RE: Final = re.compile(r"[^,\x00-\x1f\x7f]{1,100}@[0-9a-f]{16}")
MODEL_ENTRY_MAX_BYTES: Final = 117
STATIC_ID_MAX_CHARS: Final = 300


def _fail(attr: str, value: object, fix: str) -> ConfigError:
    return ConfigError(f"PeerInfo.{attr} = {value!r} is invalid", fix)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_field(attr: str, value: object, static: bool) -> object:
    """Return the normalized value of field ``attr`` of :class:`PeerInfo`.

    Raises:
        ConfigError: the value is invalid (names the field and the rule).
    """
    ok: object
    match attr:
        case "peer_id" if static:
            ok = (isinstance(value, str) and value.startswith("static:") and len(value) <= STATIC_ID_MAX_CHARS
                  and value.isprintable() and " " not in value)
            fix = "a static placeholder id is 'static:HOST:PORT'"
        case "peer_id":
            ok = isinstance(value, str) and PEER_ID_RE.fullmatch(value)
            fix = "use 1-48 characters A-Z a-z 0-9 _ -, starting with a letter or digit"
        case "name":
            ok = isinstance(value, str) and value.isprintable() and 0 < len(value.encode()) <= NAME_MAX_BYTES
            fix = f"use 1-{NAME_MAX_BYTES} bytes of printable text"
        case "protocol":
            # mypy: value is object: _is_int(value) is checked first
            ok, fix = _is_int(value) and value >= 1, "use an integer >= 1"  # type: ignore[operator]
        case "models":
            value = tuple(value) if isinstance(value, list | tuple) else value
            ok = isinstance(value, tuple) and len(set(value)) == len(value) and all(
                isinstance(m, str) and m.isprintable() and MODEL_ENTRY_RE.fullmatch(m)
                and len(m.encode()) <= MODEL_ENTRY_MAX_BYTES for m in value)
            fix = "use distinct '<name>@<first 16 lowercase hex of sha256>' entries, names without commas, <= 100 bytes"
        case "cores":
            # mypy: value is object: _is_int(value) is checked first
            ok = _is_int(value) and value >= (0 if static else 1)  # type: ignore[operator]
            fix = "use an integer >= 1"
        case "memory_budget_bytes":
            # mypy: value is object: _is_int(value) is checked first
            ok, fix = _is_int(value) and value >= 0, "use an integer number of bytes >= 0"  # type: ignore[operator]
        case "compute_gflops":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and value >= 0
            # mypy: value is object: ok means it is a real number
            value, fix = float(value) if ok else value, "use a finite number of GFLOP/s >= 0"  # type: ignore[arg-type]
        case "host":
            ok = (isinstance(value, str) and 0 < len(value) <= 253 and value.isprintable()
                  and " " not in value and "[" not in value)
            fix = "use an IPv4 or IPv6 address (no brackets) or a host name"
        case "signaling_port":
            # mypy: value is object: _is_int(value) is checked first
            ok, fix = _is_int(value) and 1 <= value <= 65535, "use a TCP port in 1..65535"  # type: ignore[operator]
        case _:  # pragma: no cover
            raise AssertionError(attr)
    if not ok:
        raise _fail(attr, value, fix)
    return value


_VALIDATED: Final = ("peer_id", "name", "protocol", "models", "cores", "memory_budget_bytes", "compute_gflops",
                     "host", "signaling_port")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """What a peer announces about itself.

    Attributes:
        peer_id: stable unique id: 1–48 characters ``[A-Za-z0-9_-]`` starting with a letter or
            digit (it names the mDNS service instance, RFC 6763 §4.1). Static placeholders use
            ``static:HOST:PORT`` instead.
        name: display name, printable, 1–63 bytes of UTF-8.
        protocol: peer-protocol version (:data:`PROTOCOL_VERSION`), ``>= 1``.
        models: models the peer holds, each ``"<name>@<first 16 hex of sha256>"`` (see
            :func:`model_entry`); names have no commas, at most 100 characters. A list is
            converted to a tuple.
        cores: CPU cores offered, ``>= 1`` (``0`` = unknown, static placeholders only).
        memory_budget_bytes: memory the peer may use for weights and caches in bytes, ``>= 0``.
        compute_gflops: measured compute rate in GFLOP/s, finite, ``>= 0`` (0 = not measured).
        host: address to dial (IPv4, IPv6 without brackets, or a host name).
        signaling_port: TCP port of the peer's signaling endpoint, ``1..65535``.
        static: learned from ``--peer HOST:PORT``; the id is a placeholder until connected.

    Raises:
        ConfigError: a field is invalid (the message names the field and the rule).
    """

    peer_id: str
    name: str
    protocol: int = PROTOCOL_VERSION
    models: tuple[str, ...] = ()
    cores: int
    memory_budget_bytes: int
    compute_gflops: float
    host: str
    signaling_port: int
    static: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.static, bool):
            raise _fail("static", self.static, "use True or False")
        for attr in _VALIDATED:
            object.__setattr__(self, attr, validate_field(attr, getattr(self, attr), self.static))

    @property
    def address(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        return f"[{self.host}]:{self.signaling_port}" if ":" in self.host else f"{self.host}:{self.signaling_port}"


def model_entry(name: str, sha256: str) -> str:
    """The :attr:`PeerInfo.models` entry of a model: ``"<name>@<first 16 hex of sha256>"``."""
    return f"{name}@{sha256[:16].lower()}"

