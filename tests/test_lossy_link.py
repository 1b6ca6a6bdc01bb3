"""LossyLink: emulated loss of unreliable messages at one end of any link, both directions."""

from __future__ import annotations

import math

import pytest

from halo_p2p.errors import ConfigError, LinkClosed
from halo_p2p.net import Channel, Link, LossyLink, MemoryLink, memory_link_pair, recv_timeout
from halo_p2p.net.lossy import HeartbeatLoss

R, U = Channel.RELIABLE, Channel.UNRELIABLE
N = 2000


async def _read_all(tx: MemoryLink, rx: Link) -> list[tuple[Channel, bytes]]:
    """Wait until nothing ``tx`` sent is in flight, then read everything ``rx`` has."""
    await tx.wait_idle()
    out = []
    while (msg := await recv_timeout(rx, 0)) is not None:
        out.append(msg)
    return out


def _binomial_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("plr", [1.0, -0.1, math.nan, True, "0.1"])
async def test_plr_out_of_range_is_a_config_error(plr: object) -> None:
    a, _ = memory_link_pair("a", "b")
    with pytest.raises(ConfigError, match="plr"):
        LossyLink(a, plr=plr)  # type: ignore[arg-type]


async def test_loses_unreliable_messages_both_ways_and_counts_them_as_the_network_would() -> None:
    a, inner_b = memory_link_pair("a", "b")
    b = LossyLink(inner_b, plr=0.3, seed=1)
    assert isinstance(b, Link) and b.local_id == "b" and b.remote_id == "a" and b.stats is inner_b.stats
    for i in range(N):                                  # into the lossy end
        await a.send(U, i.to_bytes(4, "big"))
    got = await _read_all(a, b)
    assert _binomial_ok(N - len(got), N, 0.3) and b.dropped_received == N - len(got)
    assert b.stats.unreliable.messages_delivered == len(got)      # the lost ones never arrived
    assert b.stats.unreliable.bytes_delivered == 4 * len(got)
    for i in range(N):                                  # out of the lossy end
        await b.send(U, i.to_bytes(4, "big"))
    back = await _read_all(inner_b, a)
    assert _binomial_ok(N - len(back), N, 0.3) and b.dropped_sent == N - len(back)
    st = b.stats.unreliable
    assert st.messages_sent == N and st.messages_lost == N - len(back) and st.bytes_lost == 4 * (N - len(back))
    assert a.stats.unreliable.messages_delivered == len(back)
    assert {int.from_bytes(d, "big") for _, d in back} < set(range(N))


async def test_the_reliable_channel_is_untouched() -> None:
    a, inner_b = memory_link_pair("a", "b")
    b = LossyLink(inner_b, plr=0.9, seed=2)
    messages = [i.to_bytes(2, "big") for i in range(200)]
    for m in messages:
        await a.send(R, m)
        await b.send(R, m[::-1])
    assert await _read_all(a, b) == [(R, m) for m in messages]
    assert await _read_all(inner_b, a) == [(R, m[::-1]) for m in messages]
    assert b.dropped_sent == b.dropped_received == 0


async def test_a_seed_makes_the_drops_reproducible() -> None:
    async def survivors(seed: int | None) -> list[bytes]:
        inner_a, b = memory_link_pair("a", "b")
        a = LossyLink(inner_a, plr=0.5, seed=seed)
        for i in range(200):
            await a.send(U, i.to_bytes(2, "big"))
        return [d for _, d in await _read_all(inner_a, b)]

    first = await survivors(7)
    assert first == await survivors(7) and first != await survivors(8)


async def test_oversize_and_closed_links_raise_as_the_inner_link_does() -> None:
    a, inner_b = memory_link_pair("a", "b", max_unreliable_bytes=100)
    b = LossyLink(inner_b, plr=0.5, seed=3)
    for _ in range(20):                                 # never lost silently: the size check comes first
        with pytest.raises(ValueError, match="exceeds"):
            await b.send(U, bytes(101))
    assert b.stats.unreliable.messages_dropped_for_size == 20 and b.stats.unreliable.messages_lost == 0
    await b.aclose()
    assert b.closed and a.closed
    with pytest.raises(LinkClosed):
        await b.send(U, b"x")
    with pytest.raises(LinkClosed):
        await b.recv()


async def test_links_with_their_own_heartbeats_get_the_same_drop_decision() -> None:
    class Beating:
        """A fake inner link that only records the hook (the real one: test_webrtc_link)."""

        def __init__(self) -> None:
            self.drop = None
            self.local_id, self.remote_id = "b", "a"

        def set_heartbeat_loss(self, drop):  # type: ignore[no-untyped-def]
            self.drop = drop

    inner = Beating()
    assert isinstance(inner, HeartbeatLoss)
    LossyLink(inner, plr=0.25, seed=4)  # type: ignore[arg-type]
    assert inner.drop is not None
    assert 400 < sum(inner.drop() for _ in range(2000)) < 600
    clean = Beating()
    LossyLink(clean, plr=0.0)  # type: ignore[arg-type]
    assert clean.drop is None
