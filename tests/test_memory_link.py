"""The in-memory lossy link: delivery, ordering, loss statistics, reproducibility, closing."""

from __future__ import annotations

import asyncio
import math
import struct

import pytest

from halo_p2p.errors import ConfigError, LinkClosed, TransportError
from halo_p2p.net import Channel, Link, LinkConditions, MemoryLink, memory_link_pair, recv_timeout

R, U = Channel.RELIABLE, Channel.UNRELIABLE


def _now() -> float:
    return asyncio.get_running_loop().time()


def _live_timers() -> int:
    """Timer handles on the running loop that are still armed."""
    return sum(not h.cancelled() for h in asyncio.get_running_loop()._scheduled)  # type: ignore[attr-defined]


async def _drain(tx: MemoryLink, rx: MemoryLink) -> list[tuple[Channel, bytes]]:
    """Wait until nothing ``tx`` sent is in flight, then read everything ``rx`` received."""
    await tx.wait_idle()
    out = []
    while (msg := await recv_timeout(rx, 0)) is not None:
        out.append(msg)
    return out


def _binomial_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# -- conditions -------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("plr", -0.1), ("plr", 1.5), ("plr", math.nan), ("delay_s", -1.0), ("delay_s", math.inf),
    ("jitter_s", -0.001), ("rto_s", 0.0), ("rto_s", 61.0), ("fragment_bytes", 0),
    ("fragment_bytes", 1.5), ("bandwidth_bytes_per_s", 0.0), ("bandwidth_bytes_per_s", -5.0),
])
def test_conditions_reject_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        LinkConditions(**{field: value})


def test_conditions_fragments_and_delivery_probability() -> None:
    c = LinkConditions(plr=0.05)
    assert [c.fragments(n) for n in (0, 1, 1160, 1161, 16384)] == [1, 1, 1, 2, 15]
    assert c.delivery_probability(16384) == pytest.approx(0.95 ** 15)
    assert LinkConditions().rto_s == 0.2 and LinkConditions().fragment_bytes == 1160


def test_pair_needs_running_loop() -> None:
    with pytest.raises(RuntimeError):
        memory_link_pair("a", "b")


async def test_pair_rejects_bad_max_unreliable_bytes() -> None:
    with pytest.raises(ConfigError, match="max_unreliable_bytes"):
        memory_link_pair("a", "b", max_unreliable_bytes=0)
    with pytest.raises(ConfigError, match="max_unreliable_bytes"):
        memory_link_pair("a", "b", max_unreliable_bytes=262145)


# -- basic delivery ---------------------------------------------------------------------------

async def test_lossless_both_ways_and_stats_on_both_ends() -> None:
    a, b = memory_link_pair("alice", "bob")
    assert isinstance(a, Link) and isinstance(b, Link)
    assert (a.local_id, a.remote_id, b.local_id, b.remote_id) == ("alice", "bob", "bob", "alice")
    assert a.max_unreliable_bytes == 1160
    await a.send(R, b"hello")
    await a.send(U, bytearray(b"act"))
    await b.send(R, b"back")
    assert sorted(await _drain(a, b)) == [(R, b"hello"), (U, b"act")]
    assert await _drain(b, a) == [(R, b"back")]
    assert (a.stats.reliable.messages_sent, a.stats.reliable.bytes_sent) == (1, 5)
    assert (b.stats.reliable.messages_delivered, b.stats.reliable.bytes_delivered) == (1, 5)
    assert (b.stats[U].messages_delivered, a.stats[U].messages_sent, a.stats[U].messages_lost) == (1, 1, 0)
    assert (a.stats.reliable.messages_delivered, b.stats.reliable.messages_sent) == (1, 1)
    assert a.stats.rtt_ms is None and a.stats.measured_plr is None
    await a.aclose()


async def test_delay_honoured() -> None:
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(delay_s=0.05), b_to_a=LinkConditions())
    t0 = _now()
    await a.send(U, b"u")
    await a.send(R, b"r")
    assert await recv_timeout(b, 0.03) is None            # not before delay_s
    got = {await b.recv(), await b.recv()}
    assert got == {(U, b"u"), (R, b"r")}
    assert _now() - t0 >= 0.05 - 1e-6
    t1 = _now()
    await b.send(R, b"fast")                               # the other direction has no delay
    assert await a.recv() == (R, b"fast")
    assert _now() - t1 < 0.04
    await a.aclose()


async def test_jitter_bounds_and_reorders_unreliable_not_reliable() -> None:
    cond = LinkConditions(delay_s=0.01, jitter_s=0.02)
    a, b = memory_link_pair("a", "b", a_to_b=cond, seed=3)
    t0 = _now()
    for i in range(100):
        await a.send(U, struct.pack("<I", i))
        await a.send(R, struct.pack("<I", i))
    arrivals = []
    for _ in range(200):
        ch, data = await b.recv()
        arrivals.append((ch, struct.unpack("<I", data)[0], _now() - t0))
    assert all(0.01 - 1e-6 <= t <= 0.03 + 0.05 for _, _, t in arrivals)     # + scheduling noise
    unrel = [i for ch, i, _ in arrivals if ch is U]
    rel = [i for ch, i, _ in arrivals if ch is R]
    assert sorted(unrel) == list(range(100)) and unrel != sorted(unrel)     # all arrive, reordered
    assert rel == list(range(100))                                          # reliable stays in order
    await a.aclose()


async def test_bandwidth_serializes() -> None:
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(bandwidth_bytes_per_s=100_000))
    t0 = _now()
    for i in range(10):
        await a.send(R if i % 2 else U, bytes(1000))      # both channels share the wire
    for _ in range(10):
        await b.recv()
    assert _now() - t0 >= 0.1 - 1e-6                        # 10 kB at 100 kB/s
    await a.aclose()


# -- reliable channel under loss --------------------------------------------------------------

async def _timed_reliable_run(cond: LinkConditions, seed: int = 3) -> tuple[float, MemoryLink]:
    a, b = memory_link_pair("a", "b", a_to_b=cond, seed=seed)
    t0 = _now()
    n = 40
    for i in range(n):
        await a.send(R, struct.pack("<I", i) + bytes(2000))     # 2 fragments each
    got, times = [], []
    for _ in range(n):
        ch, data = await b.recv()
        assert ch is R
        got.append(struct.unpack_from("<I", data)[0])
        times.append(_now())
    assert got == list(range(n))                                # all arrive, in order
    assert times == sorted(times)
    elapsed = _now() - t0
    await a.aclose()
    return elapsed, a


async def test_reliable_delivers_everything_in_order_under_loss() -> None:
    rto = 0.05
    lossless, _ = await _timed_reliable_run(LinkConditions(delay_s=0.005, rto_s=rto))
    lossy, a = await _timed_reliable_run(LinkConditions(plr=0.3, delay_s=0.005, rto_s=rto))
    assert a.stats.reliable.retransmissions > 0
    assert a.stats.reliable.messages_lost == 0
    assert lossy >= lossless + rto


async def test_reliable_retransmission_delay_doubles() -> None:
    """One-fragment messages, one at a time: after k losses a message is late by (2^k - 1) RTO."""
    rto, noise_s = 0.03, 0.05
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(plr=0.4, rto_s=rto), seed=7)
    ks = []
    for _ in range(12):
        before = a.stats.reliable.retransmissions
        t0 = _now()
        await a.send(R, b"x")
        k = a.stats.reliable.retransmissions - before           # losses of this one fragment
        await b.recv()
        late = _now() - t0
        expected = (2 ** k - 1) * rto                           # rto + 2 rto + 4 rto + ...
        assert expected - 1e-6 <= late < expected + noise_s, (k, late)
        ks.append(k)
    assert max(ks) >= 3, ks                                     # 7 RTO, where a fixed RTO gives 3
    await a.aclose()


async def test_head_of_line_blocking() -> None:
    """A small reliable message sent right after a retransmitted one waits for it."""
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(plr=0.5, rto_s=0.03), seed=11)
    t0 = _now()
    for i in range(10):
        await a.send(R, bytes([i]))
    arrivals = []
    for _ in range(10):
        _, data = await b.recv()
        arrivals.append((data[0], _now() - t0))
    assert [i for i, _ in arrivals] == list(range(10))
    assert a.stats.reliable.retransmissions > 0
    assert arrivals[-1][1] >= 0.03 - 1e-6                       # the last waited at least one RTO
    await a.aclose()


# -- unreliable channel loss statistics -------------------------------------------------------

async def test_unreliable_single_fragment_loss_rate() -> None:
    n, plr = 2000, 0.05
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(plr=plr), seed=42)
    for i in range(n):
        await a.send(U, struct.pack("<I", i) + bytes(100))
    got = await _drain(a, b)
    lost = n - len(got)
    assert _binomial_ok(lost, n, plr), lost
    assert a.stats.unreliable.messages_lost == lost
    assert b.stats.unreliable.messages_delivered == len(got)
    assert a.stats.unreliable.messages_sent == n
    await a.aclose()


async def test_unreliable_large_message_lost_whole() -> None:
    n, size, plr = 1000, 16384, 0.05
    cond = LinkConditions(plr=plr)
    a, b = memory_link_pair("a", "b", a_to_b=cond, seed=9, max_unreliable_bytes=size)
    payloads = [struct.pack("<I", i) * (size // 4) for i in range(n)]
    for p in payloads:
        await a.send(U, p)
    got = await _drain(a, b)
    p_ok = 0.95 ** 15
    assert cond.delivery_probability(size) == pytest.approx(p_ok)
    assert _binomial_ok(len(got), n, p_ok), len(got)
    for _, data in got:                                          # what arrives arrives whole
        assert data == payloads[struct.unpack_from("<I", data)[0]]
    await a.aclose()


async def _lost_indices(seed: int) -> tuple[set[int], int]:
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(plr=0.1, rto_s=0.02), seed=seed)
    for i in range(500):
        await a.send(U, struct.pack("<I", i))
        if i % 50 == 0:
            await a.send(R, bytes(3000))                         # interleaved reliable traffic
    got = {struct.unpack("<I", d)[0] for ch, d in await _drain(a, b) if ch is U}
    retrans = a.stats.reliable.retransmissions
    await a.aclose()
    return set(range(500)) - got, retrans


async def test_same_seed_same_losses_different_seed_different() -> None:
    lost7, retrans7 = await _lost_indices(7)
    again, retrans_again = await _lost_indices(7)
    other, _ = await _lost_indices(8)
    assert lost7 and lost7 == again and retrans7 == retrans_again
    assert other != lost7


# -- size limit, closing, runtime conditions --------------------------------------------------

async def test_unreliable_size_limit() -> None:
    a, b = memory_link_pair("a", "b")
    with pytest.raises(ValueError, match="1161"):
        await a.send(U, bytes(1161))
    assert a.stats.unreliable.messages_dropped_for_size == 1
    assert a.stats.unreliable.messages_sent == 0
    await a.send(U, bytes(1160))
    await a.send(R, bytes(100_000))                              # the reliable channel has no limit
    assert sorted(len(d) for _, d in await _drain(a, b)) == [1160, 100_000]
    with pytest.raises(TypeError):
        await a.send(U, 5)  # type: ignore[arg-type]
    await a.aclose()


async def test_close_drains_then_raises_and_leaks_nothing() -> None:
    timers_before, tasks_before = _live_timers(), asyncio.all_tasks()
    a, b = memory_link_pair("a", "b")
    for i in range(3):
        await a.send(R, bytes([i]))
    await a.wait_idle()                                          # delivered to b
    a.set_conditions(LinkConditions(delay_s=5.0))
    await a.send(R, b"late")
    await a.send(U, b"late")
    await b.send(U, b"late")
    assert a.in_flight == 2 and b.in_flight == 1
    waiting = asyncio.create_task(a.recv())                      # blocked receiver on a
    await asyncio.sleep(0)
    await a.aclose()
    await a.aclose()                                             # idempotent
    assert a.closed and b.closed
    assert [await b.recv() for _ in range(3)] == [(R, b"\x00"), (R, b"\x01"), (R, b"\x02")]
    for end in (b, b, a):                                        # sticky on both ends
        with pytest.raises(LinkClosed):
            await end.recv()
    with pytest.raises(LinkClosed):
        await waiting
    with pytest.raises(LinkClosed):
        await recv_timeout(b, 1.0)
    for end in (a, b):
        with pytest.raises(TransportError):
            await end.send(R, b"x")
        with pytest.raises(LinkClosed):
            await end.send(U, b"x")
    assert a.in_flight == b.in_flight == 0
    assert _live_timers() == timers_before
    assert asyncio.all_tasks() == tasks_before
    assert b.stats.reliable.messages_delivered == 3


async def test_recv_timeout_is_cancellation_safe() -> None:
    a, b = memory_link_pair("a", "b", a_to_b=LinkConditions(delay_s=0.02))
    assert await recv_timeout(b, 0.001) is None
    await a.send(R, b"m")
    assert await recv_timeout(b, 0.005) is None                  # timed out while in flight ...
    assert await recv_timeout(b, 0.1) == (R, b"m")               # ... and still received
    await a.aclose()


async def test_set_conditions_worsen_then_recover() -> None:
    a, b = memory_link_pair("a", "b", seed=4)
    a.set_conditions(LinkConditions(plr=1.0))                    # both directions black-holed
    for i in range(5):
        await a.send(U, bytes([i]))
        await a.send(R, bytes([i]))
        await b.send(R, bytes([10 + i]))
    assert await recv_timeout(b, 0.02) is None and await recv_timeout(a, 0.0) is None
    assert a.stats.unreliable.messages_lost == 5
    assert a.in_flight == 5 and b.in_flight == 5                 # reliable messages stall
    a.set_conditions(LinkConditions(), incoming=LinkConditions(plr=0.5, rto_s=0.01))
    assert b.conditions.plr == 0.5 and a.conditions.plr == 0.0
    assert await _drain(a, b) == [(R, bytes([i])) for i in range(5)]
    assert await _drain(b, a) == [(R, bytes([10 + i])) for i in range(5)]
    await a.send(U, b"ok")
    assert await _drain(a, b) == [(U, b"ok")]
    await a.aclose()
    with pytest.raises(LinkClosed):
        a.set_conditions(LinkConditions())
