"""Signaling: an authenticated SDP offer/answer exchange over one short TCP connection.

The connecting peer (:func:`connect`) sends a :class:`~halo_p2p.wire.messages.SignalOffer`;
the listening peer (:class:`SignalingServer`) replies with a ``SignalAnswer`` or a
``SignalRefused`` and closes the stream; both then set up the WebRTC link
(:mod:`halo_p2p.net.webrtc`) directly between them.

Stream framing (:mod:`halo_p2p.net.signaling_client`, with :func:`connect` and the MACs): each
message is a 4-byte big-endian length, then one wire-codec frame (:mod:`halo_p2p.wire.codec`) of
at most :data:`MAX_FRAME_BYTES`. Every read has a timeout. Every way a frame can fail (too long,
truncated, not decodable, even a codec bug) is a refusal with a code, counted in
:attr:`SignalingServer.stats`, never an exception in the log.

MAC: ``mac`` is ``HMAC-SHA256(swarm_key, encode(replace(msg, mac="")))`` as 64 lowercase hex
digits (RFC 2104): the whole encoded message — version, KIND, every field — with ``mac`` set to
the empty string. The KIND is covered, so an offer's MAC is no good for an answer.

Freshness: each signed message has a random ``nonce`` and the sender's wall clock ``sent_s``;
the receiver accepts a nonce once, within ±30 s of its own clock (:class:`ReplayGuard`), so
the devices' clocks must agree to within 30 s. An answer echoes the offer's nonce
(``offer_nonce``) and is accepted only for that offer.

Security argument. The SDP carries each side's ICE credentials, candidates and the SHA-256
fingerprint of its DTLS certificate. Because the SDP is authenticated by the swarm key, each
side trusts the fingerprint it received; DTLS (RFC 8261, under SCTP) then proves that the
other end holds the matching private key, and encrypts and authenticates every frame,
activations included. An attacker **without the key** can: see the signaling in clear text
(peer ids, names, addresses, ICE credentials, fingerprints); refuse or drop traffic (deny
service); with the ICE credentials it saw, inject connectivity checks and divert the UDP path
through itself, where it can still only relay or drop DTLS records; open TCP connections, which
cost the listener a socket for at most ``read_timeout_s`` (1 s) each and never a peer connection
(the MAC is checked first); replay a captured offer to another
swarm member within the window, which makes that member answer and try ICE towards the
original sender, but the DTLS handshake cannot complete without the original certificate's
private key, so it times out. It **cannot**: make a listener create a peer connection, get a
link to any peer, impersonate a peer's DTLS endpoint, read or alter activations and control
messages, or replay an offer to the same listener or an answer to another offer. Anyone
**with the key** is a full member: peer ids are not bound to keys, so members trust each other.

Abuse limits: a stranger must not lock key holders out. A connection is *pending* until its
first frame arrives; a key holder sends its offer the moment it connects, a stranger may send
nothing, garbage or keyless offers. A pending connection has ``read_timeout_s`` (1 s) for the
whole frame. A new connection is always accepted; to make room, once ``max_pending_per_address``
(4) are pending from its source address (IPv4 address, IPv6 /64), the oldest of them is dropped
with ``SignalRefused("busy")``, else once ``max_pending`` (64) are pending in all, the oldest in
all; but only one pending for at least 0.25 s, which a key holder's connection never is (its
offer arrives within a round trip), and idle sockets are; a sweep does the same 0.25 s later if
no new connection comes. Above 256 pending connections the
oldest of the address with the most pending ones goes, whatever its age: a bound on sockets
(:class:`~halo_p2p.net.admission.Admission`). A valid MAC moves the offer out of the pending set
into one of ``max_handshakes`` (32) handshake slots, which only key holders reach: the reserve.
:func:`connect` retries ``busy`` with a fresh nonce until its deadline. Not covered: an offer
that takes over 0.25 s to arrive (a lossy link) competes with idle sockets; 256 connections opened
within its round trip, from its own address or from 256 addresses, can still push it out.
Refusals are logged aggregated: the first of each cause per ``log_interval_s`` (10 s) in full,
the rest as one line with their count (:class:`~halo_p2p.net.admission.RefusalLog`); ``stats``
counts each by cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from halo_p2p.errors import ConfigError, HaloError, TransportError
from halo_p2p.net.admission import Admission, RefusalLog, source_key
from halo_p2p.net.signaling_client import (
    MAX_FRAME_BYTES,
    SIGNALING_PROTOCOL,
    Refusal,
    close_stream,
    connect,
    read_frame,
    receive_frame,
    sign_message,
    verify_message,
    write_frame,
)
from halo_p2p.net.swarmkey import ReplayGuard
from halo_p2p.net.webrtc import Handshake, WebRtcLink
from halo_p2p.wire.messages import Message, SignalAnswer, SignalOffer, SignalRefused

__all__ = [
    "MAX_FRAME_BYTES",
    "SIGNALING_PROTOCOL",
    "SignalingServer",
    "connect",
    "read_frame",
    "sign_message",
    "verify_message",
    "write_frame",
]

log = logging.getLogger(__name__)

OnLink = Callable[[WebRtcLink, str], Awaitable[None]]


_BACKLOG: Final = 1024   # listen backlog: a flood must not fill the accept queue (a dropped SYN waits 1 s)
_QUIET_CAUSES: Final = frozenset({"timeout", "closed", "bad_frame", "oversize", "busy", "address_limit",
                                  "pending_limit"})
"""Refusal causes any device can produce (logged at INFO); the others (auth, replay, version, bad_sdp)
point at a misconfigured peer (WARNING)."""
_EVICTED_BECAUSE: Final = {"address_limit": "from this address", "pending_limit": "in all"}


class _Pending:
    """A connection until its first frame arrives (an :class:`Admission` entry)."""

    __slots__ = ("evicted", "reader", "source", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str) -> None:
        self.reader, self.writer, self.source = reader, writer, source
        self.evicted: str | None = None

    def evict(self, cause: str) -> None:
        """Make its read end now, as at the end of the stream (the refusal is still written)."""
        self.evicted = cause
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.pause_reading()   # no data may follow the EOF fed below
        self.reader.feed_eof()


class SignalingServer:
    """Answers signed offers on a TCP port and hands each resulting link to ``on_link``.

    Abuse limits: see the module docstring.

    Args:
        peer_id: this peer's id (sent in answers).
        name: this peer's human-readable name.
        swarm_key: the raw 32-byte swarm key.
        host: address to listen on (e.g. ``"127.0.0.1"`` or the LAN address).
        port: TCP port; 0 picks a free one (see :meth:`start`).
        on_link: ``await on_link(link, offer_peer_id)`` once both channels are open. It should
            hand the link off and return; it is cancelled (and the link closed) by :meth:`aclose`.
        read_timeout_s: deadline for the offer frame, in seconds after the TCP accept.
        handshake_timeout_s: longest wait for the channels to open after answering, in seconds.
        max_pending: connections waiting for their first frame, above which the oldest (if
            pending for 0.25 s) is dropped (``busy``) for a new one; 4x this is a hard cap.
        max_pending_per_address: the same per source address (IPv4 address, IPv6 /64).
        max_handshakes: authenticated handshakes at once (only key holders get here); more are
            refused with ``busy``.
        log_interval_s: refusals of one cause are logged once in full and then summed up in one
            line per this many seconds.

    Attributes:
        stats: counters for the peer's status view: ``refused_<cause>`` per refusal
            (``auth``, ``replay``, ``version``, ``oversize``, ``bad_frame``, ``bad_sdp``,
            ``timeout``, ``busy``; ``closed``: the stream ended before a byte; ``address_limit``
            and ``pending_limit``: dropped for newer connections, sent ``busy``),
            ``peer_connections`` created, ``accepted`` links and ``failed`` handshakes.

    Raises:
        ConfigError: a limit or timeout is out of range.
    """

    def __init__(self, peer_id: str, name: str, swarm_key: bytes, *, host: str, port: int = 0,
                 on_link: OnLink, read_timeout_s: float = 1.0, handshake_timeout_s: float = 10.0,
                 max_pending: int = 64, max_pending_per_address: int = 4, max_handshakes: int = 32,
                 log_interval_s: float = 10.0) -> None:
        if not (read_timeout_s > 0 and handshake_timeout_s > 0 and max_handshakes >= 1):
            raise ConfigError("SignalingServer timeouts or max_handshakes are out of range",
                              "use positive timeouts and max_handshakes >= 1")
        self.peer_id, self.name = peer_id, name
        self._key = swarm_key
        self._host, self._port = host, port
        self._on_link = on_link
        self._read_timeout_s, self._handshake_timeout_s = read_timeout_s, handshake_timeout_s
        self._admission: Admission[_Pending] = Admission(max_pending=max_pending,
                                                         max_per_source=max_pending_per_address)
        self._max_handshakes, self._handshakes = max_handshakes, 0
        self._refusals = RefusalLog(log, interval_s=log_interval_s)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._replay = ReplayGuard()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats: Counter[str] = Counter()

    @property
    def port(self) -> int:
        """The bound TCP port (after :meth:`start`)."""
        return self._port

    async def start(self) -> int:
        """Start listening.

        Returns:
            The bound TCP port.

        Raises:
            TransportError: the address cannot be bound.
        """
        try:
            self._server = await asyncio.start_server(self._handle, self._host, self._port, backlog=_BACKLOG)
        except OSError as exc:
            raise TransportError(f"cannot listen for signaling on {self._host}:{self._port}: {exc.strerror}",
                                 "pick another --port or address") from None
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("signaling for peer %s listening on %s:%d", self.peer_id, self._host, self._port)
        return self._port

    async def aclose(self) -> None:
        """Stop listening, cancel handshakes in progress (and their ``on_link``), log the refusals
        not yet summed up; idempotent."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for timer in (self._flush_timer, self._sweep_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._sweep_timer = None
        self._refusals.flush(force=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        conn = _Pending(reader, writer, source_key(peer))
        for victim, cause in self._admission.admit(conn, conn.source):
            victim.evict(cause)
        self._arm_sweep()
        try:
            await self._serve(conn, where)
        except asyncio.CancelledError:
            pass   # only aclose() cancels; ending normally keeps asyncio's stream callback quiet
        except Exception:
            log.exception("signaling connection from %s failed", where)
        finally:
            self._admission.release(conn)
            self._tasks.discard(task)
            if not writer.is_closing():
                await close_stream(writer)

    async def _refuse(self, conn: _Pending, where: str, refusal: Refusal, claimed: str) -> None:
        self.stats[f"refused_{refusal.cause}"] += 1
        self._refusals.refused(refusal.cause, conn.source,
                               f"refused signaling offer from {where}{claimed}: {refusal.reason} ({refusal.cause})",
                               level=logging.INFO if refusal.cause in _QUIET_CAUSES else logging.WARNING)
        self._arm_flush()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await write_frame(conn.writer, SignalRefused(code=refusal.code, reason=refusal.reason))
        await close_stream(conn.writer)

    def _arm_sweep(self) -> None:
        due_s = self._admission.sweep_due_in_s()
        if self._sweep_timer is None and due_s is not None:
            self._sweep_timer = asyncio.get_running_loop().call_later(max(due_s, 0.01), self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        for victim, cause in self._admission.sweep():
            victim.evict(cause)
        self._arm_sweep()

    def _arm_flush(self) -> None:
        due_s = self._refusals.due_in_s()
        if self._flush_timer is None and due_s is not None:
            self._flush_timer = asyncio.get_running_loop().call_later(max(due_s, 0.01), self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        self._refusals.flush()
        self._arm_flush()

    async def _first_frame(self, conn: _Pending) -> Message:
        """The offer frame, within the deadline; a refusal if it fails or the connection was evicted."""
        try:
            return await receive_frame(conn.reader, timeout_s=self._read_timeout_s, max_bytes=MAX_FRAME_BYTES)
        except Refusal:
            if conn.evicted is None:
                raise
            limit = self._admission.max_per_source if conn.evicted == "address_limit" else self._admission.max_pending
            raise Refusal("busy", f"dropped for a newer connection: at most {limit} may wait "
                                  f"{_EVICTED_BECAUSE[conn.evicted]}", cause=conn.evicted) from None
        finally:
            self._admission.release(conn)

    async def _serve(self, conn: _Pending, where: str) -> None:
        claimed = ""
        try:
            offer = await self._first_frame(conn)
            if not isinstance(offer, SignalOffer):
                raise Refusal("bad-frame", f"expected SignalOffer, got {type(offer).__name__}")
            claimed = f" (claims to be {offer.peer_id!r:.80})"
            try:
                authentic = verify_message(offer, self._key)
            except Exception as exc:   # a decoded offer that does not encode again: a codec bug, not a key
                raise Refusal("bad-frame", f"offer cannot be re-encoded ({type(exc).__name__})") from None
            if not authentic:
                raise Refusal("auth", "bad MAC: the offer was not signed with this swarm's key")
            reason = self._replay.check(offer.nonce, offer.sent_s)
            if reason is not None:
                raise Refusal("replay", reason)
            if offer.protocol != SIGNALING_PROTOCOL:
                raise Refusal("version", f"offer speaks signaling protocol {offer.protocol}, this peer speaks "
                                         f"{SIGNALING_PROTOCOL}; upgrade the older peer")
            if self._handshakes >= self._max_handshakes:
                raise Refusal("busy", f"{self._max_handshakes} handshakes in progress; try again")
        except Refusal as refusal:
            await self._refuse(conn, where, refusal, claimed)
            return
        self._handshakes += 1
        try:
            link = await self._answer(conn, offer, where, claimed)
        finally:
            self._handshakes -= 1
        if link is None:
            return
        try:
            await self._on_link(link, offer.peer_id)
        except BaseException:
            await link.aclose()
            raise

    async def _answer(self, conn: _Pending, offer: SignalOffer, where: str, claimed: str) -> WebRtcLink | None:
        """Answer an authenticated offer and open the link; None if that failed (counted and logged)."""
        self.stats["peer_connections"] += 1
        try:
            handshake = await Handshake.answer(offer.sdp)
        except TransportError as exc:
            await self._refuse(conn, where, Refusal("bad-sdp", exc.problem), claimed)
            return None
        except (HaloError, OSError) as exc:    # local: ICE not pinned, no sockets left
            self.stats["failed"] += 1
            log.warning("cannot answer %r (%s): %s", offer.peer_id, where, exc)
            return None
        link: WebRtcLink | None = None
        try:
            answer = sign_message(SignalAnswer(
                peer_id=self.peer_id, name=self.name, protocol=SIGNALING_PROTOCOL, nonce=secrets.token_hex(16),
                offer_nonce=offer.nonce, sent_s=time.time(), sdp=handshake.local_sdp, mac=""), self._key)
            async with asyncio.timeout(self._read_timeout_s):
                await write_frame(conn.writer, answer)
            await close_stream(conn.writer)
            link = await handshake.open(local_id=self.peer_id, remote_id=offer.peer_id,
                                        timeout_s=self._handshake_timeout_s)
        except (TransportError, OSError, TimeoutError) as exc:
            self.stats["failed"] += 1
            log.warning("link with %r (%s) failed to open: %s", offer.peer_id, where, exc)
            return None
        finally:
            if link is None:
                await handshake.abort()
        self.stats["accepted"] += 1
        log.info("link with %r (%s, %s) open", offer.peer_id, offer.name, where)
        return link
