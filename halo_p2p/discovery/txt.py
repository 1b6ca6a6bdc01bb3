"""The DNS-SD TXT encoding of a :class:`~halo_p2p.discovery.info.PeerInfo` (RFC 6763 §6; no I/O).

Short keys, one ``key=value`` string per key, each at most 255 bytes (§6.1, the string's length
is one byte); the whole record stays under 1300 bytes (§6.2, one packet). Keys: ``v`` protocol,
``id`` peer id, ``n`` display name, ``m`` (then ``m1``..``m3``) comma-separated models, ``c``
cores, ``mem`` memory budget in bytes, ``gf`` compute rate in GFLOP/s. Keys are
case-insensitive (§6.4). Host and port travel in the SRV/A records. The in-memory discovery
uses the same encoding, so its tests exercise these limits too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from halo_p2p.discovery.info import PROTOCOL_VERSION, PeerInfo, validate_field
from halo_p2p.errors import ConfigError, DiscoveryError

__all__ = ["MODEL_TXT_KEYS", "SERVICE_TYPE", "TXT_STRING_MAX_BYTES", "TxtProps", "decode_txt", "encode_txt", "txt_size"]

log = logging.getLogger(__name__)

TxtProps = Mapping[str, str] | Mapping[bytes, bytes | None] | Mapping[bytes | str, bytes | str | None]
"""A TXT record's properties: as :func:`encode_txt` builds them (str) or as zeroconf returns them (bytes)."""

SERVICE_TYPE: Final = "_halo._tcp.local."
"""DNS-SD service type of a halo peer (RFC 6763 §7)."""

TXT_STRING_MAX_BYTES: Final = 255
"""Longest ``key=value`` string of a TXT record in bytes (RFC 6763 §6.1)."""

MODEL_TXT_KEYS: Final = ("m", "m1", "m2", "m3")
"""TXT keys carrying the model list, filled in order; entries beyond them are dropped."""


def encode_txt(info: PeerInfo) -> dict[str, str]:
    """Encode ``info`` as DNS-SD TXT properties (host and port travel in the SRV/A records).

    The model list fills :data:`MODEL_TXT_KEYS` in order, each string ``"mK=a@h,b@h"`` at most
    :data:`TXT_STRING_MAX_BYTES`. Truncation rule: the list is cut before the first entry that
    does not fit (a prefix of ``info.models`` is kept, in order) and a warning is logged, so
    list the most important models first. At most about 1.2 KB in total (RFC 6763 §6.2).
    """
    props = {"v": str(info.protocol), "id": info.peer_id, "n": info.name}
    keys = iter(MODEL_TXT_KEYS)
    key, value = next(keys), ""
    props[key] = ""
    for i, entry in enumerate(info.models):
        joined = f"{value},{entry}" if value else entry
        if len(f"{key}={joined}".encode()) <= TXT_STRING_MAX_BYTES:
            value = props[key] = joined
            continue
        more = next(keys, None)
        if more is None:
            log.warning("peer %s: announcing %d of %d models (the TXT record is full); dropped: %s",
                        info.peer_id, i, len(info.models), ", ".join(info.models[i:]))
            break
        key = more
        value = props[key] = entry
    props.update(c=str(info.cores), mem=str(info.memory_budget_bytes), gf=repr(info.compute_gflops))
    return props


def txt_size(props: Mapping[str, str]) -> int:
    """Size in bytes of the TXT record data of ``props`` (one length byte per string)."""
    return sum(1 + len(f"{k}={v}".encode()) for k, v in props.items())


def _norm_props(props: TxtProps) -> dict[str, bytes | str | None]:
    """Lower-case ASCII keys (RFC 6763 §6.4: keys are case-insensitive); values stay as given."""
    out: dict[str, bytes | str | None] = {}
    for raw_key, raw in props.items():
        try:
            key = raw_key.decode("ascii") if isinstance(raw_key, bytes) else str(raw_key)
        except UnicodeDecodeError:
            continue  # not one of ours
        out[key.lower()] = raw
    return out


_IGNORED: Final = "that peer runs a broken or incompatible halo-p2p; it is ignored"


_TXT_FIELDS: Final = (("name", "n"), ("models", "m"), ("cores", "c"), ("memory_budget_bytes", "mem"),
                      ("compute_gflops", "gf"))
_FALLBACK: Final = {"models": (), "cores": 1, "memory_budget_bytes": 0, "compute_gflops": 0.0}


def decode_txt(props: TxtProps, host: str, port: int) -> PeerInfo:
    """Decode the TXT properties (as zeroconf gives them) of the peer reachable at ``host:port``.

    Keys of our :data:`PROTOCOL_VERSION` are checked strictly. For another version only ``v``
    and ``id`` must be valid (the other fields fall back to neutral values), so that the caller
    can refuse that peer by name. Unknown keys are ignored (RFC 6763 §6.4).

    Raises:
        DiscoveryError: a key is missing or malformed, or the address is invalid; the message
            names the key.
    """
    where = f"{host}:{port}"
    p = _norm_props(props)

    def text(key: str) -> str:
        value = p.get(key)
        if value is None:
            problem = "is missing" if key not in p else "has no value"
            raise DiscoveryError(f"TXT key {key!r} {problem} in the record of the peer at {where}", _IGNORED)
        try:
            return value.decode() if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise DiscoveryError(f"TXT key {key!r} of the peer at {where} is not UTF-8", _IGNORED) from None

    def parse(attr: str, key: str) -> object:
        match attr:
            case "models":
                raw = [text(key), *(text(k) for k in MODEL_TXT_KEYS[1:] if p.get(k) is not None)]
                value: object = tuple(e for part in raw if part for e in part.split(","))
            case "protocol" | "cores" | "memory_budget_bytes" | "compute_gflops":
                raw_value = text(key)
                try:
                    value = (float if attr == "compute_gflops" else int)(raw_value)
                except ValueError:
                    raise DiscoveryError(f"TXT key {key!r} = {raw_value!r} of the peer at {where} is not a number",
                                         _IGNORED) from None
            case _:
                value = text(key)
        try:
            return validate_field(attr, value, False)
        except ConfigError as exc:
            raise DiscoveryError(f"TXT key {key!r} of the peer at {where} is invalid: {exc.problem}",
                                 _IGNORED) from exc

    fields: dict[str, object] = {"protocol": parse("protocol", "v"), "peer_id": parse("peer_id", "id")}
    for attr in ("host", "signaling_port"):
        try:
            fields[attr] = validate_field(attr, host if attr == "host" else port, False)
        except ConfigError as exc:
            raise DiscoveryError(f"the address of the peer at {where} is invalid: {exc.problem}", _IGNORED) from exc
    strict = fields["protocol"] == PROTOCOL_VERSION
    for attr, key in _TXT_FIELDS:
        try:
            fields[attr] = parse(attr, key)
        except DiscoveryError:
            if strict:
                raise
            fields[attr] = _FALLBACK.get(attr, fields["peer_id"])
    # mypy: fields validated one by one above (validate_field); mypy sees dict[str, object]
    return PeerInfo(**fields)  # type: ignore[arg-type]

