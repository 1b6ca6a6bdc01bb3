"""Signaling: an authenticated SDP offer/answer exchange over one short TCP connection.

The connecting peer (:func:`connect`) sends a :class:`~halo_p2p.wire.messages.SignalOffer`;
the listening peer (:class:`SignalingServer`) replies with a ``SignalAnswer`` or a
``SignalRefused`` and closes the stream; both then set up the WebRTC link
(:mod:`halo_p2p.net.webrtc`) directly between them.

Stream framing: each message is a 4-byte big-endian length, then one wire-codec frame
(:mod:`halo_p2p.wire.codec`) of at most :data:`MAX_FRAME_BYTES`. Every read has a timeout.

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
cost the listener one read timeout each (at most ``max_connections`` at once) and never a peer
connection (the MAC is checked first); replay a captured offer to another
swarm member within the window, which makes that member answer and try ICE towards the
original sender, but the DTLS handshake cannot complete without the original certificate's
private key, so it times out. It **cannot**: make a listener create a peer connection, get a
link to any peer, impersonate a peer's DTLS endpoint, read or alter activations and control
messages, or replay an offer to the same listener or an answer to another offer. Anyone
**with the key** is a full member: peer ids are not bound to keys, so members trust each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from halo_p2p.errors import AuthError, DecodeError, TransportError, VersionMismatch
from halo_p2p.net.swarmkey import ReplayGuard, sign, verify
from halo_p2p.net.webrtc import Handshake, WebRtcLink
from halo_p2p.wire.codec import decode, encode
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

SIGNALING_PROTOCOL: Final = 1
"""Version of this offer/answer exchange (the ``protocol`` field); peers must match exactly."""

MAX_FRAME_BYTES: Final = 64 << 10
"""Largest signaling frame accepted, in bytes (an SDP with a few candidates takes about 1 KB)."""

_KEY_FIX: Final = ("copy ~/.config/halo-p2p/swarm.key from a device of the swarm to this one, "
                   "or pass the same --swarm-key everywhere")
_ANSWER_GUARD = ReplayGuard()   # answers this process accepted (per-process; answers are rare)

OnLink = Callable[[WebRtcLink, str], Awaitable[None]]


class _Refuse(Exception):
    """A refusal: machine code and one-line reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def sign_message(msg: Any, key: bytes) -> Any:
    """``msg`` (a SignalOffer or SignalAnswer) with ``mac`` set: HMAC-SHA256 of its frame with ``mac=""``."""
    return dataclasses.replace(msg, mac=sign(key, encode(dataclasses.replace(msg, mac=""))))


def verify_message(msg: Any, key: bytes) -> bool:
    """Whether ``msg.mac`` is valid under ``key`` (constant-time comparison)."""
    return verify(key, encode(dataclasses.replace(msg, mac="")), msg.mac)


async def write_frame(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Write one length-prefixed frame and drain the stream."""
    frame = encode(msg)
    writer.write(len(frame).to_bytes(4, "big") + frame)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, *, timeout_s: float,
                     max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Read one length-prefixed frame, waiting at most ``timeout_s`` seconds.

    Raises:
        TransportError: timeout, end of stream, a length over ``max_bytes`` (nothing more is
            read), or bytes that are not a frame of this wire version.
    """
    try:
        return await _read_frame(reader, timeout_s=timeout_s, max_bytes=max_bytes)
    except _Refuse as refusal:
        raise TransportError(f"bad signaling frame ({refusal.code}): {refusal.reason}") from None


async def _read_frame(reader: asyncio.StreamReader, *, timeout_s: float, max_bytes: int) -> Message:
    try:
        async with asyncio.timeout(timeout_s):
            size = int.from_bytes(await reader.readexactly(4), "big")
            if size > max_bytes:
                raise _Refuse("oversize", f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
            body = await reader.readexactly(size)
    except TimeoutError:
        raise _Refuse("timeout", f"no complete frame within {timeout_s:g} s") from None
    except asyncio.IncompleteReadError as exc:
        raise _Refuse("bad-frame", f"stream ended after {len(exc.partial)} bytes") from None
    except ConnectionError as exc:
        raise _Refuse("bad-frame", f"connection lost: {exc}") from None
    try:
        return decode(body)
    except VersionMismatch as exc:
        raise _Refuse("version", str(exc)) from None
    except DecodeError as exc:
        raise _Refuse("bad-frame", str(exc)[:200]) from None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


class SignalingServer:
    """Answers signed offers on a TCP port and hands each resulting link to ``on_link``.

    Args:
        peer_id: this peer's id (sent in answers).
        name: this peer's human-readable name.
        swarm_key: the raw 32-byte swarm key.
        host: address to listen on (e.g. ``"127.0.0.1"`` or the LAN address).
        port: TCP port; 0 picks a free one (see :meth:`start`).
        on_link: ``await on_link(link, offer_peer_id)`` once both channels are open. It should
            hand the link off and return; it is cancelled (and the link closed) by :meth:`aclose`.
        read_timeout_s: longest wait for an offer, in seconds.
        handshake_timeout_s: longest wait for the channels to open after answering, in seconds.
        max_connections: connections handled at once; more are refused with code ``busy``.

    Attributes:
        stats: counters for the peer's status view: ``refused_<code>`` per refusal
            (``auth``, ``replay``, ``version``, ``oversize``, ``bad_frame``, ``bad_sdp``,
            ``timeout``, ``busy``), ``peer_connections`` created, ``accepted`` links and
            ``failed`` handshakes.
    """

    def __init__(self, peer_id: str, name: str, swarm_key: bytes, *, host: str, port: int = 0,
                 on_link: OnLink, read_timeout_s: float = 5.0, handshake_timeout_s: float = 10.0,
                 max_connections: int = 32) -> None:
        self.peer_id, self.name = peer_id, name
        self._key = swarm_key
        self._host, self._port = host, port
        self._on_link = on_link
        self._read_timeout_s, self._handshake_timeout_s = read_timeout_s, handshake_timeout_s
        self._max_connections = max_connections
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
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
        except OSError as exc:
            raise TransportError(f"cannot listen for signaling on {self._host}:{self._port}: {exc.strerror}",
                                 "pick another --port or address") from None
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("signaling for peer %s listening on %s:%d", self.peer_id, self._host, self._port)
        return self._port

    async def aclose(self) -> None:
        """Stop listening and cancel handshakes in progress (and their ``on_link``); idempotent."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
        try:
            await self._serve(reader, writer, where)
        except asyncio.CancelledError:
            pass   # only aclose() cancels; ending normally keeps asyncio's stream callback quiet
        except Exception:
            log.exception("signaling connection from %s failed", where)
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                await _close(writer)

    async def _refuse(self, writer: asyncio.StreamWriter, where: str, refusal: _Refuse, claimed: str) -> None:
        self.stats[f"refused_{refusal.code.replace('-', '_')}"] += 1
        log.warning("refused signaling offer from %s%s: %s (%s)", where, claimed, refusal.reason, refusal.code)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await write_frame(writer, SignalRefused(code=refusal.code, reason=refusal.reason))
        await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> None:
        claimed = ""
        try:
            if len(self._tasks) > self._max_connections:
                raise _Refuse("busy", f"more than {self._max_connections} signaling connections at once")
            offer = await _read_frame(reader, timeout_s=self._read_timeout_s, max_bytes=MAX_FRAME_BYTES)
            if not isinstance(offer, SignalOffer):
                raise _Refuse("bad-frame", f"expected SignalOffer, got {type(offer).__name__}")
            claimed = f" (claims to be {offer.peer_id!r:.80})"
            if not verify_message(offer, self._key):
                raise _Refuse("auth", "bad MAC: the offer was not signed with this swarm's key")
            reason = self._replay.check(offer.nonce, offer.sent_s)
            if reason is not None:
                raise _Refuse("replay", reason)
            if offer.protocol != SIGNALING_PROTOCOL:
                raise _Refuse("version", f"offer speaks signaling protocol {offer.protocol}, this peer speaks "
                                         f"{SIGNALING_PROTOCOL}; upgrade the older peer")
        except _Refuse as refusal:
            await self._refuse(writer, where, refusal, claimed)
            return
        self.stats["peer_connections"] += 1
        try:
            handshake = await Handshake.answer(offer.sdp)
        except TransportError as exc:
            await self._refuse(writer, where, _Refuse("bad-sdp", exc.problem), claimed)
            return
        link: WebRtcLink | None = None
        try:
            answer = sign_message(SignalAnswer(
                peer_id=self.peer_id, name=self.name, protocol=SIGNALING_PROTOCOL, nonce=secrets.token_hex(16),
                offer_nonce=offer.nonce, sent_s=time.time(), sdp=handshake.local_sdp, mac=""), self._key)
            async with asyncio.timeout(self._read_timeout_s):
                await write_frame(writer, answer)
            await _close(writer)
            link = await handshake.open(local_id=self.peer_id, remote_id=offer.peer_id,
                                        timeout_s=self._handshake_timeout_s)
        except (TransportError, OSError, TimeoutError) as exc:
            self.stats["failed"] += 1
            log.warning("link with %r (%s) failed to open: %s", offer.peer_id, where, exc)
            return
        finally:
            if link is None:
                await handshake.abort()
        self.stats["accepted"] += 1
        log.info("link with %r (%s, %s) open", offer.peer_id, offer.name, where)
        try:
            await self._on_link(link, offer.peer_id)
        except BaseException:
            await link.aclose()
            raise


async def connect(host: str, port: int, *, peer_id: str, name: str, swarm_key: bytes, timeout_s: float = 10.0,
                  expect_peer_id: str | None = None, **link_options: Any) -> WebRtcLink:
    """Offer a link to the peer listening at ``host:port`` and return it once both channels are open.

    Args:
        host, port: the peer's signaling endpoint.
        peer_id, name: this peer's id and human-readable name.
        swarm_key: the raw 32-byte swarm key.
        timeout_s: longest wait for the whole setup, in seconds.
        expect_peer_id: if set, refuse an answer from any other peer id.
        **link_options: keyword arguments of :class:`~halo_p2p.net.webrtc.WebRtcLink`.

    Raises:
        AuthError: the peer refused our key, its answer has a bad MAC (a different key), is
            stale or replayed, or comes from an unexpected peer id.
        TransportError: unreachable, refused for another reason, timed out, or ICE/DTLS failed.
        ConfigError: ICE host addresses are not pinned (see ``pin_host_addresses``).
    """
    where = f"{host}:{port}"
    handshake: Handshake | None = None
    try:
        async with asyncio.timeout(timeout_s):
            handshake = await Handshake.offer()
            offer = sign_message(SignalOffer(
                peer_id=peer_id, name=name, protocol=SIGNALING_PROTOCOL, nonce=secrets.token_hex(16),
                sent_s=time.time(), sdp=handshake.local_sdp, mac=""), swarm_key)
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                raise TransportError(f"cannot reach peer at {where}: {exc.strerror or exc}",
                                     "check that halo-peer runs there and that the port is open") from None
            try:
                await write_frame(writer, offer)
                reply = await _read_frame(reader, timeout_s=timeout_s, max_bytes=MAX_FRAME_BYTES)
            except _Refuse as refusal:
                raise TransportError(f"peer at {where} sent no valid answer ({refusal.code}): {refusal.reason}",
                                     "check that both peers run the same halo-p2p version") from None
            except ConnectionError as exc:
                raise TransportError(f"peer at {where} dropped the signaling connection: {exc}") from None
            finally:
                await _close(writer)
            link = await _finish(handshake, reply, offer, swarm_key, where=where, peer_id=peer_id,
                                   expect_peer_id=expect_peer_id, timeout_s=timeout_s, link_options=link_options)
            handshake = None
            return link
    except TimeoutError:
        raise TransportError(f"connecting to peer at {where} timed out after {timeout_s:g} s",
                             "check that the peer is up and reachable over TCP and UDP") from None
    finally:
        if handshake is not None:
            await handshake.abort()


async def _finish(handshake: Handshake, reply: Message, offer: SignalOffer, swarm_key: bytes, *, where: str,
                  peer_id: str, expect_peer_id: str | None, timeout_s: float,
                  link_options: dict[str, Any]) -> WebRtcLink:
    """Check the reply to ``offer``, apply the answer and open the link."""
    if isinstance(reply, SignalRefused):
        if reply.code == "auth":
            raise AuthError(f"peer at {where} refused our swarm key: {reply.reason}", _KEY_FIX)
        fix = "upgrade the older peer" if reply.code == "version" else "try again; see the peer's log"
        raise TransportError(f"peer at {where} refused the connection ({reply.code}): {reply.reason}", fix)
    if not isinstance(reply, SignalAnswer):
        raise TransportError(f"peer at {where} replied with {type(reply).__name__}, not an answer",
                             "check that both peers run the same halo-p2p version")
    who = f"peer {reply.peer_id!r:.80} at {where}"
    if not verify_message(reply, swarm_key):
        raise AuthError(f"{who} answered with a bad MAC: it holds a different swarm key", _KEY_FIX)
    if reply.offer_nonce != offer.nonce:
        raise AuthError(f"{who} answered another offer (a replayed answer)", "try again")
    reason = _ANSWER_GUARD.check(reply.nonce, reply.sent_s)
    if reason is not None:
        raise AuthError(f"{who} sent a stale answer: {reason}", "synchronize the clocks (NTP) and try again")
    if reply.protocol != SIGNALING_PROTOCOL:
        raise TransportError(f"{who} speaks signaling protocol {reply.protocol}, this peer speaks "
                             f"{SIGNALING_PROTOCOL}", "upgrade the older peer")
    if expect_peer_id is not None and reply.peer_id != expect_peer_id:
        raise AuthError(f"{who} is not the expected peer {expect_peer_id!r}", "check the address of the peer")
    await handshake.accept_answer(reply.sdp)
    return await handshake.open(local_id=peer_id, remote_id=reply.peer_id, timeout_s=timeout_s, **link_options)
