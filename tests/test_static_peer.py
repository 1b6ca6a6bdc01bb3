"""Issue #12 over real WebRTC: ``--peer HOST:PORT`` alone builds a swarm (no mDNS), and fake
peers in discovery (a socket that never answers, garbage answers) cost one short deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from halo_p2p.discovery import MemoryDiscovery, MemoryNetwork, PeerInfo, StaticDiscovery
from halo_p2p.engine.local import LocalEngine
from halo_p2p.net.swarmkey import parse_swarm_key
from halo_p2p.node.library import ModelLibrary
from halo_p2p.node.peer import NodeConfig, PeerNode
from halo_p2p.node.swarm import open_swarm_engine
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import Generator
from halo_p2p.session.setup import Planner, SessionSetup

KEY = bytes(range(32))
GREEDY = SamplingParams(temperature=0, max_tokens=12)
SPLIT = SessionSetup(planner=Planner.SPLIT)
STRICT = SessionOptions(mode="strict", wire_dtype="float32", max_seq_len=256)


async def _generate(engine, tok, prompt: str = "Once upon a time") -> list[int]:
    return [e.token_id async for e in Generator(engine, tok).stream(tok.encode(prompt), GREEDY)]


async def _local(held) -> list[int]:
    local = LocalEngine(held.model.source, max_seq_len=256)
    try:
        return await _generate(local, held.model.tokenizer)
    finally:
        await local.aclose()


async def test_peer_addresses_alone_build_a_swarm() -> None:
    """Workers announce nothing anywhere; the coordinator knows only their ``--peer`` addresses
    (one of them twice, once by name). Before issue #12 the placeholders (memory budget 0) were
    filtered out and the coordinator found no peer."""
    library = ModelLibrary(["stories260K"])
    held = next(iter(library.held.values()))
    want = await _local(held)

    def node(peer_id: str, discovery) -> PeerNode:
        return PeerNode(NodeConfig(peer_id=peer_id, name=peer_id, address="127.0.0.1", swarm_key=KEY), library,
                        discovery)

    workers = [node(f"w{i}", StaticDiscovery([])) for i in range(2)]
    coordinator = None
    try:
        for w in workers:
            await w.start()
        ports = [w.connector.port for w in workers]
        coordinator = node("c", StaticDiscovery([*(f"127.0.0.1:{p}" for p in ports), f"localhost:{ports[0]}"]))
        await coordinator.start()
        assert all(p.static and p.memory_budget_bytes == 0 for p in coordinator.discovery.peers().values())
        async with asyncio.timeout(120):
            engine = await open_swarm_engine(coordinator, held, STRICT, SPLIT, wait_s=0.3)
            try:
                status = engine.status()
                assert set(status.peers) == {"c", "w0", "w1"}                    # the real ids, from the answers
                assert all(status.plan.groups_of(w) for w in ("w0", "w1"))
                assert dict(coordinator.dial_stats) == {"ok": 2, "duplicate": 1}     # w0 once, though named twice
                assert await _generate(engine, held.model.tokenizer) == want
            finally:
                await engine.aclose()
    finally:
        for n in (*workers, coordinator):
            if n is not None:
                await n.aclose()


async def _mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.read()                 # reads the offer, answers nothing, until the client leaves
    writer.close()


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.read(4)
        frame = bytes.fromhex("890202010101000100d8288284011affffffff1affffffff00d85540")   # crafted CBOR
        writer.write(len(frame).to_bytes(4, "big") + frame)
        await writer.drain()
        await reader.read()
    writer.close()


async def test_fake_peers_in_discovery_cost_one_short_deadline() -> None:
    """Keyless devices announce themselves; one never answers the signed offer, one answers a
    crafted frame. The coordinator dials everyone at once, leaves the fakes out within the
    deadline (counted) and runs on the real worker. Before issue #12 a silent fake peer cost two
    10 s connect timeouts in turn."""
    net = MemoryNetwork()
    library = ModelLibrary(["stories260K"])
    held = next(iter(library.held.values()))
    want = await _local(held)
    servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for handler in (_mute, _garbage)]
    fakes = []
    for i, server in enumerate(servers):
        fake = MemoryDiscovery(net)       # announces a peer holding the model at the fake's port
        await fake.start(PeerInfo(peer_id=f"fake{i}", name=f"fake{i}", models=(held.entry,), cores=4,
                                  memory_budget_bytes=1 << 30, compute_gflops=100.0, host="127.0.0.1",
                                  signaling_port=server.sockets[0].getsockname()[1]))
        fakes.append(fake)
    nodes = [PeerNode(NodeConfig(peer_id=name, name=name, address="127.0.0.1", swarm_key=KEY), library,
                      MemoryDiscovery(net)) for name in ("c", "w0")]
    try:
        for n in nodes:
            await n.start()
        coordinator = nodes[0]
        async with asyncio.timeout(60):
            engine = await open_swarm_engine(coordinator, held, STRICT, SPLIT, wait_s=0.3, max_workers=3,
                                             dial_deadline_s=2.0)
            try:
                assert engine.status().peers == ("c", "w0")
                assert await _generate(engine, held.model.tokenizer) == want
            finally:
                await engine.aclose()
        stats = coordinator.dial_stats
        assert stats["ok"] == 1 and stats["timeout"] == 1 and stats["failed"] == 1
    finally:
        for n in nodes:
            await n.aclose()
        for fake in fakes:
            await fake.aclose()
        for server in servers:
            server.close()


# -- real processes in network namespaces, multicast dropped -------------------------------------------------------

_NO_MDNS = """table bridge halo_nomdns {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip daddr 224.0.0.251 counter drop
    }
}
"""


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(600)
def test_peer_flag_builds_a_swarm_where_multicast_is_dropped(env: dict[str, str], tmp_path: Path) -> None:
    """Two devices on an emulated LAN whose switch drops mDNS: ``generate --peer`` on one uses
    the ``join`` of the other (before issue #12 it found no peer and ran alone)."""
    from halo_p2p.testbed.netns import DeviceLink, NetnsLan, available

    ok, why = available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")

    async def run() -> tuple[dict, str]:
        devices = [DeviceLink(0, 0, 0, seed=1), DeviceLink(0, 0, 0, seed=2)]
        async with NetnsLan(f"hp{os.getpid() % 10000}", devices, replace_stale=True) as lan:
            nft = await asyncio.create_subprocess_exec("ip", "netns", "exec", lan.hub_ns, "nft", "-f", "-",
                                                       stdin=asyncio.subprocess.PIPE)
            await nft.communicate(_NO_MDNS.encode())
            assert nft.returncode == 0
            peer_env = {**env, "XDG_CONFIG_HOME": str(tmp_path / "cfg-join")}
            join = await lan.spawn(1, [sys.executable, "-m", "halo_p2p", "join", "--model", "smollm2-135m-instruct",
                                       "--name", "far", "--address", lan.address(1), "--port", "7700", "--no-ui"],
                                   env=peer_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            line = await asyncio.wait_for(join.stdout.readline(), 120)
            assert line.startswith(b"halo-peer: joined as"), line
            gen = await lan.spawn(0, [sys.executable, "-m", "halo_p2p", "generate", "--model", "smollm2-135m-instruct",
                                      "--prompt", "The capital of France is", "--temperature", "0", "--max-tokens", "4",
                                      "--json", "--sync", "strict", "--planner", "split", "--address", lan.address(0),
                                      "--peer", f"{lan.address(1)}:7700", "--wait-peers", "2"],
                                  env={**env, "XDG_CONFIG_HOME": str(tmp_path / "cfg-gen")},
                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(gen.communicate(), 300)
            assert gen.returncode == 0, err.decode()
            counters = await asyncio.create_subprocess_exec("ip", "netns", "exec", lan.hub_ns, "nft", "list", "table",
                                                            "bridge", "halo_nomdns", stdout=asyncio.subprocess.PIPE)
            listing, _ = await counters.communicate()
            return json.loads(out), listing.decode()

    result, listing = asyncio.run(run())
    dropped = int(listing.split("counter packets ")[1].split()[0])
    assert dropped > 0                                    # mDNS was sent, and dropped by the switch
    assert result["split"]["peers"] == 2                  # the coordinator and the --peer device
    assert result["generated_tokens"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_frozen_join_is_lost_within_a_second_and_rejoins_after_it_resumes(env: dict[str, str],
                                                                                    tmp_path: Path) -> None:
    """Two ``halo-peer join`` processes given by ``--peer``; one is frozen (SIGSTOP) mid-generation
    for longer than its link's dead time (3 s), then resumed: the coordinator loses it within
    about ``peer_silence_s`` (not 3.3 s), the stall shows in the step records, and once resumed
    it is dialed again and rejoins the plan (before issue #12 it stayed out of the session)."""
    import signal

    ports = [7751, 7752]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "halo_p2p", "join", "--model", "stories260K", "--name", f"j{i}", "--peer-id", f"j{i}",
        "--address", "127.0.0.1", "--port", str(port), "--no-ui",
        env={**env, "XDG_CONFIG_HOME": str(tmp_path / f"cfg{i}")}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL) for i, port in enumerate(ports)]
    frozen = procs[1]
    try:
        for p in procs:
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            assert line.startswith(b"halo-peer: joined as"), line
        library = ModelLibrary(["stories260K"])
        held = next(iter(library.held.values()))
        want = await _local(held)
        key = parse_swarm_key(env["HALO_SWARM_KEY"], source="HALO_SWARM_KEY")
        coordinator = PeerNode(NodeConfig(peer_id="c", name="c", address="127.0.0.1", swarm_key=key), library,
                               StaticDiscovery([f"127.0.0.1:{port}" for port in ports]))
        await coordinator.start()
        try:
            engine = await open_swarm_engine(coordinator, held, STRICT, SPLIT, wait_s=0.3)
            tokens = []
            try:
                assert set(engine.status().peers) == {"c", "j0", "j1"}
                async with asyncio.timeout(120):
                    async for event in Generator(engine, held.model.tokenizer).stream(
                            held.model.tokenizer.encode("Once upon a time"), GREEDY):
                        tokens.append(event.token_id)
                        if len(tokens) == 3:
                            frozen.send_signal(signal.SIGSTOP)
                        elif engine.replans == 1 and "j1" not in engine.returned and len(engine.status().events) == 1:
                            await asyncio.sleep(4.0)             # its link closes (3 s) while frozen
                            assert engine.links["j1"].closed
                            frozen.send_signal(signal.SIGCONT)
                            for _ in range(200):                # dialed again once it answers
                                if "j1" in engine.returned:
                                    break
                                await asyncio.sleep(0.05)
                status = engine.status()
            finally:
                await engine.aclose()
        finally:
            await coordinator.aclose()
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
    assert tokens == want                                         # strict: exact throughout
    lost, back = status.events
    assert lost.reason == "lost" and lost.peers == ("j1",) and 1.0 < lost.silent_s < 3.0     # before the link's own 3 s
    assert status.records[lost.record_index].wall_s >= lost.silent_s
    assert back.reason == "returned" and back.peers == ("j1",)
    assert set(status.plan.peers) == {"c", "j0", "j1"} and not status.lost
