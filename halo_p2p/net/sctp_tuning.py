"""Per-link patches of aiortc's SCTP and DTLS that cut the CPU per data-channel frame, and the
congestion-window floor (:func:`floor_congestion_window`).

Imported only by :mod:`halo_p2p.net.webrtc`. Every patch replaces attributes of one transport
*instance* (never a class), is best effort (a missing private attribute leaves that transport
stock and logs at debug level) and was checked on aiortc 1.16 / aioice 0.13.

aiortc's SCTP and DTLS are Python: a request/response exchange of two 650-byte messages costs
~300 µs of CPU on each end (``benchmarks/frame_cost.py``), most of it per UDP datagram. Stock
aiortc answers every packet carrying DATA with a SACK packet of its own
(``RTCSctpTransport._handle_data``), so the exchange moves four datagrams; it also starts a task
per sent message (``asyncio.ensure_future(self._data_channel_flush())``) and hands each received
datagram to a task through a queue. The patches:

* :func:`delay_sacks`: delayed acknowledgement (RFC 9260 §6.2) and the pending SACK bundled
  into the next outgoing DATA packet (RFC 9260 §6.10): two datagrams per exchange, not four;
* :func:`coalesce_flushes`: one flush of the send queue per loop iteration, run by a callback;
* :func:`receive_inline`: each datagram decrypted and handled in the socket's callback.

Measured with ``benchmarks/frame_cost.py`` (processes on loopback, 650-byte messages, medians of
4-5 runs, stock → patched): one worker, CPU per exchange 295 → 226 µs (coordinator) and
273 → 196 µs (worker), round trip unchanged (381 → 384 µs); three workers, 849 → 625 µs
(coordinator) and 378 → 259 µs (each worker) per round, round trip 1169 → 861 µs. Reliable
bulk transfers keep their throughput (11.6 → 11.9 MiB/s).
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final

from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcsctptransport import (
    WEBRTC_BINARY,
    WEBRTC_BINARY_EMPTY,
    WEBRTC_STRING,
    WEBRTC_STRING_EMPTY,
    serialize_packet,
)

__all__ = ["CWND_FLOOR_BYTES", "SACK_DELAY_S", "coalesce_flushes", "delay_sacks", "floor_congestion_window",
           "receive_inline", "reduce_frame_cost"]

log = logging.getLogger(__name__)

SACK_DELAY_S: Final = 0.02
"""Longest delay of a SACK, in seconds. RFC 9260 §6.2 recommends 200 ms and allows up to 500 ms;
20 ms covers a worker's compute before its answer (which then carries the SACK) and keeps the
delay out of the sender's retransmission timeout (at least 1 s, RFC 9260 §6.3.1). Delivery does
not wait for SACKs: only the sender's bookkeeping does."""

CWND_FLOOR_BYTES: Final = 128 << 10
"""Smallest SCTP congestion window of a link (bytes): :func:`floor_congestion_window`."""

_DATA, _SACK, _FORWARD_TSN = 0, 3, 192     # chunk types: RFC 9260 §3.2, RFC 3758 §3.2
_MAX_PACKET_BYTES: Final = 1189            # aiortc 1.16 SCTP_MAX_PACKET_LENGTH (IPv6 minimum MTU)


def reduce_frame_cost(pc: Any) -> None:
    """Apply every patch of this module to the SCTP association of ``pc`` (an ``RTCPeerConnection``)."""
    if pc.sctp is not None:
        delay_sacks(pc.sctp)
        coalesce_flushes(pc.sctp)
        receive_inline(pc.sctp)


def floor_congestion_window(pc: Any, floor_bytes: int = CWND_FLOOR_BYTES) -> None:
    """Keep ``pc``'s SCTP congestion window at least ``floor_bytes`` (best effort).

    aiortc's SCTP (RFC 9260 §7.2) halves the window per loss and drops it to one packet per T3
    timeout (RTO at least 1 s), the unreliable channel included: at 5 % random loss the window
    sticks at 4-11 KB and paced activations queue for hundreds of milliseconds
    (``network-facts.md`` §3, "patched" rows: a 128 KB floor keeps 1 KB messages at the wire
    delay). On a LAN whose loss is radio noise, not congestion, halving is the wrong answer;
    halo-p2p paces its own sends (at most 16 unreliable frames between drains, a capped
    backlog), so the floor cannot turn into a saturating sender. The RTO is left stock: a lost
    *reliable* chunk still waits for fast retransmit or the 1 s timer (strict sync's cost).
    """
    sctp = pc.sctp
    if sctp is None:
        log.debug("no SCTP transport to tune")
        return
    try:   # private, checked on aiortc 1.16: RTCSctpTransport._cwnd/_ssthresh, SACK and T3 handlers
        on_sack, on_t3 = sctp._receive_sack_chunk, sctp._t3_expired
        sctp._cwnd = max(sctp._cwnd, floor_bytes)
    except AttributeError as exc:
        log.debug("cannot reach the SCTP congestion window (%s)", exc)
        return

    def floor() -> None:
        sctp._cwnd = max(sctp._cwnd, floor_bytes)
        sctp._ssthresh = max(sctp._ssthresh, floor_bytes)

    async def receive_sack(chunk: Any) -> None:
        await on_sack(chunk)
        floor()

    def t3_expired() -> None:
        on_t3()
        floor()

    sctp._receive_sack_chunk = receive_sack   # patching aiortc internals (one instance)
    sctp._t3_expired = t3_expired


def _drive(coro: Coroutine[Any, Any, Any]) -> bool:
    """Run ``coro`` now, to its end or its first real suspension; True if it ended.

    aiortc's send and receive paths are coroutines that never suspend once DTLS is up (every
    ``await`` ends in ``sendto`` or returns), so a task per call only adds a loop iteration. If
    ``coro`` does suspend, a task finishes it. Exceptions raised before that go to the caller.
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return True
    asyncio.ensure_future(_finish(coro, yielded)).add_done_callback(_log_failure)
    return False


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    return await _resume(coro, yielded)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Pass what ``coro`` yielded up to the driving task, and the task's answers down to ``coro``."""
    step: Callable[[Any], Any]
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:   # cancellation and other throws go on to coro
            step, arg = coro.throw, exc
        else:
            step, arg = coro.send, sent
        try:
            yielded = step(arg)
        except StopIteration as stop:
            return stop.value


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("a data-channel send or receive failed: %r", task.exception())


def _patchable(objects_and_names: Any, what: str) -> bool:
    try:
        for obj, name in objects_and_names:
            getattr(obj, name)
    except AttributeError as exc:
        log.debug("cannot %s (%s)", what, exc)
        return False
    return True


class _DelayedSack:
    """Delayed and bundled SACKs of one association (RFC 9260 §6.2, §6.7, §6.10; RFC 3758 §3.6).

    Replaces the association's ``_send_sack``, which aiortc calls after every received packet
    that carried DATA or FORWARD TSN, and ``_send_chunk``. The SACK goes out at once for the
    second such packet since the last SACK; when a packet leaves a gap, fills one or brings a
    duplicate TSN (so fast retransmit, FORWARD TSN and loss recovery see stock SACKs); while a
    message of several packets is being reassembled; and outside the ESTABLISHED state.
    Otherwise it waits at most ``delay_s``: if the association sends a DATA or FORWARD TSN chunk
    meanwhile, the SACK rides first in that packet when both fit in one (else each goes alone,
    as stock); if not, the timer sends it alone.

    Multi-packet messages keep a SACK per packet because aiortc's sender lets each SACK release
    at most four packets beyond the flight size (``_transmit``, RFC 9260 §6.1 Max.Burst): with a
    SACK per two packets, a 20-100 KB reliable message from idle took one RTT more (measured with
    2-10 ms RTT). Single-packet messages, the request/response workload, are not window-bound.
    """

    def __init__(self, sctp: Any, delay_s: float) -> None:
        self._sctp = sctp
        self._delay_s = delay_s
        self._established = type(sctp).State.ESTABLISHED
        self._send_sack = sctp._send_sack
        self._send_chunk = sctp._send_chunk
        self._timer: asyncio.TimerHandle | None = None
        self._unacked = 0                        # packets owed a SACK
        self._owed_since = 0.0                   # loop.time() when the SACK became owed
        self._gap = False                        # the last packet left a gap
        self._captured: list[Any] | None = None  # set while aiortc builds a SACK to bundle
        self.delayed = self.bundled = 0
        """SACKs that were delayed, and how many of them rode in a DATA packet."""
        sctp._send_sack = self.packet_received
        sctp._send_chunk = self.send_chunk

    async def packet_received(self) -> None:
        """Stands in for ``_send_sack``: decide whether the SACK this packet needs goes out now."""
        sctp = self._sctp
        self._unacked += 1
        had_gap, self._gap = self._gap, bool(sctp._sack_misordered)
        if (self._unacked >= 2 or self._gap or had_gap or sctp._sack_duplicates
                or sctp._association_state is not self._established
                or any(stream.reassembly for stream in sctp._inbound_streams.values())):
            await self._send_sack()
            return
        self.delayed += 1
        self._owed_since = now = sctp._loop.time()
        if self._timer is None:
            self._timer = sctp._loop.call_at(now + self._delay_s, self._expired)

    def _expired(self) -> None:
        # One timer serves many SACKs: it is not cancelled when the SACK leaves early (that would
        # cost a timer per packet) but re-armed here for the SACK owed now, if any.
        self._timer = None
        sctp = self._sctp
        if not self._unacked or sctp._association_state is not self._established:
            return
        due = self._owed_since + self._delay_s
        if due > sctp._loop.time():
            self._timer = sctp._loop.call_at(due, self._expired)
            return
        try:
            _drive(self._send_sack())
        except Exception as exc:   # e.g. ConnectionError: DTLS closed under us
            log.debug("sending a delayed SACK failed: %r", exc)

    async def send_chunk(self, chunk: Any) -> None:
        """Stands in for ``_send_chunk``: one chunk per packet as stock, plus the owed SACK if any."""
        kind = chunk.type
        if kind == _SACK:
            if self._captured is not None:
                self._captured.append(chunk)
                return
            self._unacked = 0
        elif self._unacked and kind in (_DATA, _FORWARD_TSN):
            captured: list[Any] = []
            self._captured = captured
            try:
                await self._send_sack()          # aiortc builds the SACK and marks it sent
            finally:
                self._captured = None
            self._unacked = 0
            body = b"".join(bytes(c) for c in captured) + bytes(chunk)   # SACK chunks are 4-byte aligned
            if 12 + len(body) <= _MAX_PACKET_BYTES:
                self.bundled += 1
                sctp = self._sctp
                await sctp.transport._send_data(serialize_packet(
                    # mypy: aiortc's private attributes are typed Optional; set once the association runs
                    sctp._local_port, sctp._remote_port, sctp._remote_verification_tag, body))  # type: ignore[arg-type]
                return
            for sack in captured:                # no room: the SACK first, alone
                await self._send_chunk(sack)
        await self._send_chunk(chunk)


def delay_sacks(sctp: Any, delay_s: float = SACK_DELAY_S) -> _DelayedSack | None:
    """Delay and bundle the SACKs of ``sctp`` (an ``RTCSctpTransport``), see :class:`_DelayedSack`.

    Args:
        sctp: the association, patched in place.
        delay_s: longest delay of a SACK in seconds (RFC 9260 §6.2: at most 0.5).

    Returns:
        The patch (with its counters), or None if aiortc's internals are not as expected.
    """
    names = ("_send_sack", "_send_chunk", "_sack_misordered", "_sack_duplicates", "_sack_needed", "_inbound_streams",
             "_association_state", "_loop", "_local_port", "_remote_port", "_remote_verification_tag", "State")
    if not _patchable(((sctp, n) for n in names), "delay the SCTP SACKs"):
        return None
    return _DelayedSack(sctp, delay_s)


class _CoalescedFlush:
    """Replaces ``RTCSctpTransport._data_channel_send`` (aiortc 1.16's body, except the flush).

    Stock aiortc starts a task per message to flush the data-channel queue into SCTP; here one
    callback per loop iteration flushes it (same order: after the caller's step, FIFO with the
    other callbacks), and runs the flush coroutine inline.
    """

    def __init__(self, sctp: Any) -> None:
        self._sctp = sctp
        self._pending = False
        sctp._data_channel_send = self.send

    def send(self, channel: Any, data: bytes | str) -> None:
        sctp = self._sctp
        if data == "":
            pp_id, user_data = WEBRTC_STRING_EMPTY, b"\x00"
        elif isinstance(data, str):
            pp_id, user_data = WEBRTC_STRING, data.encode("utf8")
        elif data == b"":
            pp_id, user_data = WEBRTC_BINARY_EMPTY, b"\x00"
        else:
            pp_id, user_data = WEBRTC_BINARY, data
        if sctp._remote_max_message_size and len(user_data) > sctp._remote_max_message_size:
            raise ValueError(f"Cannot send message of {len(user_data)} bytes, the remote party "
                             f"only supports messages up to {sctp._remote_max_message_size} bytes")
        channel._addBufferedAmount(len(user_data))
        sctp._data_channel_queue.append((channel, pp_id, user_data))
        if not self._pending:
            self._pending = True
            sctp._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._pending = False
        try:
            _drive(self._sctp._data_channel_flush())
        except Exception as exc:   # stock: the task's exception, never retrieved
            log.debug("flushing the data channels failed: %r", exc)


def coalesce_flushes(sctp: Any) -> _CoalescedFlush | None:
    """Flush the data-channel queue of ``sctp`` once per loop iteration, without a task per message.

    Returns:
        The patch, or None if aiortc's internals are not as expected.
    """
    names = ("_data_channel_send", "_data_channel_flush", "_data_channel_queue", "_remote_max_message_size",
             "_loop")
    if not _patchable(((sctp, n) for n in names), "coalesce the data-channel flushes"):
        return None
    return _CoalescedFlush(sctp)


class _InlineReceive:
    """Hands each datagram straight to the DTLS transport's ``_recv_next``, run in the socket callback.

    Stock: aioice's ``Connection.data_received`` queues the datagram and the DTLS task wakes up
    for it. Here, once the DTLS handshake is done and nothing is queued (so order is kept),
    ``data_received`` puts the datagram in a one-slot mailbox that the patched
    ``RTCIceTransport._recv`` returns, and runs ``_recv_next`` inline: aiortc's own code does the
    decryption, the counters and the SCTP handling. The DTLS task stays parked on the empty queue;
    anything else (handshake, closing, a queued datagram) takes the stock path. When
    ``_recv_next`` raises (e.g. the peer's DTLS close_notify), ``None`` is queued so the DTLS task
    ends the transport as stock does.
    """

    def __init__(self, dtls: Any, ice: Any, connection: Any) -> None:
        self._dtls = dtls
        self._queue = connection._queue
        self._mailbox: bytes | None = None
        self._enabled = True
        self._recv = ice._recv
        self._data_received = connection.data_received
        ice._recv = self.recv
        connection.data_received = self.data_received

    async def recv(self) -> bytes:
        data = self._mailbox
        if data is not None:
            self._mailbox = None
            return data
        return await self._recv()

    def data_received(self, data: bytes, component: int) -> None:
        dtls = self._dtls
        if (not self._enabled or self._mailbox is not None or self._queue.qsize()
                or dtls._state is not DtlsState.CONNECTED or dtls._task is None
                or not dtls._RTCDtlsTransport__handshake_done):
            self._data_received(data, component)
            return
        self._mailbox = data
        try:
            if not _drive(dtls._recv_next()):
                self._enabled = False            # it suspended: keep order, use the stock path from now on
                log.debug("DTLS receive suspended; inline receive disabled")
        except ConnectionError:
            self._queue.put_nowait(None)
        except Exception:
            log.warning("handling a DTLS datagram failed", exc_info=True)   # stock logs and closes too
            self._queue.put_nowait(None)


def receive_inline(sctp: Any) -> _InlineReceive | None:
    """Decrypt and handle the datagrams of ``sctp``'s DTLS transport in the socket callback.

    Returns:
        The patch, or None if aiortc's or aioice's internals are not as expected.
    """
    try:
        dtls = sctp.transport
        ice = dtls.transport
        connection = ice._connection
    except AttributeError as exc:
        log.debug("cannot receive inline (%s)", exc)
        return None
    names = ((dtls, "_recv_next"), (dtls, "_state"), (dtls, "_task"), (dtls, "_RTCDtlsTransport__handshake_done"),
             (ice, "_recv"), (connection, "data_received"), (connection, "_queue"))
    if not _patchable(names, "receive inline"):
        return None
    return _InlineReceive(dtls, ice, connection)
