"""The WebRTC link: a :class:`~halo_p2p.net.link.Link` over two aiortc data channels.

With its helpers :mod:`~halo_p2p.net.ice` (host candidates, UDP sockets) and
:mod:`~halo_p2p.net.sctp_tuning` (SCTP patches), imported only here, the only module that
imports :mod:`aiortc` and :mod:`aioice`. One ``RTCPeerConnection`` per link carries two
negotiated data channels (RFC 8831; no DCEP round trip, RFC 8832 §6 — both ends create them
with fixed stream ids):

* ``halo-ctl`` (id 0): reliable, ordered — :attr:`Channel.RELIABLE`;
* ``halo-act`` (id 1): ``ordered=False, maxRetransmits=0`` — :attr:`Channel.UNRELIABLE`.

Rules measured on aiortc 1.16 / aioice 0.13 (``network-facts.md`` §2, §5):

* No STUN server, host candidates only on the addresses given to :func:`pin_host_addresses`
  (process-wide; a handshake refuses to start before it was called), ICE sockets with 8 MiB
  receive buffers: :mod:`halo_p2p.net.ice`.
* "Unreliable" is still congestion-controlled and ``bufferedAmount`` is unbounded, so
  unreliable sends are dropped (and counted) while the channel's backlog exceeds a cap: a stale
  activation is worse than a lost one. Reliable sends wait for the backlog to drain. aiortc
  queues the messages of both channels in one FIFO, so a large reliable backlog also delays the
  unreliable frames (and heartbeats) sent after it. The SCTP congestion window is floored at
  128 KiB (:func:`~halo_p2p.net.sctp_tuning.floor_congestion_window`).
* Every datagram costs tens of µs of Python CPU at each end, and stock aiortc sends a SACK packet
  for every DATA packet. :mod:`halo_p2p.net.sctp_tuning` patches each link: SACKs of
  single-packet messages delayed (every second packet, else at most 20 ms) and bundled into the
  next DATA packet (RFC 9260 §6.2, §6.10), one send-queue flush per loop iteration, datagrams
  handled in the socket callback. A 650-byte request/response then moves 2 datagrams instead of
  4, for ~25 % less CPU per exchange at each end (``benchmarks/frame_cost.py``).

Heartbeats (``Heartbeat``/``HeartbeatAck`` frames on the unreliable channel, consumed here)
measure the RTT, its jitter and the loss rate (:class:`~halo_p2p.net.heartbeat.HeartbeatEstimator`;
heartbeats go 5 times as often until the loss rate is known, so a new link knows within ~2 s
whether it needs FEC); a link that hears nothing for ``dead_after_s`` closes itself. Loss
emulation on loopback is a wrapper, :class:`~halo_p2p.net.lossy.LossyLink`; it loses this link's
heartbeats through :meth:`WebRtcLink.set_heartbeat_loss`, so the loss estimate sees the emulated
loss.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.sdp import SessionDescription

from halo_p2p.errors import ConfigError, LinkClosed, TransportError, WireError
from halo_p2p.net.heartbeat import HeartbeatEstimator
from halo_p2p.net.ice import new_peer_connection, pin_host_addresses, raise_receive_buffers
from halo_p2p.net.link import MAX_MESSAGE_BYTES, SCTP_FRAGMENT_BYTES, Channel, LinkStats
from halo_p2p.net.sctp_tuning import CWND_FLOOR_BYTES, floor_congestion_window
from halo_p2p.net.sctp_tuning import reduce_frame_cost as _reduce_frame_cost
from halo_p2p.wire.codec import decode, encode
from halo_p2p.wire.messages import Heartbeat, HeartbeatAck

__all__ = ["ACT_LABEL", "CTL_LABEL", "CWND_FLOOR_BYTES", "Handshake", "WebRtcLink", "pin_host_addresses"]

log = logging.getLogger(__name__)

CTL_LABEL: Final = "halo-ctl"
ACT_LABEL: Final = "halo-act"
_HB_PREFIXES: Final = (encode(Heartbeat(seq=0, sent_s=0.0))[:3], encode(HeartbeatAck(seq=0, sent_s=0.0))[:3])
_CLOSED: Final = object()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a peer connection failed: %r", task.exception())


class Handshake:
    """One side of a peer connection being set up; becomes a :class:`WebRtcLink` with :meth:`open`.

    Build with :meth:`offer` or :meth:`answer`, exchange :attr:`local_sdp` through signaling
    (the offerer then calls :meth:`accept_answer`), then :meth:`open`. Messages that arrive
    before :meth:`open` returns are kept for the link.
    """

    def __init__(self, pc: RTCPeerConnection) -> None:
        self._pc = pc
        self._ctl = pc.createDataChannel(CTL_LABEL, negotiated=True, id=0, ordered=True)
        self._act = pc.createDataChannel(ACT_LABEL, negotiated=True, id=1, ordered=False, maxRetransmits=0)
        self._early: list[tuple[Channel, bytes | str]] = []
        self._ready = asyncio.Event()
        self._handlers: list[tuple[Any, str, Any]] = [
            (self._ctl, "message", lambda d: self._early.append((Channel.RELIABLE, d))),
            (self._act, "message", lambda d: self._early.append((Channel.UNRELIABLE, d))),
            (self._ctl, "open", self._check_ready), (self._act, "open", self._check_ready),
            (pc, "connectionstatechange", self._check_ready)]
        for emitter, event, handler in self._handlers:
            emitter.on(event, handler)

    @classmethod
    async def offer(cls) -> Handshake:
        """Create the peer connection, its two channels and the SDP offer (candidates gathered).

        Raises:
            ConfigError: :func:`pin_host_addresses` was not called.
        """
        return await cls._create(None)

    @classmethod
    async def answer(cls, offer_sdp: str) -> Handshake:
        """Create the answering peer connection for ``offer_sdp`` and its SDP answer.

        Raises:
            ConfigError: :func:`pin_host_addresses` was not called.
            TransportError: ``offer_sdp`` is not a usable offer.
        """
        return await cls._create(offer_sdp)

    @classmethod
    async def _create(cls, offer_sdp: str | None) -> Handshake:
        pc = new_peer_connection()
        try:
            if offer_sdp is not None:
                await _set_remote(pc, offer_sdp, "offer")
            hs = cls(pc)
            if offer_sdp is None:
                await pc.setLocalDescription(await pc.createOffer())
            else:
                await _answer_remote(pc)
        except BaseException:
            await pc.close()
            raise
        raise_receive_buffers(pc)
        floor_congestion_window(pc)
        _reduce_frame_cost(pc)
        return hs

    @property
    def local_sdp(self) -> str:
        """This side's SDP (offer or answer) with every gathered candidate."""
        return self._pc.localDescription.sdp

    async def accept_answer(self, answer_sdp: str) -> None:
        """Offerer side: apply the peer's SDP answer.

        Raises:
            TransportError: ``answer_sdp`` is not a usable answer.
        """
        await _set_remote(self._pc, answer_sdp, "answer")

    def _check_ready(self) -> None:
        if self._pc.connectionState in ("failed", "closed") or self._ctl.readyState == self._act.readyState == "open":
            self._ready.set()

    async def open(self, *, local_id: str, remote_id: str, timeout_s: float, **options: Any) -> WebRtcLink:
        """Wait until ICE, DTLS, SCTP and both channels are up, and return the link.

        Args:
            local_id, remote_id: peer ids of this end and the other.
            timeout_s: longest wait in seconds.
            **options: keyword arguments of :class:`WebRtcLink`.

        Raises:
            TransportError: ICE or DTLS failed, or the channels did not open in time (the peer
                connection is then closed).
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        if not self._ready.is_set() or self._pc.connectionState in ("failed", "closed"):
            state = self._pc.connectionState if self._ready.is_set() else f"did not open within {timeout_s:g} s"
            await self.abort()
            raise TransportError(f"connection to peer {remote_id} {state} (ICE, DTLS or SCTP)",
                                 "check that both devices can reach each other over UDP")
        self._detach()
        return WebRtcLink(self._pc, self._ctl, self._act, local_id=local_id, remote_id=remote_id,
                          early=self._early, **options)

    def _detach(self) -> None:
        for emitter, event, handler in self._handlers:
            with contextlib.suppress(KeyError):
                emitter.remove_listener(event, handler)
        self._handlers.clear()

    async def abort(self) -> None:
        """Close the peer connection (idempotent)."""
        self._detach()
        await self._pc.close()


_SDP_FIX: Final = "the peer runs an incompatible version"


async def _set_remote(pc: RTCPeerConnection, sdp: str, kind: str) -> None:
    """Apply the peer's SDP ``kind`` ("offer" or "answer"); any failure is a TransportError."""
    try:
        _check_remote_sdp(sdp, kind)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
    except TransportError:
        raise
    except Exception as exc:   # aiortc parses with asserts, int() and indexing: any failure means a bad SDP
        raise TransportError(f"unusable SDP {kind}: {type(exc).__name__}: {exc!s:.200}", _SDP_FIX) from exc
    if pc.sctp is None:
        raise TransportError(f"unusable SDP {kind}: no data-channel (m=application) section", _SDP_FIX)


async def _answer_remote(pc: RTCPeerConnection) -> None:
    """Answerer side: create and apply the answer to the remote offer (which may still not fit)."""
    try:
        await pc.setLocalDescription(await pc.createAnswer())
    except OSError:
        raise                  # local: no socket for ICE
    except Exception as exc:   # e.g. "Media sections in answer do not match offer"
        raise TransportError(f"unusable SDP offer: no answer fits it ({type(exc).__name__}: {exc!s:.200})",
                             _SDP_FIX) from exc


def _check_remote_sdp(sdp: str, kind: str) -> None:
    """What aiortc accepts but later fails on in a background task: exactly one data-channel
    section, an SCTP port and candidate ports in 1..65535, candidates on IP addresses.

    Raises:
        TransportError: the SDP is not of that shape (other exceptions: unparsable).
    """
    media = SessionDescription.parse(sdp).media
    problem = None
    if len(media) != 1 or media[0].kind != "application" or "m=application" not in sdp:
        problem = "no data-channel (m=application) section" if not media else "not exactly one data-channel section"
    else:
        port = int(media[0].fmt[0]) if media[0].profile == "DTLS/SCTP" else media[0].sctp_port
        if port is None or not 0 < port < 65536:
            problem = f"SCTP port {port} is not in 1..65535"
        for candidate in media[0].ice_candidates:
            ipaddress.ip_address(candidate.ip)
            if not (0 < candidate.port < 65536 and candidate.component == 1):
                problem = f"ICE candidate {candidate.ip}:{candidate.port} (component {candidate.component}) is unusable"
    if problem is not None:
        raise TransportError(f"unusable SDP {kind}: {problem}", _SDP_FIX)


class WebRtcLink:
    """One end of a WebRTC link; satisfies :class:`~halo_p2p.net.link.Link`. Built by :class:`Handshake`.

    Args:
        pc, ctl, act: the open peer connection and its two channels.
        local_id, remote_id: peer ids of this end and the other.
        early: messages that arrived before the link existed.
        heartbeat_interval_s: seconds between heartbeats (default 0.5).
        dead_after_s: close the link after this many seconds without any frame (default 3).
        max_unreliable_bytes: largest unreliable message (default 1160, one SCTP packet).
        unreliable_backlog_bytes: drop unreliable sends while the channel holds more than this
            many unsent bytes (default 64 KiB).
        reliable_high_water_bytes / reliable_low_water_bytes: a reliable send waits while more
            than the high mark is queued, until the queue drains to the low mark.
        send_timeout_s: longest wait of a reliable send, in seconds.
        max_inbox_messages: unreliable messages beyond this many unread ones are dropped.

    Raises:
        ConfigError: an option is out of range.
    """

    def __init__(self, pc: RTCPeerConnection, ctl: Any, act: Any, *, local_id: str, remote_id: str,
                 early: Iterable[tuple[Channel, bytes | str]] = (), heartbeat_interval_s: float = 0.5,
                 dead_after_s: float = 3.0, max_unreliable_bytes: int = SCTP_FRAGMENT_BYTES,
                 unreliable_backlog_bytes: int = 64 << 10, reliable_high_water_bytes: int = 1 << 20,
                 reliable_low_water_bytes: int = 256 << 10, send_timeout_s: float = 10.0,
                 max_inbox_messages: int = 8192) -> None:
        if not (0 < heartbeat_interval_s < dead_after_s and send_timeout_s > 0
                and 1 <= max_unreliable_bytes <= MAX_MESSAGE_BYTES and unreliable_backlog_bytes >= 0
                and 0 <= reliable_low_water_bytes < reliable_high_water_bytes and max_inbox_messages >= 1):
            raise ConfigError("WebRtcLink options are out of range",
                              "need 0 < heartbeat_interval_s < dead_after_s, 1 <= max_unreliable_bytes <= "
                              f"{MAX_MESSAGE_BYTES}, low water < high water")
        self._pc, self._ctl, self._act = pc, ctl, act
        self._local_id, self._remote_id = local_id, remote_id
        self._hb_interval_s, self._dead_after_s = heartbeat_interval_s, dead_after_s
        self._max_unreliable_bytes = max_unreliable_bytes
        self._backlog_cap = unreliable_backlog_bytes
        self._high_water = reliable_high_water_bytes
        self._send_timeout_s = send_timeout_s
        self._max_inbox = max_inbox_messages
        self._stats = LinkStats()
        self._heartbeat_drop: Callable[[], bool] | None = None
        self.backlog_drops = 0
        """Unreliable sends dropped because the channel's backlog exceeded the cap (also in ``messages_lost``)."""
        self.inbox_drops = 0
        """Unreliable messages dropped on arrival because the inbox was full."""
        self.close_reason: str | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._last_heard_s = time.monotonic()
        self._heartbeats = HeartbeatEstimator(self._stats)
        ctl.bufferedAmountLowThreshold = reliable_low_water_bytes
        ctl.on("message", lambda d: self._on_message(Channel.RELIABLE, d))
        act.on("message", lambda d: self._on_message(Channel.UNRELIABLE, d))
        ctl.on("bufferedamountlow", self._drained.set)
        for channel in (ctl, act):
            channel.on("close", lambda: self._shutdown("the peer closed the link"))
        pc.on("connectionstatechange", self._on_state)
        self._hb_task = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat {local_id}->{remote_id}")
        for item in early:
            self._on_message(*item)
        if ctl.readyState != "open" or act.readyState != "open" or pc.connectionState in ("failed", "closed"):
            self._shutdown("the connection closed while it was being set up")

    def __repr__(self) -> str:
        return f"WebRtcLink({self._local_id!r} -> {self._remote_id!r}, {'closed' if self._closed else 'open'})"

    @property
    def local_id(self) -> str:
        """Peer id of this end."""
        return self._local_id

    @property
    def remote_id(self) -> str:
        """Peer id of the other end."""
        return self._remote_id

    @property
    def max_unreliable_bytes(self) -> int:
        """Largest unreliable message in bytes."""
        return self._max_unreliable_bytes

    @property
    def stats(self) -> LinkStats:
        """Live counters; ``rtt_ms``, ``jitter_ms`` and ``measured_plr`` come from heartbeats."""
        return self._stats

    @property
    def closed(self) -> bool:
        """Whether the link is closed (by either end, or declared dead)."""
        return self._closed

    @property
    def last_heard_s(self) -> float:
        """``time.monotonic()`` when the last frame (of any kind) arrived from the peer."""
        return self._last_heard_s

    @property
    def local_sdp(self) -> str:
        """This end's SDP (for diagnostics)."""
        return self._pc.localDescription.sdp

    @property
    def remote_sdp(self) -> str:
        """The peer's SDP (for diagnostics)."""
        return self._pc.remoteDescription.sdp

    def wire_bytes(self) -> tuple[int, int] | None:
        """``(sent, received)`` DTLS bytes on the wire (UDP payloads without ICE checks), or None if unknown."""
        try:
            report = self._pc.sctp.transport._get_stats()  # type: ignore[union-attr]  # private, aiortc 1.16; None: caught
            stats = next(iter(report.values()))
            return int(stats.bytesSent), int(stats.bytesReceived)
        except (AttributeError, StopIteration, TypeError):
            return None

    def set_heartbeat_loss(self, drop: Callable[[], bool] | None) -> None:
        """Emulate the loss of this end's heartbeat traffic (:class:`~halo_p2p.net.lossy.LossyLink`).

        ``drop()`` is asked once per ``Heartbeat`` / ``HeartbeatAck`` frame this end sends or
        receives; ``True`` loses it (sent: never arrives; received: ignored, not even as a sign
        of life). The loss estimates of both ends then include the emulated loss. ``None``
        turns it off. Other frames are not affected: the wrapper loses them itself.
        """
        self._heartbeat_drop = drop

    def _closed_error(self) -> LinkClosed:
        return LinkClosed(f"link {self._local_id} -> {self._remote_id} is closed ({self.close_reason})")

    async def send(self, channel: Channel, data: bytes) -> None:
        """Send one message; see :meth:`~halo_p2p.net.link.Link.send`.

        Unreliable: never waits; dropped (counted in ``messages_lost`` and :attr:`backlog_drops`)
        while the channel's backlog exceeds the cap. Reliable: waits while more than the high
        water mark is queued.

        Raises:
            ValueError: an unreliable message over :attr:`max_unreliable_bytes`, or a reliable one
                over 262144 bytes (aiortc's limit; callers chunk).
            TransportError: a reliable send waited longer than ``send_timeout_s``.
            LinkClosed: the link is closed.
        """
        if self._closed:
            raise self._closed_error()
        channel = Channel(channel)
        data = memoryview(data).tobytes()
        counters = self._stats[channel]
        if channel is Channel.UNRELIABLE:
            if len(data) > self._max_unreliable_bytes:
                counters.messages_dropped_for_size += 1
                raise ValueError(f"unreliable message of {len(data)} bytes exceeds the {self._max_unreliable_bytes}"
                                 f"-byte limit of link {self._local_id} -> {self._remote_id}; chunk it")
            counters.messages_sent += 1
            counters.bytes_sent += len(data)
            if self._act.bufferedAmount > self._backlog_cap:
                counters.messages_lost += 1
                counters.bytes_lost += len(data)
                self.backlog_drops += 1
                return
            self._channel_send(self._act, data)
            return
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"reliable message of {len(data)} bytes exceeds aiortc's {MAX_MESSAGE_BYTES}-byte "
                             f"limit on link {self._local_id} -> {self._remote_id}; chunk it")
        try:
            async with asyncio.timeout(self._send_timeout_s):
                while self._ctl.bufferedAmount > self._high_water and not self._closed:
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            raise TransportError(f"reliable send to {self._remote_id} waited {self._send_timeout_s:g} s with "
                                 f"{self._ctl.bufferedAmount} bytes queued",
                                 "the peer or the network is too slow; send less") from None
        if self._closed:
            raise self._closed_error()
        counters.messages_sent += 1
        counters.bytes_sent += len(data)
        self._channel_send(self._ctl, data)

    def _channel_send(self, channel: Any, data: bytes) -> None:
        try:
            channel.send(data)
        except InvalidStateError:
            self._shutdown("the data channel closed")
            raise self._closed_error() from None

    async def recv(self) -> tuple[Channel, bytes]:
        """Wait for the next message (heartbeats excluded); cancellation-safe.

        Raises:
            LinkClosed: the link is closed and every message that had arrived was read.
        """
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)
            raise self._closed_error()
        return item

    async def drain(self) -> None:
        """Wait (polling every millisecond) until the unreliable backlog is under half the cap.

        Raises:
            TransportError: still above it after ``send_timeout_s``.
            LinkClosed: the link closed meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._send_timeout_s
        while self._act.bufferedAmount > self._backlog_cap // 2:
            if self._closed:
                raise self._closed_error()
            if loop.time() > deadline:
                raise TransportError(f"unreliable backlog to {self._remote_id} did not drain in "
                                     f"{self._send_timeout_s:.0f} s", "the peer or the network is overloaded")
            await asyncio.sleep(0.001)

    async def aclose(self) -> None:
        """Close the link and the peer connection; idempotent. The peer's ``recv`` raises ``LinkClosed``."""
        self._shutdown("closed by this end")
        owned = [t for t in (self._hb_task, self._close_task) if t is not None and t is not asyncio.current_task()]
        if owned:   # asyncio.wait never raises; bounded because aiortc's close can wait on its own close task
            await asyncio.wait(owned, timeout=5.0)

    # -- internals -------------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        log.info("link %s -> %s closed: %s", self._local_id, self._remote_id, reason)
        self._inbox.put_nowait(_CLOSED)
        self._drained.set()
        if self._hb_task is not asyncio.current_task():
            self._hb_task.cancel()
        self._close_task = asyncio.ensure_future(self._pc.close())
        self._close_task.add_done_callback(_log_failure)

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._shutdown(f"ICE/DTLS connection {self._pc.connectionState}")

    def _on_message(self, channel: Channel, data: bytes | str) -> None:
        if self._closed:
            return
        if isinstance(data, str):
            data = data.encode()
        msg: object = None
        if channel is Channel.UNRELIABLE and len(data) < 32 and data[:3] in _HB_PREFIXES:
            try:
                msg = decode(data)
            except WireError:
                msg = None
        if isinstance(msg, Heartbeat | HeartbeatAck):
            if self._heartbeat_drop is not None and self._heartbeat_drop():
                return                        # emulated loss: never arrived, nothing heard
            self._last_heard_s = time.monotonic()
            if isinstance(msg, Heartbeat):
                self._send_internal(encode(HeartbeatAck(seq=msg.seq, sent_s=msg.sent_s)))
            else:
                self._heartbeats.acked(msg.seq, msg.sent_s, time.monotonic())
            return
        self._last_heard_s = time.monotonic()
        if channel is Channel.UNRELIABLE and self._inbox.qsize() >= self._max_inbox:
            self.inbox_drops += 1
            return
        counters = self._stats[channel]
        counters.messages_delivered += 1
        counters.bytes_delivered += len(data)
        self._inbox.put_nowait((channel, data))

    def _send_internal(self, frame: bytes) -> bool:
        """Send a heartbeat frame unless the unreliable backlog is over the cap."""
        if self._closed or self._act.bufferedAmount > self._backlog_cap:
            return False
        if self._heartbeat_drop is not None and self._heartbeat_drop():
            return True                       # emulated loss: sent, never arrives
        try:
            self._act.send(frame)
        except InvalidStateError:
            self._shutdown("the data channel closed")
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        """Send a heartbeat every interval; declare the peer dead after ``dead_after_s`` of silence."""
        wake_s = time.monotonic()
        while not self._closed:
            now = time.monotonic()
            if now - wake_s > self._dead_after_s / 2:   # our own event loop stalled: do not blame the peer
                log.debug("link %s -> %s: event loop stalled %.1f s", self._local_id, self._remote_id, now - wake_s)
                self._last_heard_s = max(self._last_heard_s, now)
            silent_s = now - self._last_heard_s
            if silent_s > self._dead_after_s:
                log.warning("link %s -> %s: nothing heard for %.1f s; closing", self._local_id,
                            self._remote_id, silent_s)
                self._shutdown(f"peer silent for {silent_s:.1f} s")
                return
            seq = self._heartbeats.next_seq()
            if self._send_internal(encode(Heartbeat(seq=seq, sent_s=now))):
                self._heartbeats.sent(seq, now)
            self._heartbeats.update_plr(now)
            interval = self._heartbeats.interval_s(self._hb_interval_s)
            wake_s = now + interval
            await asyncio.sleep(interval)
