"""The offering side of signaling (:func:`connect`) and the stream framing and MACs both sides use.

The exchange, the MAC, freshness, the security argument and the abuse limits are described in
:mod:`halo_p2p.net.signaling` (whose names these are: import them from there).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import secrets
import time
from typing import Any, Final

from halo_p2p.errors import AuthError, DecodeError, HaloError, TransportError, VersionMismatch
from halo_p2p.net.swarmkey import ReplayGuard, sign, verify
from halo_p2p.net.webrtc import Handshake, WebRtcLink
from halo_p2p.wire.codec import decode, encode
from halo_p2p.wire.messages import Message, SignalAnswer, SignalOffer, SignalRefused

__all__ = ["MAX_FRAME_BYTES", "SIGNALING_PROTOCOL", "Refusal", "close_stream", "connect", "read_frame",
           "receive_frame", "sign_message", "verify_message", "write_frame"]

log = logging.getLogger(__name__)

SIGNALING_PROTOCOL: Final = 1
"""Version of this offer/answer exchange (the ``protocol`` field); peers must match exactly."""

MAX_FRAME_BYTES: Final = 64 << 10
"""Largest signaling frame accepted, in bytes (an SDP with a few candidates takes about 1 KB)."""

_KEY_FIX: Final = ("copy ~/.config/halo-p2p/swarm.key from a device of the swarm to this one, "
                   "or pass the same --swarm-key everywhere")
_ANSWER_GUARD = ReplayGuard()   # answers this process accepted (per-process; answers are rare)


class Refusal(Exception):
    """A signaling refusal: wire ``code``, one-line ``reason``, and the ``cause`` it is counted under
    (default: the code, with ``_`` for ``-``)."""

    def __init__(self, code: str, reason: str, cause: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason
        self.cause = (cause or code).replace("-", "_")


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
            read), or bytes that are not a frame of this wire version (whatever the codec
            raised); the message names the refusal code.
    """
    try:
        return await receive_frame(reader, timeout_s=timeout_s, max_bytes=max_bytes)
    except Refusal as refusal:
        raise TransportError(f"bad signaling frame ({refusal.code}): {refusal.reason}") from None


async def receive_frame(reader: asyncio.StreamReader, *, timeout_s: float, max_bytes: int) -> Message:
    """:func:`read_frame`, raising :class:`Refusal` on any failure (cause ``closed``: the stream
    ended or broke before a single byte)."""
    size: int | None = None
    try:
        async with asyncio.timeout(timeout_s):
            size = int.from_bytes(await reader.readexactly(4), "big")
            if size > max_bytes:
                raise Refusal("oversize", f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
            body = await reader.readexactly(size)
    except TimeoutError:
        raise Refusal("timeout", f"no complete frame within {timeout_s:g} s") from None
    except asyncio.IncompleteReadError as exc:
        cause = "closed" if size is None and not exc.partial else None
        raise Refusal("bad-frame", f"stream ended after {len(exc.partial)} bytes", cause) from None
    except ConnectionError as exc:
        raise Refusal("bad-frame", f"connection lost: {exc}", "closed" if size is None else None) from None
    try:
        return decode(body)
    except VersionMismatch as exc:
        raise Refusal("version", str(exc)) from None
    except DecodeError as exc:
        raise Refusal("bad-frame", str(exc)[:200]) from None
    except Exception as exc:   # a codec bug on hostile bytes: still a refusal, never a traceback
        raise Refusal("bad-frame", f"frame of {size} bytes cannot be decoded ({type(exc).__name__})") from None


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close ``writer`` and wait up to 1 s for it to close (errors ignored)."""
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


async def connect(host: str, port: int, *, peer_id: str, name: str, swarm_key: bytes, timeout_s: float = 10.0,
                  expect_peer_id: str | None = None, **link_options: Any) -> WebRtcLink:
    """Offer a link to the peer listening at ``host:port`` and return it once both channels are open.

    A ``busy`` refusal (the peer is crowded, possibly by strangers) is retried with a fresh
    offer after 50-500 ms, until ``timeout_s``; so is, twice, a connection dropped unanswered.

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
        TransportError: unreachable, refused for another reason, timed out, ICE/DTLS failed, or
            its reply is unusable in any way (never another exception for what the peer sent).
        ConfigError: ICE host addresses are not pinned (see ``pin_host_addresses``).
    """
    where = f"{host}:{port}"
    handshake: Handshake | None = None
    busy = ""
    try:
        async with asyncio.timeout(timeout_s):
            handshake = await Handshake.offer()
            drops = 0
            for attempt in itertools.count():
                offer = sign_message(SignalOffer(
                    peer_id=peer_id, name=name, protocol=SIGNALING_PROTOCOL, nonce=secrets.token_hex(16),
                    sent_s=time.time(), sdp=handshake.local_sdp, mac=""), swarm_key)
                try:
                    reply = await _exchange(host, port, offer, where=where, timeout_s=timeout_s)
                except _Dropped as exc:
                    drops += 1
                    if drops > 2:
                        raise TransportError(f"peer at {where} dropped the signaling connection: {exc}") from None
                    busy = f"dropped the connection ({exc})"
                else:
                    if not (isinstance(reply, SignalRefused) and reply.code == "busy"):
                        break
                    busy = reply.reason
                await asyncio.sleep(min(0.05 * 2 ** attempt, 0.5) * random.uniform(0.5, 1.0))
            try:
                link = await _finish(handshake, reply, offer, swarm_key, where=where, peer_id=peer_id,
                                     expect_peer_id=expect_peer_id, timeout_s=timeout_s, link_options=link_options)
            except HaloError:
                raise
            except Exception as exc:   # whatever a hostile or broken answer makes a library raise
                raise TransportError(f"peer at {where} sent an unusable answer ({type(exc).__name__}: {exc!s:.200})",
                                     "check that both peers run the same halo-p2p version") from None
            handshake = None
            return link
    except TimeoutError:
        if busy:
            raise TransportError(f"peer at {where} refused the connection (busy) until the {timeout_s:g} s "
                                 f"deadline: {busy}", "try again later; see the peer's log") from None
        raise TransportError(f"connecting to peer at {where} timed out after {timeout_s:g} s",
                             "check that the peer is up and reachable over TCP and UDP") from None
    finally:
        if handshake is not None:
            await handshake.abort()


class _Dropped(Exception):
    """The peer closed or reset the signaling connection before replying."""


async def _exchange(host: str, port: int, offer: SignalOffer, *, where: str, timeout_s: float) -> Message:
    """One TCP connection: send ``offer``, return the reply frame."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise TransportError(f"cannot reach peer at {where}: {exc.strerror or exc}",
                             "check that halo-peer runs there and that the port is open") from None
    try:
        await write_frame(writer, offer)
        return await receive_frame(reader, timeout_s=timeout_s, max_bytes=MAX_FRAME_BYTES)
    except Refusal as refusal:
        if refusal.cause == "closed":
            raise _Dropped(refusal.reason) from None
        raise TransportError(f"peer at {where} sent no valid answer ({refusal.code}): {refusal.reason}",
                             "check that both peers run the same halo-p2p version") from None
    except ConnectionError as exc:
        raise _Dropped(str(exc) or type(exc).__name__) from None
    finally:
        await close_stream(writer)


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
