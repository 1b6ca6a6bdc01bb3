"""Peers over real WebRTC links in one process (discovery in memory): roles and concurrency.

The same peers over in-memory links (a :class:`MemoryHub`) need no aiortc.
"""

from __future__ import annotations

import asyncio

import pytest
from rich.console import Console

from halo_p2p.cli.peers import status_table
from halo_p2p.discovery import MemoryDiscovery, MemoryNetwork
from halo_p2p.engine.local import LocalEngine
from halo_p2p.errors import HaloError
from halo_p2p.net.connector import MemoryConnector
from halo_p2p.net.hub import MemoryHub
from halo_p2p.net.memory import MemoryLink
from halo_p2p.node.library import ModelLibrary
from halo_p2p.node.peer import NodeConfig, PeerNode
from halo_p2p.node.swarm import open_swarm_engine
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import Generator
from halo_p2p.session.setup import Planner, SessionSetup

KEY = bytes(range(32))
GREEDY = SamplingParams(temperature=0, max_tokens=20)
SPLIT = SessionSetup(planner=Planner.SPLIT)


@pytest.fixture
async def peers():
    net = MemoryNetwork()
    library = ModelLibrary(["stories260K"])
    nodes = [PeerNode(NodeConfig(peer_id=f"p{i}", name=f"peer{i}", address="127.0.0.1", swarm_key=KEY), library,
                      MemoryDiscovery(net)) for i in range(3)]
    for node in nodes:
        await node.start()
    yield nodes, next(iter(library.held.values())), net
    for node in nodes:
        await node.aclose()


async def _generate(engine, tok, prompt: str) -> list[int]:
    gen = Generator(engine, tok)
    return [e.token_id async for e in gen.stream(tok.encode(prompt), GREEDY)]


async def test_two_prompts_on_two_peers_at_once(peers) -> None:
    nodes, held, _ = peers
    tok = held.model.tokenizer
    local = LocalEngine(held.model.source, max_seq_len=512)
    want = [await _generate(local, tok, p) for p in ("Once upon a time", "The dog")]
    await local.aclose()

    async def prompt_on(node: PeerNode, text: str) -> list[int]:
        options = SessionOptions(mode="strict", wire_dtype="float32", max_seq_len=512)
        engine = await open_swarm_engine(node, held, options, SPLIT, wait_s=0.3, max_workers=2)
        try:
            assert len(engine.status().peers) == 3       # the prompt's peer coordinates, two work
            return await _generate(engine, tok, text)
        finally:
            await engine.aclose()

    async with asyncio.timeout(120):
        got = await asyncio.gather(prompt_on(nodes[0], "Once upon a time"), prompt_on(nodes[1], "The dog"))
    assert got == want
    assert all(not n.sessions for n in nodes)                     # sessions ended with their links


async def test_a_peer_without_the_model_gets_streamed_weights_once(peers, tmp_path, monkeypatch) -> None:
    nodes, held, net = peers
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))          # the bare peer's weight cache
    tok = held.model.tokenizer
    local = LocalEngine(held.model.source, max_seq_len=512)
    want = await _generate(local, tok, "Once upon a time")
    await local.aclose()
    bare = PeerNode(NodeConfig(peer_id="bare", name="bare", address="127.0.0.1", swarm_key=KEY), ModelLibrary([]),
                    MemoryDiscovery(net))
    await bare.start()
    streamed = []
    try:
        for _ in range(2):
            options = SessionOptions(mode="strict", wire_dtype="float32", max_seq_len=512)
            engine = await open_swarm_engine(nodes[0], held, options, SPLIT, wait_s=0.3)
            try:
                assert "bare" in engine.status().peers
                assert await _generate(engine, tok, "Once upon a time") == want    # exact with streamed weights
                streamed.append(sum(s.worker.counters["groups_streamed"] for s in bare.sessions.values()))
            finally:
                await engine.aclose()
    finally:
        await bare.aclose()
    assert streamed[0] > 0 and streamed[1] == 0                 # the second session read the disk cache
    assert any((tmp_path / "halo-p2p" / "weights").rglob("*.npz"))


async def test_wrong_swarm_key_is_refused(peers) -> None:
    nodes, held, _ = peers
    outsider = PeerNode(NodeConfig(peer_id="out", name="out", address="127.0.0.1", swarm_key=bytes(32)),
                        ModelLibrary(["stories260K"]), MemoryDiscovery(MemoryNetwork()))
    await outsider.start()
    outsider.discovery = nodes[0].discovery          # it sees the swarm, but holds another key
    try:
        with pytest.raises(HaloError, match="no peer holding"):
            await open_swarm_engine(outsider, held, SessionOptions(mode="strict", max_seq_len=512), SPLIT, wait_s=0.3)
        assert sum(n.connector.stats["refused_auth"] for n in nodes) >= 2
    finally:
        await outsider.aclose()


async def test_peer_nodes_over_memory_links_without_webrtc() -> None:
    """PeerNodes take a connector: over a MemoryHub a prompt runs on three peers, equal to one
    peer, and a peer holding another swarm key is refused (counted) without breaking the session."""
    net, hub = MemoryNetwork(), MemoryHub(seed=1)
    library = ModelLibrary(["stories260K"])
    held = next(iter(library.held.values()))
    tok = held.model.tokenizer
    local = LocalEngine(held.model.source, max_seq_len=512)
    want = await _generate(local, tok, "Once upon a time")
    await local.aclose()

    def node(i: int, key: bytes = KEY) -> PeerNode:
        config = NodeConfig(peer_id=f"m{i}", name=f"mem{i}", address="127.0.0.1", swarm_key=key, compute_gflops=1.0)
        return PeerNode(config, library, MemoryDiscovery(net), connector=MemoryConnector(hub, f"m{i}", swarm_key=key))

    nodes = [node(0), node(1), node(2), node(3, key=bytes(32))]
    for n in nodes:
        await n.start()
    try:
        options = SessionOptions(mode="strict", wire_dtype="float32", max_seq_len=512)
        engine = await open_swarm_engine(nodes[0], held, options, SPLIT, wait_s=0.3, max_workers=3)
        try:
            assert engine.status().peers == ("m0", "m1", "m2")
            assert all(isinstance(link, MemoryLink) for link in engine.links.values())
            assert await _generate(engine, tok, "Once upon a time") == want
            (served,) = nodes[1].status().served                 # the live view of a worker
            assert served.coordinator == "m0" and served.groups > 0 and served.bytes_sent > 0
            console = Console(record=True, width=200)
            console.print(status_table(nodes[1]))
            assert "coordinator of a session here" in console.export_text()
        finally:
            await engine.aclose()
        assert nodes[3].connector.stats["refused_auth"] == 1 and not nodes[3].sessions
    finally:
        for n in nodes:
            await n.aclose()
