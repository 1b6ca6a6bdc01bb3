"""WebRtcLink over real aiortc on 127.0.0.1: sizes, heartbeats, closing, dead peers, two processes.

Every network wait is bounded; host candidates are pinned to 127.0.0.1 and no STUN server is used.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from halo_p2p.errors import ConfigError, LinkClosed, TransportError
from halo_p2p.net import ice, sctp_tuning
from halo_p2p.net.link import Channel, Link, recv_timeout
from halo_p2p.net.lossy import HeartbeatLoss, LossyLink
from halo_p2p.net.signaling import connect
from halo_p2p.net.swarmkey import generate_swarm_key, parse_swarm_key
from halo_p2p.net.webrtc import Handshake, WebRtcLink, pin_host_addresses

REPO = Path(__file__).resolve().parents[1]
CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ (\w+) \d+ (\S+) (\d+) typ (\w+)", re.M)


@pytest.fixture(autouse=True)
def _loopback_only() -> None:
    pin_host_addresses(["127.0.0.1"])


def assert_loopback_only(sdp: str) -> None:
    """Every candidate is a 127.0.0.1 host candidate; every connection line says 127.0.0.1."""
    candidates = CANDIDATE.findall(sdp)
    assert candidates, sdp
    assert all(proto == "udp" and host == "127.0.0.1" and kind == "host" for proto, host, _, kind in candidates), sdp
    assert set(re.findall(r"^c=IN IP\d (\S+)", sdp, re.M)) == {"127.0.0.1"}, sdp
    assert "srflx" not in sdp and "relay" not in sdp and "stun" not in sdp.lower()


async def make_pair(**options: Any) -> tuple[WebRtcLink, WebRtcLink]:
    offer = await Handshake.offer()
    answer = await Handshake.answer(offer.local_sdp)
    await offer.accept_answer(answer.local_sdp)
    return await asyncio.gather(offer.open(local_id="a", remote_id="b", timeout_s=5, **options),
                                answer.open(local_id="b", remote_id="a", timeout_s=5, **options))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WebRtcLink, WebRtcLink]]:
    a, b = await make_pair()
    yield a, b
    await a.aclose()
    await b.aclose()


async def recv_n(link: WebRtcLink, n: int, timeout_s: float = 5.0) -> list[tuple[Channel, bytes]]:
    async with asyncio.timeout(timeout_s):
        return [await link.recv() for _ in range(n)]


async def test_setup_uses_only_loopback_candidates_and_satisfies_link(pair: tuple[WebRtcLink, WebRtcLink]) -> None:
    a, b = pair
    for link in (a, b):
        assert isinstance(link, Link) and not link.closed and link.max_unreliable_bytes == 1160
        assert_loopback_only(link.local_sdp)
        assert_loopback_only(link.remote_sdp)
    assert (a.local_id, a.remote_id, b.local_id, b.remote_id) == ("a", "b", "b", "a")
    if os.geteuid() == 0:   # SO_RCVBUFFORCE 8 MiB (the kernel reports it doubled)
        for protocol in a._pc.sctp.transport.transport._connection._protocols:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 8 << 20


async def test_loss_does_not_shrink_the_congestion_window_below_the_floor(
        pair: tuple[WebRtcLink, WebRtcLink]) -> None:
    """Stock aiortc drops the window to one 1160-byte packet on a T3 timeout and halves it per
    loss; a link keeps at least CWND_FLOOR_BYTES so paced activations do not queue behind it."""
    a, b = pair
    for link in (a, b):
        sctp = link._pc.sctp
        assert sctp._cwnd >= sctp_tuning.CWND_FLOOR_BYTES
        sctp._t3_expired()                  # what a lost tail packet triggers after the RTO
        assert sctp._cwnd >= sctp_tuning.CWND_FLOOR_BYTES and sctp._ssthresh >= sctp_tuning.CWND_FLOOR_BYTES
    frames = [bytes([i]) * 1160 for i in range(40)]
    for frame in frames:                    # and the association still carries data
        await a.send(Channel.UNRELIABLE, frame)
    assert sorted(d for _, d in await recv_n(b, 40)) == frames


class SctpPackets:
    """Counts the SCTP packets one end sends, by chunk type; optionally drops some (loss)."""

    def __init__(self, link: WebRtcLink, drop: Any = None) -> None:
        self.data = self.sack_only = self.bundled = 0
        dtls = link._pc.sctp.transport
        send = dtls._send_data

        async def counted(packet: bytes) -> None:
            chunks, pos = [], 12                      # (type, offset) after the common header
            while pos + 4 <= len(packet):
                kind, _, length = struct.unpack_from("!BBH", packet, pos)
                chunks.append((kind, pos))
                pos += max(4, (length + 3) & ~3)
            kinds = {kind for kind, _ in chunks}
            if 0 in kinds:
                self.data += 1
                self.bundled += 3 in kinds
                tsns = [struct.unpack_from("!L", packet, at + 4)[0] for kind, at in chunks if kind == 0]
                if drop is not None and drop(tsns):
                    return
            elif kinds == {3}:
                self.sack_only += 1
            await send(packet)

        dtls._send_data = counted


async def test_sacks_ride_with_the_answers_of_a_request_response_exchange() -> None:
    """Stock aiortc sends a SACK packet per DATA packet; delayed, the SACK rides in the answer."""
    a, b = await make_pair(heartbeat_interval_s=2.0, dead_after_s=6.0)
    try:
        for link in (a, b):
            sctp = link._pc.sctp
            assert isinstance(sctp._send_sack.__self__, sctp_tuning._DelayedSack)
            assert isinstance(sctp._data_channel_send.__self__, sctp_tuning._CoalescedFlush)
            assert isinstance(sctp.transport.transport._recv.__self__, sctp_tuning._InlineReceive)
        sent_by = {a: SctpPackets(a), b: SctpPackets(b)}
        for channel in (Channel.UNRELIABLE, Channel.RELIABLE):
            for i in range(50):
                request = i.to_bytes(4, "big") * 162
                await a.send(channel, request)
                assert await recv_n(b, 1) == [(channel, request)]
                await b.send(channel, request[::-1])
                assert await recv_n(a, 1) == [(channel, request[::-1])]
        for link, packets in sent_by.items():     # 100 messages each way (and a heartbeat or two)
            assert 100 <= packets.data <= 102, link
            assert packets.sack_only <= 5 and packets.bundled >= 90, vars(packets)   # stock: 100 and 0
    finally:
        await a.aclose()
        await b.aclose()


async def test_one_way_frames_are_acknowledged_every_second_packet_and_within_the_delay() -> None:
    a, b = await make_pair(heartbeat_interval_s=2.0, dead_after_s=6.0)
    try:
        sent_by_b = SctpPackets(b)
        frames = [bytes([i]) * 600 for i in range(41)]
        for frame in frames:
            await a.send(Channel.UNRELIABLE, frame)
        assert sorted(d for _, d in await recv_n(b, 41)) == frames
        await asyncio.sleep(sctp_tuning.SACK_DELAY_S * 5)
        assert 20 <= sent_by_b.sack_only + sent_by_b.bundled <= 22, vars(sent_by_b)   # #2, #4, ..., #40, timer
        assert not a._pc.sctp._sent_queue and a._pc.sctp._flight_size == 0   # all 41 acknowledged
        before = sent_by_b.sack_only
        await a.send(Channel.RELIABLE, bytes(20 * 1160))     # 20 packets: a SACK each, as stock, so the
        assert await recv_n(b, 1) == [(Channel.RELIABLE, bytes(20 * 1160))]   # sender's window opens as fast
        assert sent_by_b.sack_only - before >= 19
    finally:
        await a.aclose()
        await b.aclose()


async def test_both_channels_recover_from_lost_packets_with_delayed_sacks() -> None:
    """Lose the first transmission of every 7th DATA packet: the reliable channel retransmits
    (gaps are SACKed at once, so fast retransmit works), the unreliable one skips the lost frames
    (FORWARD TSN) and keeps delivering the rest."""
    a, b = await make_pair(heartbeat_interval_s=2.0, dead_after_s=8.0)
    try:
        seen: set[int] = set()
        lost: list[int] = []

        def drop(tsns: list[int]) -> bool:
            fresh = [t for t in tsns if t not in seen]   # a retransmission is never dropped
            seen.update(tsns)
            if fresh and len(seen) % 7 == 0:
                lost.extend(fresh)
                return True
            return False

        SctpPackets(a, drop)
        messages = [os.urandom(20_000) for _ in range(20)]          # 18 packets each
        for message in messages:
            await a.send(Channel.RELIABLE, message)
        assert await recv_n(b, 20, timeout_s=5) == [(Channel.RELIABLE, m) for m in messages]
        assert len(lost) >= 40
        lost.clear()
        frames = [i.to_bytes(2, "big") * 300 for i in range(60)]
        for frame in frames:
            await a.send(Channel.UNRELIABLE, frame)
        await asyncio.sleep(0.05)                                    # the flush sends them
        assert len(lost) >= 5
        got = {d for _, d in await recv_n(b, 60 - len(lost), timeout_s=10)}
        assert len(got) == 60 - len(lost) and got <= set(frames)
        await a.send(Channel.RELIABLE, b"after the loss")
        assert await recv_n(b, 1) == [(Channel.RELIABLE, b"after the loss")]
        assert await recv_timeout(b, 0.2) is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_unreliable_frames_of_1160_bytes_arrive_and_1161_raises(pair: tuple[WebRtcLink, WebRtcLink]) -> None:
    a, b = pair
    frames = [bytes([i]) * 1160 for i in range(20)]
    for frame in frames:
        await a.send(Channel.UNRELIABLE, frame)
    got = await recv_n(b, 20)
    assert {ch for ch, _ in got} == {Channel.UNRELIABLE} and sorted(d for _, d in got) == frames
    with pytest.raises(ValueError, match="1161 bytes exceeds the 1160-byte limit"):
        await a.send(Channel.UNRELIABLE, bytes(1161))
    st = a.stats.unreliable
    assert (st.messages_sent, st.bytes_sent, st.messages_dropped_for_size) == (20, 20 * 1160, 1)
    assert b.stats.unreliable.messages_delivered == 20 and b.stats.unreliable.bytes_delivered == 20 * 1160
    await b.send(Channel.UNRELIABLE, b"back")
    assert await recv_n(a, 1) == [(Channel.UNRELIABLE, b"back")]


async def test_reliable_messages_up_to_262144_bytes_arrive_in_order(pair: tuple[WebRtcLink, WebRtcLink]) -> None:
    a, b = pair
    big = os.urandom(100_000)
    await a.send(Channel.RELIABLE, big)
    await a.send(Channel.RELIABLE, b"")
    await a.send(Channel.RELIABLE, b"x" * 262_144)
    assert await recv_n(b, 3) == [(Channel.RELIABLE, big), (Channel.RELIABLE, b""), (Channel.RELIABLE, b"x" * 262_144)]
    with pytest.raises(ValueError, match="262145 bytes exceeds aiortc's 262144-byte limit"):
        await a.send(Channel.RELIABLE, bytes(262_145))
    assert a.stats.reliable.messages_sent == 3 and b.stats.reliable.messages_delivered == 3
    sent, received = a.wire_bytes() or (0, 0)
    assert sent > 100_000 + 262_144 and received > 0


async def test_heartbeats_measure_rtt_and_no_loss_and_stay_inside_the_link() -> None:
    a, b = await make_pair(heartbeat_interval_s=0.05)
    try:
        await asyncio.sleep(0.05)
        assert a.stats.measured_plr is None       # a few acknowledged heartbeats do not make a link clean
        await asyncio.sleep(1.0)
        for link in (a, b):
            st = link.stats
            assert st.rtt_ms is not None and 0 < st.rtt_ms < 100, st
            assert st.jitter_ms is not None and st.jitter_ms >= 0
            assert st.measured_plr == 0.0
            assert time.monotonic() - link.last_heard_s < 0.5
            assert st.unreliable.messages_delivered == 0 and st.unreliable.messages_sent == 0
        assert await recv_timeout(b, 0.1) is None   # heartbeats are never returned by recv
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_lossy_wrapper_loses_heartbeats_so_that_both_ends_measure_the_loss() -> None:
    """LossyLink at one end (loopback swarms without namespaces): the heartbeats and acks it
    loses are what both ends' loss estimates (FEC, deadlines) are made of."""
    a, inner_b = await make_pair()                 # heartbeats every 0.1 s until the loss is measured
    b = LossyLink(inner_b, plr=0.5, seed=5)
    assert isinstance(inner_b, HeartbeatLoss)
    try:
        for _ in range(120):                       # a heartbeat counts as lost after 2 s; ~0.75 each way
            if all((link.stats.measured_plr or 0) > 0.3 for link in (a, b)):
                break
            await asyncio.sleep(0.1)
        assert all((link.stats.measured_plr or 0) > 0.3 for link in (a, b)), (a.stats, b.stats)
        frames = [i.to_bytes(2, "big") * 50 for i in range(200)]
        for frame in frames:
            await a.send(Channel.UNRELIABLE, frame)
        got = []
        while (msg := await recv_timeout(b, 0.5)) is not None:
            got.append(msg[1])
        assert 60 < len(got) < 140 and b.dropped_received == 200 - len(got) and set(got) < set(frames)
    finally:
        await a.aclose()
        await b.aclose()


async def test_closing_one_end_wakes_the_other_ends_recv(pair: tuple[WebRtcLink, WebRtcLink]) -> None:
    a, b = pair
    await a.send(Channel.RELIABLE, b"last words")
    assert await recv_n(b, 1) == [(Channel.RELIABLE, b"last words")]
    pending = asyncio.create_task(b.recv())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await a.aclose()
    await a.aclose()   # idempotent
    with pytest.raises(LinkClosed):
        async with asyncio.timeout(3):
            await pending
    assert time.monotonic() - started < 3 and a.closed and b.closed
    with pytest.raises(LinkClosed):
        await b.recv()   # every later recv raises too
    with pytest.raises(LinkClosed, match="is closed"):
        await a.send(Channel.UNRELIABLE, b"x")
    with pytest.raises(LinkClosed):
        await b.send(Channel.RELIABLE, b"x")


async def test_a_silent_peer_is_declared_dead() -> None:
    a, b = await make_pair(heartbeat_interval_s=0.1, dead_after_s=0.6)
    try:
        b._hb_task.cancel()                      # b falls silent: no heartbeats, no acks
        b._act.remove_all_listeners("message")
        b._ctl.remove_all_listeners("message")
        with pytest.raises(LinkClosed, match="peer silent"):
            async with asyncio.timeout(3):
                await a.recv()
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_stall_of_our_own_event_loop_is_not_blamed_on_the_peer() -> None:
    a, b = await make_pair(heartbeat_interval_s=0.1, dead_after_s=0.6)
    try:
        await asyncio.sleep(0.3)
        time.sleep(1.0)  # noqa: ASYNC251 - blocks both ends' loop on purpose (compute run inline by mistake)
        await asyncio.sleep(0.8)
        assert not a.closed and not b.closed
        await a.send(Channel.RELIABLE, b"still here")
        assert await recv_n(b, 1) == [(Channel.RELIABLE, b"still here")]
    finally:
        await a.aclose()
        await b.aclose()


async def test_unreliable_sends_never_block_and_drop_over_the_backlog_cap() -> None:
    a, b = await make_pair(unreliable_backlog_bytes=0)
    try:
        started = time.perf_counter()
        for i in range(200):
            await a.send(Channel.UNRELIABLE, i.to_bytes(4, "big") * 250)
        assert time.perf_counter() - started < 0.5
        st = a.stats.unreliable
        assert st.messages_sent == 200 and a.backlog_drops > 0 and st.messages_lost == a.backlog_drops
        assert len(await recv_n(b, 200 - a.backlog_drops)) == 200 - a.backlog_drops
        assert await recv_timeout(b, 0.1) is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_handshakes_refuse_to_start_unpinned_and_bad_sdp(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TransportError, match="unusable SDP offer"):
        await Handshake.answer("this is not SDP")
    monkeypatch.setattr(ice, "_pinned", None)
    with pytest.raises(ConfigError, match="not pinned"):
        await Handshake.offer()
    with pytest.raises(ConfigError, match="not an IP address"):
        pin_host_addresses(["localhost"])


CHILD = """
import asyncio, os, sys
from halo_p2p.errors import LinkClosed
from halo_p2p.net.signaling import SignalingServer
from halo_p2p.net.swarmkey import parse_swarm_key
from halo_p2p.net.webrtc import pin_host_addresses

async def main():
    pin_host_addresses(["127.0.0.1"])
    done, tasks = asyncio.Event(), set()

    async def echo(link):
        try:
            while True:
                channel, data = await link.recv()
                await link.send(channel, data)
        except LinkClosed:
            pass
        finally:
            await link.aclose()
            done.set()

    async def on_link(link, peer_id):
        tasks.add(asyncio.create_task(echo(link)))

    key = parse_swarm_key(os.environ["HALO_SWARM_KEY"], source="env")
    server = SignalingServer("child", "child process", key, host="127.0.0.1", on_link=on_link)
    print(await server.start(), flush=True)
    await asyncio.wait_for(done.wait(), 30)
    await server.aclose()

asyncio.run(main())
"""


@pytest.fixture
async def child_server() -> AsyncIterator[tuple[asyncio.subprocess.Process, int, bytes]]:
    """A child process running a SignalingServer that echoes every frame: ``(process, port, key)``."""
    key_text = generate_swarm_key()
    env = {**os.environ, "HALO_SWARM_KEY": key_text, "PYTHONPATH": str(REPO)}
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, cwd=REPO, env=env,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        port = int(await asyncio.wait_for(child.stdout.readline(), 20))
        yield child, port, parse_swarm_key(key_text, source="test")
    finally:
        if child.returncode is None:
            child.kill()       # by pid: only the process this fixture started
            await child.wait()


async def test_two_processes_exchange_frames_over_signaling(
        child_server: tuple[asyncio.subprocess.Process, int, bytes]) -> None:
    child, port, key = child_server
    started = time.perf_counter()
    link = await connect("127.0.0.1", port, peer_id="parent", name="test", swarm_key=key, timeout_s=10)
    setup_ms = (time.perf_counter() - started) * 1e3
    assert link.remote_id == "child" and setup_ms < 5000
    assert_loopback_only(link.local_sdp)
    assert_loopback_only(link.remote_sdp)
    rtts = []
    for i in range(30):
        sent = time.perf_counter()
        await link.send(Channel.UNRELIABLE, i.to_bytes(4, "big") * 256)
        assert await recv_n(link, 1) == [(Channel.UNRELIABLE, i.to_bytes(4, "big") * 256)]
        rtts.append((time.perf_counter() - sent) * 1e3)
    big = os.urandom(150_000)
    await link.send(Channel.RELIABLE, big)
    assert await recv_n(link, 1) == [(Channel.RELIABLE, big)]
    assert statistics.median(rtts) < 50
    await link.aclose()
    assert await asyncio.wait_for(child.wait(), 15) == 0    # the child saw the close and exited


async def test_a_killed_peer_process_wakes_recv_with_link_closed(
        child_server: tuple[asyncio.subprocess.Process, int, bytes]) -> None:
    child, port, key = child_server
    link = await connect("127.0.0.1", port, peer_id="parent", name="test", swarm_key=key, timeout_s=10,
                         heartbeat_interval_s=0.2, dead_after_s=1.0)
    try:
        await link.send(Channel.RELIABLE, b"hello")
        assert await recv_n(link, 1) == [(Channel.RELIABLE, b"hello")]
        pending = asyncio.create_task(link.recv())
        child.kill()           # no SCTP ABORT, no DTLS close: only silence
        started = time.monotonic()
        with pytest.raises(LinkClosed, match="peer silent"):
            async with asyncio.timeout(5):
                await pending
        assert time.monotonic() - started < 3
    finally:
        await link.aclose()


async def test_an_answer_without_data_channels_is_refused() -> None:
    offer = await Handshake.offer()
    try:
        with pytest.raises(TransportError, match="unusable SDP answer"):
            await offer.accept_answer("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
    finally:
        await offer.abort()


async def test_reliable_sends_wait_for_the_backlog_and_time_out() -> None:
    a, b = await make_pair(reliable_high_water_bytes=300_000, reliable_low_water_bytes=100_000)
    try:
        messages = [bytes([i]) * 200_000 for i in range(12)]
        peak = 0
        for message in messages:
            await a.send(Channel.RELIABLE, message)
            peak = max(peak, a._ctl.bufferedAmount)
        assert peak <= 300_000 + 200_000     # each send waited until the backlog was under the mark
        assert await recv_n(b, 12) == [(Channel.RELIABLE, m) for m in messages]

        class Stuck:                         # a channel whose backlog never drains
            bufferedAmount = 10**9

        real, a._ctl, a._send_timeout_s = a._ctl, Stuck(), 0.2
        try:
            with pytest.raises(TransportError, match=r"waited 0\.2 s with 1000000000 bytes queued"):
                await a.send(Channel.RELIABLE, b"x")
        finally:
            a._ctl = real
    finally:
        await a.aclose()
        await b.aclose()
