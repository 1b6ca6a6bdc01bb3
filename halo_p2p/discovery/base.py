"""The discovery seam: who the other peers are, and how a peer describes itself on the LAN.

A peer announces one :class:`PeerInfo` and learns the others'. Implementations:
:class:`~halo_p2p.discovery.memory.MemoryDiscovery` (in process, for tests),
:class:`~halo_p2p.discovery.static.StaticDiscovery` (``--peer HOST:PORT``) and
:class:`~halo_p2p.discovery.mdns.MdnsDiscovery` (mDNS/DNS-SD, RFC 6762/6763). They share
:class:`PeerTable`, so the admission rules are the same everywhere:

* A record with **our** peer id but another address is refused (event ``"refused"``); during
  :meth:`Discovery.start` it is fatal (:class:`~halo_p2p.errors.DiscoveryError`).
* Two **other** records with one peer id: the first seen is kept, the second refused and logged.
  If the first goes away, the second is admitted then.
* A record of another protocol version than ours (:data:`PROTOCOL_VERSION`) is refused and logged.
* A malformed record is counted (:attr:`DiscoveryStats.malformed_txt`), logged once and ignored.

The TXT encoding (RFC 6763 §6) uses short keys, one ``key=value`` string per key, each at most
255 bytes (§6.1, the string's length is one byte); the whole record stays under 1300 bytes
(§6.2, one packet). Keys: ``v`` protocol, ``id`` peer id, ``n`` display name, ``m`` (then
``m1``..``m3``) comma-separated models, ``c`` cores, ``mem`` memory budget in bytes, ``gf``
compute rate in GFLOP/s. Keys are case-insensitive (§6.4). This module does no I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol, runtime_checkable

from halo_p2p.errors import ConfigError, DiscoveryError

__all__ = [
    "DUPLICATE_ID_FIX",
    "MODEL_TXT_KEYS",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "TXT_STRING_MAX_BYTES",
    "Discovery",
    "DiscoveryStats",
    "PeerEvent",
    "PeerInfo",
    "PeerSubscription",
    "PeerTable",
    "TableView",
    "decode_txt",
    "encode_txt",
    "model_entry",
    "txt_size",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
"""Version of the halo-p2p peer protocol announced in TXT key ``v``; peers of another version are refused."""

SERVICE_TYPE: Final = "_halo._tcp.local."
"""DNS-SD service type of a halo peer (RFC 6763 §7)."""

TXT_STRING_MAX_BYTES: Final = 255
"""Longest ``key=value`` string of a TXT record in bytes (RFC 6763 §6.1)."""

MODEL_TXT_KEYS: Final = ("m", "m1", "m2", "m3")
"""TXT keys carrying the model list, filled in order; entries beyond them are dropped."""

PEER_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
NAME_MAX_BYTES: Final = 63
MODEL_ENTRY_RE: Final = re.compile(r"[^,\x00-\x1f\x7f]{1,100}@[0-9a-f]{16}")
MODEL_ENTRY_MAX_BYTES: Final = 117
STATIC_ID_MAX_CHARS: Final = 300
EVENT_QUEUE_MAX: Final = 1024

DUPLICATE_ID_FIX: Final = ("give each device its own id: delete ~/.config/halo-p2p/peer-id on the copy, "
                           "or pass --peer-id")
"""The fix printed when two devices announce one peer id."""

EventKind = Literal["added", "updated", "removed", "refused"]


def _fail(attr: str, value: object, fix: str) -> ConfigError:
    return ConfigError(f"PeerInfo.{attr} = {value!r} is invalid", fix)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(attr: str, value: object, static: bool) -> object:
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
            ok, fix = _is_int(value) and value >= 1, "use an integer >= 1"  # type: ignore[operator]
        case "models":
            value = tuple(value) if isinstance(value, list | tuple) else value
            ok = isinstance(value, tuple) and len(set(value)) == len(value) and all(
                isinstance(m, str) and m.isprintable() and MODEL_ENTRY_RE.fullmatch(m)
                and len(m.encode()) <= MODEL_ENTRY_MAX_BYTES for m in value)
            fix = "use distinct '<name>@<first 16 lowercase hex of sha256>' entries, names without commas, <= 100 bytes"
        case "cores":
            ok = _is_int(value) and value >= (0 if static else 1)  # type: ignore[operator]
            fix = "use an integer >= 1"
        case "memory_budget_bytes":
            ok, fix = _is_int(value) and value >= 0, "use an integer number of bytes >= 0"  # type: ignore[operator]
        case "compute_gflops":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and value >= 0
            value, fix = float(value) if ok else value, "use a finite number of GFLOP/s >= 0"  # type: ignore[arg-type]
        case "host":
            ok = (isinstance(value, str) and 0 < len(value) <= 253 and value.isprintable()
                  and " " not in value and "[" not in value)
            fix = "use an IPv4 or IPv6 address (no brackets) or a host name"
        case "signaling_port":
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
            object.__setattr__(self, attr, _validate(attr, getattr(self, attr), self.static))

    @property
    def address(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        return f"[{self.host}]:{self.signaling_port}" if ":" in self.host else f"{self.host}:{self.signaling_port}"


def model_entry(name: str, sha256: str) -> str:
    """The :attr:`PeerInfo.models` entry of a model: ``"<name>@<first 16 hex of sha256>"``."""
    return f"{name}@{sha256[:16].lower()}"


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
        key = next(keys, None)
        if key is None:
            log.warning("peer %s: announcing %d of %d models (the TXT record is full); dropped: %s",
                        info.peer_id, i, len(info.models), ", ".join(info.models[i:]))
            break
        value = props[key] = entry
    props.update(c=str(info.cores), mem=str(info.memory_budget_bytes), gf=repr(info.compute_gflops))
    return props


def txt_size(props: Mapping[str, str]) -> int:
    """Size in bytes of the TXT record data of ``props`` (one length byte per string)."""
    return sum(1 + len(f"{k}={v}".encode()) for k, v in props.items())


def _norm_props(props: Mapping[bytes | str, bytes | str | None]) -> dict[str, bytes | str | None]:
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


def decode_txt(props: Mapping[bytes | str, bytes | str | None], host: str, port: int) -> PeerInfo:
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
            return _validate(attr, value, False)
        except ConfigError as exc:
            raise DiscoveryError(f"TXT key {key!r} of the peer at {where} is invalid: {exc.problem}",
                                 _IGNORED) from exc

    fields: dict[str, object] = {"protocol": parse("protocol", "v"), "peer_id": parse("peer_id", "id")}
    for attr in ("host", "signaling_port"):
        try:
            fields[attr] = _validate(attr, host if attr == "host" else port, False)
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
    return PeerInfo(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A change of the peer view.

    Attributes:
        kind: ``"added"``, ``"updated"`` (same peer id and source, new fields), ``"removed"``
            (``peer`` is the last known info) or ``"refused"`` (not admitted; see ``reason``).
        peer: the peer concerned.
        reason: why a peer was refused (empty for the other kinds).
    """

    kind: EventKind
    peer: PeerInfo
    reason: str = ""


@dataclass(slots=True)
class DiscoveryStats:
    """Counters of one discovery instance; each refusal or malformed record counts once per source.

    Attributes:
        malformed_txt: records that could not be decoded (ignored).
        refused_duplicates: records refused because their peer id was taken (ours or another's).
        refused_version: records refused for another :data:`PROTOCOL_VERSION`.
        resolve_failures: services whose records did not arrive in time (mDNS only).
        events_dropped: events dropped because a subscriber fell :data:`EVENT_QUEUE_MAX` behind.
    """

    malformed_txt: int = 0
    refused_duplicates: int = 0
    refused_version: int = 0
    resolve_failures: int = 0
    events_dropped: int = 0

    def __iadd__(self, other: DiscoveryStats) -> DiscoveryStats:
        for name in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


_END: Final = object()


class PeerSubscription:
    """An async iterator of :class:`PeerEvent`; it ends when the discovery closes or on :meth:`close`.

    Use as ``with discovery.subscribe() as events: async for event in events: ...``. At most
    :data:`EVENT_QUEUE_MAX` events wait; beyond that the oldest is dropped (and counted).
    """

    def __init__(self, table: PeerTable) -> None:
        self._table = table
        self._queue: asyncio.Queue[object] = asyncio.Queue(EVENT_QUEUE_MAX)
        self._ended = False

    def _put(self, item: object) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._table.stats.events_dropped += 1
        self._queue.put_nowait(item)

    def close(self) -> None:
        """Stop receiving events; iteration ends after the events already queued."""
        if self in self._table._subscribers:
            self._table._subscribers.remove(self)
            self._put(_END)

    def __enter__(self) -> PeerSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> PeerSubscription:
        return self

    async def __anext__(self) -> PeerEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        return item  # type: ignore[return-value]


class PeerTable:
    """The peer view of one discovery instance, applying the admission rules of this module.

    Implementations feed it sightings keyed by a *source* (an mDNS service name, a memory
    member, a static address): :meth:`offer` when a record appears or changes, :meth:`withdraw`
    when it goes, :meth:`malformed` when it cannot be decoded.

    Args:
        label: name used in log messages (e.g. the own peer id).
    """

    def __init__(self, label: str = "discovery") -> None:
        self.label = label
        self.me: PeerInfo | None = None
        self.started = False
        self.startup_conflict: DiscoveryError | None = None
        self.stats = DiscoveryStats()
        self._peers: dict[str, tuple[Hashable, PeerInfo]] = {}     # peer id -> (source, info)
        self._by_source: dict[Hashable, str] = {}                  # source -> admitted peer id
        self._refused: dict[Hashable, tuple[PeerInfo, str]] = {}   # source -> (info, reason)
        self._malformed: dict[Hashable, str] = {}
        self._subscribers: list[PeerSubscription] = []
        self._changed = asyncio.Event()
        self.closed = False

    @property
    def _protocol(self) -> int:
        """The version peers must speak: ours (``me.protocol``, :data:`PROTOCOL_VERSION` by default)."""
        return self.me.protocol if self.me is not None else PROTOCOL_VERSION

    def peers(self) -> dict[str, PeerInfo]:
        """Admitted peers by peer id (a copy)."""
        return {pid: info for pid, (_, info) in self._peers.items()}

    def _emit(self, event: PeerEvent) -> None:
        for sub in self._subscribers:
            sub._put(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def _refusal(self, source: Hashable, info: PeerInfo) -> tuple[str, str] | None:
        if self.me is not None and info.peer_id == self.me.peer_id:
            return "duplicate", f"peer id {info.peer_id} is already used by {info.address}"
        if info.protocol != self._protocol:
            return "version", (f"peer {info.peer_id} at {info.address} speaks protocol {info.protocol}, "
                               f"this peer speaks {self._protocol}")
        owner = self._peers.get(info.peer_id)
        if owner is not None and owner[0] != source:
            return "duplicate", (f"peer id {info.peer_id} at {info.address} is already used by "
                                 f"{owner[1].address}")
        return None

    def offer(self, source: Hashable, info: PeerInfo, *, own: bool = False) -> None:
        """Admit, update or refuse the record ``info`` seen from ``source``.

        Args:
            source: key of the record's origin; one source holds at most one record.
            info: the decoded record.
            own: the record is our own announcement (ignored).
        """
        if own or self.closed:
            return
        self._malformed.pop(source, None)
        refusal = self._refusal(source, info)
        if refusal is not None:
            self._drop(source)
            kind, reason = refusal
            if self._refused.get(source) == (info, reason):
                return
            self._refused[source] = (info, reason)
            if kind == "version":
                self.stats.refused_version += 1
                log.warning("%s: refusing a peer: %s (upgrade halo-p2p on both)", self.label, reason)
            else:
                self.stats.refused_duplicates += 1
                mine = self.me is not None and info.peer_id == self.me.peer_id
                log.log(logging.ERROR if mine else logging.WARNING, "%s: refusing a peer: %s (%s)", self.label,
                        reason, DUPLICATE_ID_FIX)
                if mine and not self.started:
                    self.startup_conflict = self.startup_conflict or DiscoveryError(reason, DUPLICATE_ID_FIX)
            self._emit(PeerEvent("refused", info, reason))
            return
        self._refused.pop(source, None)
        if self._by_source.get(source, info.peer_id) != info.peer_id:
            self._drop(source)
        current = self._peers.get(info.peer_id)
        if current is None:
            self._peers[info.peer_id] = (source, info)
            self._by_source[source] = info.peer_id
            log.info("%s: found peer %s (%s) at %s", self.label, info.peer_id, info.name, info.address)
            self._emit(PeerEvent("added", info))
        elif current[1] != info:
            self._peers[info.peer_id] = (source, info)
            log.debug("%s: peer %s updated", self.label, info.peer_id)
            self._emit(PeerEvent("updated", info))

    def withdraw(self, source: Hashable) -> None:
        """Forget the record of ``source`` (goodbye, expiry, or leaving the network)."""
        self._refused.pop(source, None)
        self._malformed.pop(source, None)
        self._drop(source)

    def malformed(self, source: Hashable, error: DiscoveryError) -> None:
        """Count and log (once per source and problem) a record that could not be decoded; drop its old record."""
        self._drop(source)
        self._refused.pop(source, None)
        if self._malformed.get(source) != error.problem:
            self._malformed[source] = error.problem
            self.stats.malformed_txt += 1
            log.warning("%s: ignoring a malformed peer record: %s", self.label, error)

    def _drop(self, source: Hashable) -> None:
        peer_id = self._by_source.pop(source, None)
        if peer_id is None:
            return
        _, info = self._peers.pop(peer_id)
        log.info("%s: peer %s at %s is gone", self.label, peer_id, info.address)
        self._emit(PeerEvent("removed", info))
        # promote the first record refused only because this one held the id
        for other, (cand, _reason) in list(self._refused.items()):
            if cand.peer_id == peer_id and (self.me is None or peer_id != self.me.peer_id) \
                    and cand.protocol == self._protocol:
                del self._refused[other]
                self.offer(other, cand)
                break

    def subscribe(self, *, replay: bool = True) -> PeerSubscription:
        """Subscribe to events; with ``replay`` the current peers come first as ``"added"`` events."""
        sub = PeerSubscription(self)
        if replay:
            for _, info in self._peers.values():
                sub._put(PeerEvent("added", info))
        if self.closed:
            sub._put(_END)
        else:
            self._subscribers.append(sub)
        return sub

    async def wait_for_peers(self, n: int, timeout_s: float) -> dict[str, PeerInfo]:
        """Wait until at least ``n`` peers are admitted.

        Args:
            n: number of other peers needed.
            timeout_s: longest wait in seconds.

        Returns:
            The peer view at that moment (at least ``n`` peers).

        Raises:
            DiscoveryError: fewer than ``n`` peers after ``timeout_s`` seconds, or the discovery closed.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while len(self._peers) < n:
                    if self.closed:
                        raise DiscoveryError(f"{self.label}: discovery closed with {len(self._peers)} of {n} peers")
                    await self._changed.wait()
        except TimeoutError:
            raise DiscoveryError(
                f"found {len(self._peers)} of {n} peers within {timeout_s:g} s",
                "start the other peers on the same network, check --interface, or pass --peer HOST:PORT") from None
        return self.peers()

    def close(self) -> None:
        """End every subscription and wake waiters; later offers are ignored."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.close()
        self._changed.set()


class TableView:
    """The read side of :class:`Discovery` for implementations that keep a :class:`PeerTable`
    in ``self._table``: ``stats``, ``peers``, ``subscribe`` and ``wait_for_peers``."""

    _table: PeerTable

    @property
    def stats(self) -> DiscoveryStats:
        """Live counters (malformed records, refusals)."""
        return self._table.stats

    def peers(self) -> dict[str, PeerInfo]:
        """The admitted peers by peer id (a copy, excluding this one)."""
        return self._table.peers()

    def subscribe(self, *, replay: bool = True) -> PeerSubscription:
        """Peer events; with ``replay`` the current peers come first as ``"added"``."""
        return self._table.subscribe(replay=replay)

    async def wait_for_peers(self, n: int, timeout_s: float) -> dict[str, PeerInfo]:
        """Wait until ``n`` peers are known (see :meth:`PeerTable.wait_for_peers`).

        Raises:
            DiscoveryError: fewer than ``n`` peers after ``timeout_s`` seconds.
        """
        return await self._table.wait_for_peers(n, timeout_s)


@runtime_checkable
class Discovery(Protocol):
    """Finds the other peers and announces this one. Every wait is bounded; ``aclose`` is idempotent."""

    @property
    def stats(self) -> DiscoveryStats:
        """Live counters (malformed records, refusals)."""
        ...

    async def start(self, me: PeerInfo) -> None:
        """Announce ``me`` and start watching for peers.

        Raises:
            DiscoveryError: another device already uses ``me.peer_id``.
        """
        ...

    async def update(self, me: PeerInfo) -> None:
        """Announce changed fields of ``me`` (same peer id), e.g. a new model or a measured rate."""
        ...

    def peers(self) -> dict[str, PeerInfo]:
        """The current view by peer id, excluding this peer and refused records."""
        ...

    def subscribe(self, *, replay: bool = True) -> PeerSubscription:
        """Events from now on (after ``"added"`` for the current peers when ``replay``)."""
        ...

    async def wait_for_peers(self, n: int, timeout_s: float) -> dict[str, PeerInfo]:
        """Wait for ``n`` peers (see :meth:`PeerTable.wait_for_peers`)."""
        ...

    async def aclose(self) -> None:
        """Withdraw the announcement, stop watching, end subscriptions."""
        ...
