"""Signaling on 127.0.0.1: a good pair, and every refusal (auth, replay, version, oversize, garbage)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import cbor2
import pytest

from halo_p2p.errors import AuthError, TransportError
from halo_p2p.net.link import Channel
from halo_p2p.net.signaling import (
    MAX_FRAME_BYTES,
    SIGNALING_PROTOCOL,
    SignalingServer,
    connect,
    read_frame,
    sign_message,
    verify_message,
    write_frame,
)
from halo_p2p.net.webrtc import Handshake, WebRtcLink, pin_host_addresses
from halo_p2p.wire.codec import encode
from halo_p2p.wire.messages import WIRE_VERSION, Message, SignalAnswer, SignalOffer, SignalRefused

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
LOG = "halo_p2p.net.signaling"


@pytest.fixture(autouse=True)
def _loopback_only() -> None:
    pin_host_addresses(["127.0.0.1"])


class Harness:
    """A server on 127.0.0.1 that records the links it gets (and closes them at the end)."""

    def __init__(self, key: bytes = KEY, **options: Any) -> None:
        self.links: list[tuple[WebRtcLink, str]] = []
        self.linked = asyncio.Event()
        self.server = SignalingServer("srv", "server", key, host="127.0.0.1", on_link=self.on_link, **options)

    async def on_link(self, link: WebRtcLink, peer_id: str) -> None:
        self.links.append((link, peer_id))
        self.linked.set()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness(read_timeout_s=1.0)
    await h.server.start()
    yield h
    await h.server.aclose()
    for link, _ in h.links:
        await link.aclose()


def framed(msg: Message | bytes) -> bytes:
    body = msg if isinstance(msg, bytes) else encode(msg)
    return len(body).to_bytes(4, "big") + body


async def exchange(port: int, payload: bytes, *, close_write: bool = False) -> Message | None:
    """Send raw bytes to the server; return its reply frame (None if it just closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        if close_write:
            writer.write_eof()
        try:
            return await read_frame(reader, timeout_s=5)
        except TransportError:
            return None
    finally:
        writer.close()


def offer_for(sdp: str, key: bytes = KEY, **override: Any) -> SignalOffer:
    fields = {"peer_id": "cli", "name": "client", "protocol": SIGNALING_PROTOCOL, "nonce": secrets.token_hex(16),
              "sent_s": time.time(), "sdp": sdp, "mac": ""}
    fields.update(override)
    return sign_message(SignalOffer(**fields), key)


async def assert_frames_flow(a: WebRtcLink, b: WebRtcLink) -> None:
    for channel in Channel:
        await a.send(channel, b"ping %d" % channel)
        await b.send(channel, b"pong %d" % channel)
    async with asyncio.timeout(5):
        got_b = {await b.recv() for _ in range(2)}
        got_a = {await a.recv() for _ in range(2)}
    assert got_b == {(ch, b"ping %d" % ch) for ch in Channel}
    assert got_a == {(ch, b"pong %d" % ch) for ch in Channel}


async def test_same_key_gives_a_working_link_pair(harness: Harness) -> None:
    started = time.perf_counter()
    link = await connect("127.0.0.1", harness.server.port, peer_id="cli", name="client", swarm_key=KEY, timeout_s=10)
    try:
        await asyncio.wait_for(harness.linked.wait(), 5)
        setup_ms = (time.perf_counter() - started) * 1e3
        (server_link, peer_id), = harness.links
        assert peer_id == "cli" and link.remote_id == "srv" and server_link.remote_id == "cli"
        assert setup_ms < 3000
        await assert_frames_flow(link, server_link)
        assert harness.server.stats == {"peer_connections": 1, "accepted": 1}
        for sdp in (link.local_sdp, link.remote_sdp):
            hosts = {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}
            assert hosts == {"127.0.0.1"}
    finally:
        await link.aclose()


async def test_wrong_key_is_refused_without_a_peer_connection(harness: Harness,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    with pytest.raises(AuthError, match="refused our swarm key") as info:
        await connect("127.0.0.1", harness.server.port, peer_id="cli", name="client", swarm_key=OTHER_KEY,
                      timeout_s=5)
    assert "swarm.key" in str(info.value) and "\n" not in str(info.value)
    assert harness.server.stats == {"refused_auth": 1}    # no "peer_connections"
    assert not harness.links
    warning, = [r for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]
    assert "127.0.0.1:" in warning.getMessage() and "(auth)" in warning.getMessage()
    assert "bad MAC" in warning.getMessage() and "'cli'" in warning.getMessage()


async def test_an_answer_signed_with_another_key_is_refused_by_the_client() -> None:
    seen: list[SignalOffer] = []

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offer = await read_frame(reader, timeout_s=5)
        assert isinstance(offer, SignalOffer) and verify_message(offer, KEY)
        seen.append(offer)
        answer = SignalAnswer(peer_id="impostor", name="x", protocol=SIGNALING_PROTOCOL, nonce=secrets.token_hex(16),
                              offer_nonce=offer.nonce, sent_s=time.time(), sdp=offer.sdp, mac="")
        await write_frame(writer, sign_message(answer, OTHER_KEY))
        writer.close()

    server = await asyncio.start_server(fake_server, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(AuthError, match=r"'impostor' at 127\.0\.0\.1:\d+ answered with a bad MAC: it holds a diff"):
            await connect("127.0.0.1", port, peer_id="cli", name="client", swarm_key=KEY, timeout_s=5)
        assert len(seen) == 1
    finally:
        server.close()


async def test_a_replayed_offer_is_refused(harness: Harness) -> None:
    handshake = await Handshake.offer()
    try:
        payload = framed(offer_for(handshake.local_sdp))
        answer = await exchange(harness.server.port, payload)
        assert isinstance(answer, SignalAnswer) and verify_message(answer, KEY)
        replay = await exchange(harness.server.port, payload)   # the same bytes again
        assert isinstance(replay, SignalRefused) and replay.code == "replay" and "already used" in replay.reason
        stale = await exchange(harness.server.port, framed(offer_for(handshake.local_sdp, sent_s=time.time() - 100)))
        assert isinstance(stale, SignalRefused) and stale.code == "replay" and "old" in stale.reason
        # the first offer still completes
        await handshake.accept_answer(answer.sdp)
        link = await handshake.open(local_id="cli", remote_id=answer.peer_id, timeout_s=5)
        handshake = None
        try:
            await asyncio.wait_for(harness.linked.wait(), 5)
            await assert_frames_flow(link, harness.links[0][0])
        finally:
            await link.aclose()
    finally:
        if handshake is not None:
            await handshake.abort()
    assert harness.server.stats == {"peer_connections": 1, "accepted": 1, "refused_replay": 2}


async def test_version_mismatch_is_refused_and_logged(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    reply = await exchange(harness.server.port, framed(offer_for("v=0\r\n", protocol=SIGNALING_PROTOCOL + 1)))
    assert isinstance(reply, SignalRefused) and reply.code == "version" and "protocol 2" in reply.reason
    items = cbor2.loads(encode(offer_for("v=0\r\n")))
    newer = WIRE_VERSION + 1
    reply = await exchange(harness.server.port, framed(cbor2.dumps([newer, *items[1:]])))
    assert isinstance(reply, SignalRefused) and reply.code == "version" and f"wire version {newer}" in reply.reason
    assert harness.server.stats == {"refused_version": 2}
    await harness.server.aclose()      # logs the summary of refusals not logged in full
    assert sum("(version)" in r.getMessage() for r in caplog.records) == 2
    assert "refused 1 more signaling connection (version)" in caplog.records[-1].getMessage()


async def test_oversize_frames_are_refused_without_reading_them(harness: Harness) -> None:
    reply = await exchange(harness.server.port, (MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    assert isinstance(reply, SignalRefused) and reply.code == "oversize" and "65537 bytes" in reply.reason
    assert harness.server.stats == {"refused_oversize": 1}


async def test_garbage_is_refused_and_the_server_still_serves(harness: Harness) -> None:
    port = harness.server.port
    http = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(http, SignalRefused) and http.code == "oversize"
    junk = await exchange(port, framed(b"\xff\x00garbage"))
    assert isinstance(junk, SignalRefused) and junk.code == "bad-frame" and "not valid CBOR" in junk.reason
    wrong_kind = await exchange(port, framed(SignalRefused(code="x", reason="y")))
    assert isinstance(wrong_kind, SignalRefused) and "expected SignalOffer" in wrong_kind.reason
    truncated = await exchange(port, framed(b"\x00" * 10)[:8], close_write=True)
    assert isinstance(truncated, SignalRefused) and truncated.code == "bad-frame" and "stream ended" in truncated.reason
    silent = await exchange(port, b"")          # says nothing: refused after the 1 s read timeout
    assert isinstance(silent, SignalRefused) and silent.code == "timeout"
    tampered = dataclasses.replace(offer_for("v=0\r\n"), name="someone else")
    auth = await exchange(port, framed(tampered))
    assert isinstance(auth, SignalRefused) and auth.code == "auth"
    bad_sdp = await exchange(port, framed(offer_for("not an sdp")))
    assert isinstance(bad_sdp, SignalRefused) and bad_sdp.code == "bad-sdp"
    assert harness.server.stats == {"refused_oversize": 1, "refused_bad_frame": 3, "refused_timeout": 1,
                                    "refused_auth": 1, "refused_bad_sdp": 1, "peer_connections": 1}
    link = await connect("127.0.0.1", port, peer_id="cli", name="client", swarm_key=KEY, timeout_s=10)
    try:
        await asyncio.wait_for(harness.linked.wait(), 5)
        await assert_frames_flow(link, harness.links[0][0])
    finally:
        await link.aclose()


async def test_connect_errors_are_one_line_transport_errors() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(TransportError, match=f"cannot reach peer at 127.0.0.1:{port}") as info:
        await connect("127.0.0.1", port, peer_id="cli", name="client", swarm_key=KEY, timeout_s=5)
    assert info.value.fix and "\n" not in str(info.value)

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()   # reads the offer and never answers, until the client hangs up
        writer.close()

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        with pytest.raises(TransportError, match=r"timed out after 0\.5 s"):
            await connect("127.0.0.1", silent.sockets[0].getsockname()[1], peer_id="cli", name="client",
                          swarm_key=KEY, timeout_s=0.5)
    finally:
        silent.close()
        await silent.wait_closed()


async def test_aclose_cancels_handshakes_in_progress() -> None:
    h = Harness(handshake_timeout_s=30)
    port = await h.server.start()
    handshake = await Handshake.offer()
    try:
        answer = await exchange(port, framed(offer_for(handshake.local_sdp)))
        assert isinstance(answer, SignalAnswer)   # the server now waits for channels that never open
        started = time.perf_counter()
        await asyncio.wait_for(h.server.aclose(), 5)
        assert time.perf_counter() - started < 3 and not h.links
    finally:
        await handshake.abort()
