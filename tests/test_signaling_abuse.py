"""Signaling under abuse (issue #12): strangers holding sockets and flooding, malformed SDPs and frames.

The strangers run in this event loop and connect from other loopback addresses (127.0.0.2 and up:
other devices), except where a case says it shares the key holder's address.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import cbor2
import pytest

from halo_p2p.errors import TransportError
from halo_p2p.net import signaling_client
from halo_p2p.net.signaling import SIGNALING_PROTOCOL, connect, read_frame, sign_message, write_frame
from halo_p2p.net.webrtc import Handshake, pin_host_addresses
from halo_p2p.wire.codec import encode
from halo_p2p.wire.messages import WIRE_VERSION, SignalAnswer, SignalOffer, SignalRefused
from tests.test_signaling import KEY, LOG, OTHER_KEY, Harness, assert_frames_flow, exchange, framed, offer_for


@pytest.fixture(autouse=True)
def _loopback_only() -> None:
    pin_host_addresses(["127.0.0.1"])


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    """``await make(**options)``: a started Harness, closed (with its links) at the end."""
    made: list[Harness] = []

    async def make(**options: Any) -> Harness:
        h = Harness(**options)
        await h.server.start()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.server.aclose()
        for link, _ in h.links:
            await link.aclose()


class Stranger:
    """Hostile connections to a signaling port, run as tasks until :meth:`aclose`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []

    async def _open(self, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(0.01)
            return None

    async def _send(self, kind: str, source: str, payload: bytes | Callable[[], bytes], reopen: bool) -> None:
        while True:
            conn = await self._open(source)
            if conn is None:
                continue
            reader, writer = conn
            self.opened[kind] += 1
            try:
                writer.write(payload() if callable(payload) else payload)
                await writer.drain()
                await reader.read()               # until the server closes it
            except OSError:
                pass
            finally:
                writer.close()
            if not reopen:
                return

    def idle(self, sockets: int, sources: list[str], *, reopen: bool = True) -> None:
        """Hold ``sockets`` idle connections (spread over ``sources``), re-opening each one closed."""
        for i in range(sockets):
            self._start("idle", sources[i % len(sources)], b"", reopen)

    def keyless(self, workers: int, source: str) -> None:
        """Flood well-formed offers signed with another key."""
        def offer() -> bytes:
            return framed(offer_for("v=0\r\n", key=OTHER_KEY))
        for _ in range(workers):
            self._start("keyless", source, offer, True)

    def garbage(self, workers: int, source: str) -> None:
        """Flood frames that are not CBOR."""
        for _ in range(workers):
            self._start("garbage", source, framed(b"\xff\x00" + secrets.token_bytes(30)), True)

    def _start(self, kind: str, source: str, payload: bytes | Callable[[], bytes], reopen: bool) -> None:
        self._tasks.append(asyncio.create_task(self._send(kind, source, payload, reopen)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def poll(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds (checked every 20 ms), at most ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the conditions are counters of other tasks, no events
            await asyncio.sleep(0.02)


LAYOUTS: dict[str, dict[str, Any]] = {
    # 40 idle sockets re-opened as fast as the server drops them, keyless offers and garbage beside
    "one-address": dict(idle=(40, ["127.0.0.2"]), flood=True, evicted=("refused_address_limit", 36)),
    # 80 idle sockets from 40 addresses: more than the 64 that may be pending in all
    "many-addresses": dict(idle=(80, [f"127.0.1.{i}" for i in range(1, 41)]), flood=True,
                           evicted=("refused_pending_limit", 16)),
    # 40 idle sockets opened once from the key holder's own address
    "holder-address": dict(idle=(40, ["127.0.0.1"]), flood=False, reopen=False,
                           evicted=("refused_address_limit", 36)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_held_sockets_and_floods_do_not_lock_a_key_holder_out(servers: Callable[..., Any], layout: str) -> None:
    case = LAYOUTS[layout]
    h = await servers()                        # default limits: 1 s first-frame deadline, 4 / 64 pending
    stranger = Stranger(h.server.port)
    try:
        sockets, sources = case["idle"]
        stranger.idle(sockets, sources, reopen=case.get("reopen", True))
        if case["flood"]:
            stranger.keyless(4, "127.0.0.3")
            stranger.garbage(2, "127.0.0.4")
        await poll(lambda: stranger.opened["idle"] >= sockets)
        await asyncio.sleep(0.2)
        for i in range(3):
            started = time.perf_counter()
            link = await connect("127.0.0.1", h.server.port, peer_id=f"holder{i}", name="holder", swarm_key=KEY,
                                 timeout_s=1.0)
            try:
                assert time.perf_counter() - started < 1.0
                await poll(lambda n=i + 1: len(h.links) == n)
                await assert_frames_flow(link, h.links[i][0])
            finally:
                await link.aclose()
    finally:
        await stranger.aclose()
    stats = h.server.stats
    cause, at_least = case["evicted"]
    assert stats["accepted"] == 3 and stats[cause] >= at_least
    if case["flood"]:
        assert stats["refused_auth"] > 0 and stats["refused_bad_frame"] > 0 and stranger.opened["keyless"] > 0


def _mutated_offer_sdps() -> dict[str, Callable[[str], str]]:
    return {
        "candidate-fields": lambda sdp: re.sub(r"a=candidate:[^\r]*", "a=candidate:1 1 udp", sdp),   # aiortc asserts
        "connection-line": lambda sdp: re.sub(r"c=IN IP4 [^\r]*", "c=IN IP4", sdp),                  # aiortc asserts
        "mid-value": lambda sdp: sdp.replace("a=mid:0", "a=mid"),         # the answer cannot match: ValueError
        "sctp-port": lambda sdp: re.sub(r"a=sctp-port:\d+\r\n", "", sdp),  # accepted, breaks in a DTLS task later
        "candidate-port": lambda sdp: re.sub(r"(a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1) \d+", r"\1 99999", sdp),
        "audio-section": lambda sdp: sdp + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\n",
    }


@pytest.mark.parametrize("mutation", list(_mutated_offer_sdps()))
async def test_a_valid_mac_offer_with_a_malformed_sdp_is_refused_as_bad_sdp(
        servers: Callable[..., Any], mutation: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = await servers()
    handshake = await Handshake.offer()
    sdp = handshake.local_sdp
    await handshake.abort()
    bad = _mutated_offer_sdps()[mutation](sdp)
    assert bad != sdp
    reply = await exchange(h.server.port, framed(offer_for(bad)))
    assert isinstance(reply, SignalRefused) and reply.code == "bad-sdp" and "unusable SDP offer" in reply.reason
    assert h.server.stats == {"peer_connections": 1, "refused_bad_sdp": 1}
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert any("(bad_sdp)" in r.getMessage() for r in caplog.records if r.name == LOG)


ISSUE_FRAMES = {   # the issue's examples (item 1), re-headed to this wire version
    "28-byte": bytes.fromhex("8902" + "02010101000100d8288284011affffffff1affffffff00d85540"),
    "bignum-session": cbor2.dumps([WIRE_VERSION, 10, cbor2.CBORTag(2, b"\xff" * 1800)]),
    "bignum-time": cbor2.dumps([WIRE_VERSION, 13, 1, cbor2.CBORTag(2, b"\x01" + b"\x00" * 128)]),
    "nested": b"\x81" * 10_000,
}
DECODER_BUG = b"\xf7" * 7   # makes the patched decoder below raise what a codec bug would


@pytest.fixture
def buggy_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    real = signaling_client.decode

    def decode(body: bytes) -> Any:
        if body == DECODER_BUG:
            raise RecursionError("maximum recursion depth exceeded")
        return real(body)

    monkeypatch.setattr(signaling_client, "decode", decode)


async def test_garbage_and_truncated_frames_are_counted_by_cause_without_tracebacks(
        servers: Callable[..., Any], buggy_decoder: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = await servers(read_timeout_s=0.3)
    port = h.server.port
    for name, frame in {**ISSUE_FRAMES, "decoder-bug": DECODER_BUG}.items():
        reply = await exchange(port, framed(frame))
        assert isinstance(reply, SignalRefused) and reply.code == "bad-frame", name
    assert "cannot be decoded (RecursionError)" in reply.reason
    truncated = await exchange(port, framed(encode(offer_for("v=0\r\n")))[:40], close_write=True)
    assert isinstance(truncated, SignalRefused) and "stream ended after 36 bytes" in truncated.reason
    oversize = await exchange(port, (1 << 31).to_bytes(4, "big"))
    assert isinstance(oversize, SignalRefused) and oversize.code == "oversize"
    assert await exchange(port, b"", close_write=True) in (None, SignalRefused(code="bad-frame",
                                                                                reason="stream ended after 0 bytes"))
    silent = await exchange(port, b"\x00\x00")
    assert isinstance(silent, SignalRefused) and silent.code == "timeout"
    assert h.server.stats == {"refused_bad_frame": 6, "refused_oversize": 1, "refused_closed": 1,
                              "refused_timeout": 1}
    await h.server.aclose()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("reply", ["28-byte", "decoder-bug", "malformed-answer-sdp", "answer-without-port"])
async def test_a_keyless_or_broken_listener_only_causes_transport_errors(
        buggy_decoder: None, reply: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offer = await read_frame(reader, timeout_s=5)
        assert isinstance(offer, SignalOffer)
        if reply in ("malformed-answer-sdp", "answer-without-port"):
            sdp = ("v=0\r\nm=application x\r\n" if reply == "malformed-answer-sdp"
                   else re.sub(r"a=sctp-port:\d+\r\n", "", offer.sdp).replace("a=setup:actpass", "a=setup:active"))
            await write_frame(writer, sign_message(SignalAnswer(
                peer_id="srv", name="x", protocol=SIGNALING_PROTOCOL, nonce=secrets.token_hex(16),
                offer_nonce=offer.nonce, sent_s=time.time(), sdp=sdp, mac=""), KEY))
        else:
            frame = ISSUE_FRAMES.get(reply, DECODER_BUG)
            writer.write(framed(frame))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    try:
        with pytest.raises(TransportError) as info:
            await connect("127.0.0.1", server.sockets[0].getsockname()[1], peer_id="cli", name="client",
                          swarm_key=KEY, timeout_s=5)
        assert type(info.value) is TransportError and "\n" not in str(info.value)
    finally:
        server.close()
        await server.wait_closed()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_log_lines_for_a_keyless_flood_are_constant_per_interval(
        servers: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    h = await servers()                         # the default interval, 10 s, outlasts the flood

    async def one(payload: bytes) -> None:
        await exchange(h.server.port, payload)

    keyless = [framed(offer_for("v=0\r\n", key=OTHER_KEY)) for _ in range(60)]
    await asyncio.gather(*(one(p) for p in keyless), *(one(framed(b"\xff junk")) for _ in range(30)))
    assert h.server.stats == {"refused_auth": 60, "refused_bad_frame": 30}
    lines = [r.getMessage() for r in caplog.records if r.name == LOG and "refused" in r.getMessage()]
    assert len(lines) == 2 and any("(auth)" in m for m in lines) and any("(bad_frame)" in m for m in lines)
    await h.server.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == LOG and "refused" in r.getMessage()]
    assert len(lines) == 4
    assert any(m.startswith("refused 59 more signaling connections (auth) from 1 address") for m in lines)
    assert any(m.startswith("refused 29 more signaling connections (bad_frame) from 1 address") for m in lines)


async def test_the_summary_line_comes_when_the_interval_ends(servers: Callable[..., Any],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    h = await servers(log_interval_s=0.2)
    for _ in range(20):
        await exchange(h.server.port, framed(offer_for("v=0\r\n", key=OTHER_KEY)))
    lines = [r.getMessage() for r in caplog.records if r.name == LOG and "(auth)" in r.getMessage()]
    summed = re.compile(r"refused (\d+) more signaling connections? \(auth\)")

    def accounted() -> int:     # each refusal is in a full line or counted in a summary line
        found = [summed.match(r.getMessage()) for r in caplog.records if r.name == LOG]
        return sum(int(m[1]) for m in found if m) + sum(1 for m in lines if not summed.match(m))

    await poll(lambda: accounted() == 20)      # the last summary comes from the timer: no refusal follows
    assert len(lines) < 10


async def test_connect_retries_busy_until_a_handshake_slot_frees(servers: Callable[..., Any]) -> None:
    h = await servers(max_handshakes=1, handshake_timeout_s=1.0)
    stuck = await Handshake.offer()
    try:
        answer = await exchange(h.server.port, framed(offer_for(stuck.local_sdp)))
        assert isinstance(answer, SignalAnswer)      # the only slot now waits for channels that never open
        link = await connect("127.0.0.1", h.server.port, peer_id="cli", name="client", swarm_key=KEY, timeout_s=10)
        try:
            await poll(lambda: bool(h.links))
            await assert_frames_flow(link, h.links[0][0])
        finally:
            await link.aclose()
    finally:
        await stuck.abort()
    assert h.server.stats["refused_busy"] >= 1 and h.server.stats["failed"] == 1 and h.server.stats["accepted"] == 1
