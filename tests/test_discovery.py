"""Discovery without the network: PeerInfo, the TXT encoding, the admission rules (memory), static peers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from halo_p2p.discovery import Discovery, PeerEvent, PeerInfo, PeerSubscription, model_entry, table
from halo_p2p.discovery.info import PROTOCOL_VERSION
from halo_p2p.discovery.memory import MemoryDiscovery, MemoryNetwork
from halo_p2p.discovery.static import CombinedDiscovery, StaticDiscovery, parse_peer_address
from halo_p2p.discovery.txt import MODEL_TXT_KEYS, TXT_STRING_MAX_BYTES, decode_txt, encode_txt, txt_size
from halo_p2p.errors import ConfigError, DiscoveryError

SHA = "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"


def peer(pid: str = "p1", *, port: int = 7001, host: str = "127.0.0.1", **kw: object) -> PeerInfo:
    fields: dict[str, object] = dict(peer_id=pid, name=f"peer {pid}", models=(model_entry("stories260K", SHA),),
                                     cores=4, memory_budget_bytes=2 << 30, compute_gflops=12.5, host=host,
                                     signaling_port=port)
    fields.update(kw)
    return PeerInfo(**fields)  # type: ignore[arg-type]


async def next_event(events: PeerSubscription, timeout_s: float = 1.0) -> PeerEvent:
    async with asyncio.timeout(timeout_s):
        return await anext(events)


# --- PeerInfo ------------------------------------------------------------------------------------

def test_peer_info_normalizes_and_formats() -> None:
    p = peer(models=["a@0123456789abcdef"], compute_gflops=3)
    assert p.models == ("a@0123456789abcdef",) and p.compute_gflops == 3.0 and isinstance(p.compute_gflops, float)
    assert p.address == "127.0.0.1:7001"
    assert peer(host="fd00::2", port=9).address == "[fd00::2]:9"
    assert model_entry("smollm2", SHA.upper()) == "smollm2@b0a507e7ad0f6266"


@pytest.mark.parametrize(("field", "value"), [
    ("peer_id", ""), ("peer_id", "has space"), ("peer_id", "a.b"), ("peer_id", "-x"), ("peer_id", "x" * 49),
    ("peer_id", "static:1.2.3.4:5"), ("name", ""), ("name", "é" * 32), ("name", "tab\there"),
    ("protocol", 0), ("protocol", True), ("models", ("no-hash",)), ("models", ("a@0123456789ABCDEF",)),
    ("models", ("a,b@0123456789abcdef",)), ("models", ("a@0123456789abcdef",) * 2), ("models", "a@0123456789abcdef"),
    ("cores", 0), ("cores", 2.0), ("memory_budget_bytes", -1), ("compute_gflops", float("nan")),
    ("compute_gflops", float("inf")), ("compute_gflops", -1.0), ("host", ""), ("host", "[::1]"), ("host", "a b"),
    ("signaling_port", 0), ("signaling_port", 65536), ("static", 1),
])
def test_peer_info_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"PeerInfo\.{field} "):
        peer(**{field: value})


def test_static_placeholders_have_their_own_rules() -> None:
    p = StaticDiscovery.placeholder("fd00::2", 7700)
    assert (p.peer_id, p.static, p.cores, p.host) == ("static:[fd00::2]:7700", True, 0, "fd00::2")
    with pytest.raises(ConfigError, match="static placeholder"):
        peer("p1", static=True)


# --- TXT encoding --------------------------------------------------------------------------------

def test_txt_round_trip_with_str_and_bytes_keys() -> None:
    me = peer(models=(model_entry("stories260K", SHA), model_entry("smollm2-135m-instruct", "ab" * 32)))
    props = encode_txt(me)
    assert set(props) == {"v", "id", "n", "m", "c", "mem", "gf"}
    assert decode_txt(props, me.host, me.signaling_port) == me
    as_zeroconf = {k.encode(): v.encode() for k, v in props.items()}   # zeroconf hands out bytes
    assert decode_txt(as_zeroconf, me.host, me.signaling_port) == me
    shouting = {k.upper(): v for k, v in props.items()} | {"future-key": b"\xff", b"\xff": b"1"}
    assert decode_txt(shouting, me.host, me.signaling_port) == me      # keys are case-insensitive, extras ignored
    empty = peer(models=())
    assert encode_txt(empty)["m"] == "" and decode_txt(encode_txt(empty), "127.0.0.1", 7001) == empty


def test_txt_splits_models_and_truncates_a_prefix(caplog: pytest.LogCaptureFixture) -> None:
    models = tuple(model_entry(f"model-{i:03d}-" + "x" * 80, SHA) for i in range(12))  # 110 bytes each
    me = peer("x" * 48, name="é" * 31, models=models)
    with caplog.at_level(logging.WARNING, logger="halo_p2p.discovery.txt"):
        props = encode_txt(me)
    assert all(len(f"{k}={v}".encode()) <= TXT_STRING_MAX_BYTES for k, v in props.items())
    assert [k for k in props if k.startswith("m") and k != "mem"] == list(MODEL_TXT_KEYS)
    assert txt_size(props) < 1300                      # one packet (RFC 6763 §6.2)
    decoded = decode_txt(props, "127.0.0.1", 7001)
    assert decoded.models == models[:8]                # 2 per string, 4 strings: the first 8 are kept, in order
    assert "announcing 8 of 12 models" in caplog.text
    fits = peer(models=models[:8])
    assert decode_txt(encode_txt(fits), "127.0.0.1", 7001) == fits


@pytest.mark.parametrize("key", ["v", "id", "n", "m", "c", "mem", "gf"])
def test_decode_missing_or_empty_key_names_it(key: str) -> None:
    props = encode_txt(peer())
    del props[key]
    with pytest.raises(DiscoveryError, match=rf"TXT key '{key}' is missing"):
        decode_txt(props, "127.0.0.1", 7001)
    with pytest.raises(DiscoveryError, match=rf"TXT key '{key}' has no value"):
        decode_txt({**props, key: None}, "127.0.0.1", 7001)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("v", "one", "not a number"), ("v", "0", "invalid"), ("id", "bad id", "invalid"), ("c", "2.5", "not a number"),
    ("c", "0", "invalid"), ("mem", "-5", "invalid"), ("gf", "nan", "invalid"), ("gf", "fast", "not a number"),
    ("m", "stories260K", "invalid"), ("m", "a@0123456789abcdef,a@0123456789abcdef", "invalid"), ("n", "", "invalid"),
    ("n", b"\xff\xfe", "not UTF-8"),
])
def test_decode_malformed_value_names_the_key(key: str, value: str | bytes, match: str) -> None:
    props: dict[str, str | bytes] = {**encode_txt(peer()), key: value}
    with pytest.raises(DiscoveryError, match=rf"TXT key '{key}'.*{match}"):
        decode_txt(props, "127.0.0.1", 7001)


def test_decode_rejects_a_bad_address() -> None:
    with pytest.raises(DiscoveryError, match="address"):
        decode_txt(encode_txt(peer()), "127.0.0.1", 0)


def test_decode_other_version_is_lenient_but_needs_v_and_id() -> None:
    future = {"v": "2", "id": "p9", "caps": "new-stuff"}
    info = decode_txt(future, "10.0.0.9", 7009)
    assert (info.protocol, info.peer_id, info.name, info.models, info.cores) == (2, "p9", "p9", (), 1)
    with pytest.raises(DiscoveryError, match="'id'"):
        decode_txt({"v": "2"}, "10.0.0.9", 7009)


# --- memory discovery: the admission rules ------------------------------------------------------------

async def test_memory_peers_see_each_other_update_and_leave() -> None:
    net = MemoryNetwork()
    a, b, c = (MemoryDiscovery(net) for _ in range(3))
    assert isinstance(a, Discovery)
    await a.start(peer("a", port=1))
    events = a.subscribe()
    await b.start(peer("b", port=2))
    await c.start(peer("c", port=3))
    assert set(a.peers()) == {"b", "c"} and set(b.peers()) == {"a", "c"} and set(c.peers()) == {"a", "b"}
    assert b.peers()["a"] == peer("a", port=1)
    assert [(e.kind, e.peer.peer_id) for e in (await next_event(events), await next_event(events))] == \
        [("added", "b"), ("added", "c")]
    await b.update(peer("b", port=2, compute_gflops=99.0))
    ev = await next_event(events)
    assert (ev.kind, ev.peer.compute_gflops) == ("updated", 99.0)
    with pytest.raises(ConfigError, match="peer id"):
        await b.update(peer("bb", port=2))
    await c.aclose()
    assert (await next_event(events)).kind == "removed" and set(a.peers()) == {"b"}
    assert await a.wait_for_peers(1, 0.1) == {"b": peer("b", port=2, compute_gflops=99.0)}
    await a.aclose()
    assert [e async for e in events] == []              # the subscription ends on close
    await a.aclose()                                    # idempotent
    await b.aclose()


async def test_memory_wait_for_peers_times_out_with_a_clear_error() -> None:
    net = MemoryNetwork()
    a, b = MemoryDiscovery(net), MemoryDiscovery(net)
    await a.start(peer("a"))
    waiter = asyncio.create_task(a.wait_for_peers(1, 2.0))
    await asyncio.sleep(0)
    await b.start(peer("b"))
    assert set(await waiter) == {"b"}
    with pytest.raises(DiscoveryError, match=r"found 1 of 2 peers within 0.05 s.*--peer HOST:PORT"):
        await a.wait_for_peers(2, 0.05)
    await asyncio.gather(a.aclose(), b.aclose())


async def test_memory_refuses_my_id_at_start() -> None:
    net = MemoryNetwork()
    a, copy, watcher = MemoryDiscovery(net), MemoryDiscovery(net), MemoryDiscovery(net)
    await a.start(peer("a", port=1))
    await watcher.start(peer("w", port=3))
    with pytest.raises(DiscoveryError, match=r"peer id a is already used by 127.0.0.1:1 \(give each device its own id"):
        await copy.start(peer("a", port=2))
    assert copy.stats.refused_duplicates == 1
    assert set(watcher.peers()) == {"a"} and watcher.peers()["a"].signaling_port == 1   # the copy never joined
    await asyncio.gather(a.aclose(), watcher.aclose(), copy.aclose())


async def test_memory_refuses_my_id_at_runtime_once(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork()
    a = MemoryDiscovery(net)
    await a.start(peer("a", port=1))
    events = a.subscribe()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):                              # repeated announcements count once
            net.publish("rogue", encode_txt(peer("a", port=2)), "127.0.0.1", 2)
    ev = await next_event(events)
    assert (ev.kind, ev.reason) == ("refused", "peer id a is already used by 127.0.0.1:2")
    assert a.peers() == {} and a.stats.refused_duplicates == 1 and caplog.text.count("refusing") == 1
    await a.aclose()


async def test_memory_two_others_with_one_id_keep_the_first() -> None:
    net = MemoryNetwork()
    a, first, second = MemoryDiscovery(net), MemoryDiscovery(net), MemoryDiscovery(net)
    await a.start(peer("a", port=1))
    events = a.subscribe(replay=False)
    await first.start(peer("x", port=2))
    with pytest.raises(DiscoveryError):                 # the second sees the first at start and refuses itself
        await second.start(peer("x", port=3))
    net.publish("late", encode_txt(peer("x", port=4)), "127.0.0.1", 4)    # one that did not probe
    assert [(e.kind, e.peer.signaling_port) for e in (await next_event(events), await next_event(events))] == \
        [("added", 2), ("refused", 4)]
    assert a.peers()["x"].signaling_port == 2 and a.stats.refused_duplicates == 1
    await first.aclose()                                # the refused record takes over when the first leaves
    assert [(e.kind, e.peer.signaling_port) for e in (await next_event(events), await next_event(events))] == \
        [("removed", 2), ("added", 4)]
    await asyncio.gather(a.aclose(), second.aclose())


async def test_memory_refuses_other_protocol_versions(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork()
    a, old = MemoryDiscovery(net), MemoryDiscovery(net)
    await a.start(peer("a"))
    events = a.subscribe()
    with caplog.at_level(logging.WARNING):
        await old.start(peer("o", protocol=PROTOCOL_VERSION + 1))
    ev = await next_event(events)
    assert ev.kind == "refused" and f"speaks protocol {PROTOCOL_VERSION + 1}" in ev.reason
    assert a.peers() == {} and a.stats.refused_version == 1 and "speaks protocol" in caplog.text
    assert old.peers() == {} and old.stats.refused_version == 1     # both sides refuse
    await asyncio.gather(a.aclose(), old.aclose())


async def test_memory_counts_malformed_records_and_never_crashes() -> None:
    net = MemoryNetwork()
    a = MemoryDiscovery(net)
    await a.start(peer("a"))
    events = a.subscribe(replay=False)
    net.publish("good-then-bad", encode_txt(peer("g", port=5)), "127.0.0.1", 5)
    net.publish("junk", {"v": "1", "id": "j"}, "127.0.0.1", 6)
    net.publish("junk", {"v": "1", "id": "j"}, "127.0.0.1", 6)      # same problem: counted once
    assert a.stats.malformed_txt == 1 and set(a.peers()) == {"g"}
    net.publish("good-then-bad", {**encode_txt(peer("g", port=5)), "c": "many"}, "127.0.0.1", 5)
    assert a.stats.malformed_txt == 2 and a.peers() == {}
    assert [e.kind for e in (await next_event(events), await next_event(events))] == ["added", "removed"]
    net.unpublish("junk")
    net.unpublish("nothing")
    await a.aclose()


async def test_subscription_drops_the_oldest_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "EVENT_QUEUE_MAX", 2)
    net = MemoryNetwork()
    a = MemoryDiscovery(net)
    await a.start(peer("a"))
    with a.subscribe() as events:
        for i in range(4):
            net.publish(f"s{i}", encode_txt(peer(f"p{i}", port=10 + i)), "127.0.0.1", 10 + i)
        assert a.stats.events_dropped == 2
        assert [(await next_event(events)).peer.peer_id for _ in range(2)] == ["p2", "p3"]
    assert [e async for e in events] == []              # closed by the with block
    await a.aclose()


# --- static peers and merging ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1:7700", ("10.0.0.1", 7700)), ("[fd00::2]:7700", ("fd00::2", 7700)),
    (" laptop.local:80 ", ("laptop.local", 80)),
    ("host.:1", ("host", 1)), ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
])
def test_parse_peer_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_peer_address(text) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("", "empty"), ("10.0.0.1", "port is missing"), ("fd00::2:7700", "must be in brackets"),
    ("[fd00::2]", "needs a port"), ("[zz]:1", "not an IPv6"), ("300.1.1.1:5", "not an IPv4"), ("host:0", "1..65535"),
    ("host:70000", "1..65535"), ("host:abc", "1..65535"), ("bad_host:1", "not a valid host name"),
    ("-a:1", "not a valid host name"), (":7", "not a valid host name"),
])
def test_parse_peer_address_errors_name_the_value_and_fix(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_peer_address(text)
    assert repr(text) in info.value.problem and info.value.fix


async def test_static_discovery_yields_placeholders() -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        StaticDiscovery(["10.0.0.1:1", "nope"])
    static = StaticDiscovery(["10.0.0.2:7700", "[fd00::2]:7700", "10.0.0.2:7700", "127.0.0.1:7001"])
    await static.start(peer("me", port=7001))           # our own address is skipped
    view = static.peers()
    assert set(view) == {"static:10.0.0.2:7700", "static:[fd00::2]:7700"}
    assert all(p.static and p.cores == 0 for p in view.values())
    assert await static.wait_for_peers(2, 0.01) == view
    with pytest.raises(DiscoveryError, match="found 2 of 3"):
        await static.wait_for_peers(3, 0.01)
    await static.update(peer("me", port=7001))
    await static.aclose()


async def test_combined_discovery_merges_views_and_events() -> None:
    net = MemoryNetwork()
    other = MemoryDiscovery(net)
    await other.start(peer("b", port=2))
    combined = CombinedDiscovery(MemoryDiscovery(net), StaticDiscovery(["10.0.0.9:7700"]))
    await combined.start(peer("a", port=1))
    assert set(combined.peers()) == {"b", "static:10.0.0.9:7700"}
    events = combined.subscribe(replay=False)
    late = MemoryDiscovery(net)
    await late.start(peer("c", port=3))
    assert (await next_event(events)).peer.peer_id == "c"
    net.publish("old", encode_txt(peer("o", port=4, protocol=9)), "127.0.0.1", 4)
    ev = await next_event(events)
    assert ev.kind == "refused" and combined.stats.refused_version == 1   # a child's refusal, passed through
    await late.aclose()
    assert (await next_event(events)).kind == "removed"
    assert set(await combined.wait_for_peers(2, 1.0)) == {"b", "static:10.0.0.9:7700"}
    await combined.update(peer("a", port=1, cores=8))
    assert other.peers()["a"].cores == 8
    await combined.aclose()
    assert [e async for e in events] == [] and other.peers() == {}
    await other.aclose()


async def test_combined_start_failure_closes_everything() -> None:
    net = MemoryNetwork()
    holder = MemoryDiscovery(net)
    await holder.start(peer("a", port=1))
    static = StaticDiscovery(["10.0.0.9:7700"])
    combined = CombinedDiscovery(MemoryDiscovery(net), static)
    with pytest.raises(DiscoveryError, match="already used"):
        await combined.start(peer("a", port=2))
    assert [e async for e in static.subscribe(replay=False)] == []       # closed
    with pytest.raises(ConfigError):
        CombinedDiscovery()
    await holder.aclose()
