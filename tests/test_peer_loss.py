"""Issue #12 at the swarm level, over memory links: a dial that fails in any way leaves only that
peer out within one deadline; a worker that falls silent is lost within ``peer_silence_s``, the
stall and the re-plan show in the report (``--json``), and a worker whose link recovers rejoins."""

from __future__ import annotations

import argparse
import asyncio
from typing import ClassVar

import pytest

from halo_p2p.discovery import MemoryDiscovery, MemoryNetwork, PeerInfo
from halo_p2p.engine.local import LocalEngine
from halo_p2p.errors import ConfigError
from halo_p2p.model.llama2c import Llama2cModel
from halo_p2p.model.llama2c_tokenizer import Llama2cTokenizer
from halo_p2p.model.registry import resolve
from halo_p2p.net.connector import DialTarget, MemoryConnector
from halo_p2p.net.hub import MemoryHub
from halo_p2p.net.link import Link, LinkConditions
from halo_p2p.node.emulate import start_emulated_swarm
from halo_p2p.node.library import ModelLibrary
from halo_p2p.node.peer import NodeConfig, PeerNode
from halo_p2p.node.swarm import dial_peers
from halo_p2p.profiles import PeerProfile
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.generate import Generator
from halo_p2p.session.liveness import heard_s, silent_since

KEY = bytes(range(32))
SILENCE_S = 0.3          # a short peer_silence_s keeps the tests quick


@pytest.fixture(scope="module")
def stories():
    ref = resolve("stories260K")
    return Llama2cModel.open(ref.path), Llama2cTokenizer.open(ref.tokenizer_path)


class _Hostile(MemoryConnector):
    """A memory connector whose dials to some peer ids go wrong: ``hang`` never returns (and
    ignores its timeout), the others raise what a crafted answer could make a parser raise."""

    RAISES: ClassVar[dict[str, Exception]] = {
        "assert": AssertionError("crafted SDP"), "value": ValueError("4300-digit bignum"),
        "os": ConnectionResetError("reset by peer"), "timeout": TimeoutError()}

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.attempts: dict[str, int] = {}
        self.timeouts_s: list[float] = []

    async def dial(self, peer: DialTarget, *, timeout_s: float) -> Link:
        self.attempts[peer.peer_id] = self.attempts.get(peer.peer_id, 0) + 1
        self.timeouts_s.append(timeout_s)
        if peer.peer_id == "hang":
            await asyncio.Event().wait()
        if peer.peer_id in self.RAISES:
            raise self.RAISES[peer.peer_id]
        return await super().dial(peer, timeout_s=timeout_s)


def _info(peer_id: str, port: int) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, name=peer_id, cores=1, memory_budget_bytes=1 << 30, compute_gflops=1.0,
                    host="127.0.0.1", signaling_port=port)


async def test_any_dial_failure_leaves_only_that_peer_out_within_the_deadline() -> None:
    """Before issue #12 an AssertionError (or ValueError, OSError) from one dial ended the whole
    coordinator, and a silent peer cost two 10 s timeouts in turn."""
    net, hub = MemoryNetwork(), MemoryHub(seed=1)
    library = ModelLibrary(["stories260K"])

    def node(name: str, connector_type=MemoryConnector) -> PeerNode:
        config = NodeConfig(peer_id=name, name=name, address="127.0.0.1", swarm_key=KEY, compute_gflops=1.0)
        return PeerNode(config, library, MemoryDiscovery(net), connector=connector_type(hub, name, swarm_key=KEY))

    coordinator, good = node("c", _Hostile), [node("g1"), node("g2")]
    for n in (coordinator, *good):
        await n.start()
    bad = [_info(name, 30000 + i) for i, name in enumerate(("hang", "assert", "value", "os", "timeout"))]
    try:
        candidates = [bad[0], *(n.info for n in good), *bad[1:]]
        async with asyncio.timeout(10):
            dialed = await dial_peers(coordinator, candidates, deadline_s=0.5, attempts=2)
        assert list(dialed) == ["g1", "g2"]                            # in the order given
        assert all(not link.closed for _, link in dialed.values())
        assert dict(coordinator.dial_stats) == {"ok": 2, "failed": 4, "timeout": 1}
        connector = coordinator.connector
        assert connector.attempts == {"hang": 1, "g1": 1, "g2": 1, "assert": 2, "value": 2, "os": 2, "timeout": 2}
        assert max(connector.timeouts_s) <= 0.5                       # no dial was given more than the deadline
        for _, link in dialed.values():
            await link.aclose()
    finally:
        for n in (coordinator, *good):
            await n.aclose()


def _report(engine) -> dict:
    from halo_p2p.cli.commands import split_report

    return split_report(engine, argparse.Namespace(sync=engine.status().mode, plr=0.0, delay_ms=0.0))["split"]


async def test_a_killed_peer_is_lost_within_the_silence_and_the_stall_shows_in_the_report(stories) -> None:
    """p2's link goes silent for good mid-generation (halo, every group critical: the coordinator
    must wait for it). Before issue #12 a memory link without heartbeats stalled the sync point
    until ``stall_timeout_s`` and failed the generation; on WebRTC it took the link's 3 s dead
    time, and ``--json`` showed no trace of the stall."""
    source, tok = stories
    profiles = [PeerProfile(name=f"p{i}", link=LinkConditions(delay_s=0.001)) for i in range(3)]
    options = SessionOptions(mode="halo", wire_dtype="float32", max_seq_len=256, stall_timeout_s=5.0,
                             peer_silence_s=SILENCE_S)
    swarm = await start_emulated_swarm(source, profiles, options, critical="all")
    tokens = []
    try:
        async with asyncio.timeout(60):
            async for event in Generator(swarm, tok).stream(tok.encode("Once upon a time"),
                                                             SamplingParams(temperature=0, max_tokens=16)):
                tokens.append(event.token_id)
                if len(tokens) == 6:
                    swarm.links["p2"].set_conditions(LinkConditions(plr=1.0))     # killed: nothing in, nothing out
        status, report = swarm.status(), _report(swarm)
    finally:
        await swarm.aclose()
    assert len(tokens) == 16
    assert "p2" not in status.plan.peers and status.lost == {"p2"} and status.replans == 1
    (event,) = status.events
    assert event.reason == "lost" and event.peers == ("p2",) and event.replayed_tokens > 0
    assert SILENCE_S < event.silent_s < options.stall_timeout_s       # lost at the silence, not at a stall
    stalled = status.records[event.record_index]                      # the pass that lost p2
    assert stalled.session == 1 and status.records[event.record_index + 1].session == 2
    assert stalled.wall_s >= event.silent_s + event.cost_s           # detection and re-plan inside the token
    assert stalled.wall_s > max(r.wall_s for r in status.records[1:] if r is not stalled)
    # the --json report: per-token wall time next to wait, the re-plan with its cost
    per_token = report["per_token"]
    assert len(per_token) == len(status.records) == 16
    assert per_token[event.record_index]["wall_ms"] == pytest.approx(1000 * stalled.wall_s)
    assert report["max_wall_ms"] == pytest.approx(1000 * stalled.wall_s)
    assert report["replan_events"] == [event.as_dict()] and report["replan_events"][0]["cost_ms"] > 0
    assert report["lost_peers"] == ["p2"]


async def test_a_paused_peer_rejoins_at_the_next_pass_once_its_link_recovers(stories) -> None:
    """strict: p2's link goes silent (lost after ``peer_silence_s``, re-planned without it), then
    recovers: p2 is back in the plan after the next re-plan and the output stays exact. Before
    issue #12 the silent link stalled until ``stall_timeout_s``, and a lost peer never came back."""
    source, tok = stories
    params = SamplingParams(temperature=0, max_tokens=24)
    local = LocalEngine(source, max_seq_len=256)
    want = [e.token_id async for e in Generator(local, tok).stream(tok.encode("Once upon a time"), params)]
    await local.aclose()
    profiles = [PeerProfile(name=f"p{i}", link=LinkConditions(delay_s=0.001)) for i in range(3)]
    options = SessionOptions(mode="strict", wire_dtype="float32", max_seq_len=256, stall_timeout_s=5.0,
                             peer_silence_s=SILENCE_S)
    swarm = await start_emulated_swarm(source, profiles, options, critical="all")
    link = swarm.links["p2"]
    tokens, plans = [], []
    try:
        async with asyncio.timeout(60):
            async for event in Generator(swarm, tok).stream(tok.encode("Once upon a time"), params):
                tokens.append(event.token_id)
                plans.append(swarm.plan.peers)
                if len(tokens) == 6:
                    link.set_conditions(LinkConditions(plr=1.0))            # paused
                elif swarm.replans == 1 and link.conditions.plr == 1.0:
                    assert "p2" not in swarm.plan.peers
                    link.set_conditions(LinkConditions(delay_s=0.001))     # resumed
                    for _ in range(500):                                    # its stale answers arrive
                        if "p2" in swarm.returned:
                            break
                        await asyncio.sleep(0.01)
        status = swarm.status()
    finally:
        await swarm.aclose()
    assert tokens == want                                                   # strict: exact throughout
    assert [e.reason for e in status.events] == ["lost", "returned"]
    assert status.events[1].peers == ("p2",) and status.events[1].replayed_tokens > 0
    assert "p2" in status.plan.peers and not status.lost and status.replans == 1
    assert any("p2" not in peers for peers in plans) and plans[-1] == ("p0", "p1", "p2")
    assert status.session == 3 and {r.session for r in status.records} == {1, 2, 3}


async def test_a_closed_link_is_not_a_silence_and_stays_lost(stories) -> None:
    """A worker whose link closed (it left) is not watched for a return, as before issue #12."""
    source, tok = stories
    profiles = [PeerProfile(name=f"p{i}") for i in range(3)]
    options = SessionOptions(mode="halo", wire_dtype="float32", max_seq_len=256, peer_silence_s=SILENCE_S)
    swarm = await start_emulated_swarm(source, profiles, options, critical="all")
    try:
        gen = Generator(swarm, tok)
        async with asyncio.timeout(60):
            async for _ in gen.stream(tok.encode("Once upon a time"), SamplingParams(temperature=0, max_tokens=12)):
                if len(gen.stats.token_ids) == 4:
                    await swarm.links["p2"].aclose()
        await asyncio.sleep(3 * SILENCE_S)
        status = swarm.status()
    finally:
        await swarm.aclose()
    (event,) = status.events
    assert event.reason == "lost" and event.silent_s is None and not swarm.returned
    assert status.lost == {"p2"}


def test_silence_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="peer_silence_s"):
        SessionOptions(peer_silence_s=0)


class _Heard:
    def __init__(self, last_heard_s: float) -> None:
        self.last_heard_s = last_heard_s


def test_silence_is_measured_from_the_links_last_sign_of_life_else_from_the_answers() -> None:
    # a link with heartbeats: its stamp (monotonic) on the caller's clock
    assert heard_s(_Heard(last_heard_s=95.0), now_s=1000.0, mono_s=100.0) == 995.0
    assert heard_s(object(), now_s=1000.0, mono_s=100.0) is None        # a memory link: no heartbeats
    assert silent_since(link_heard_s=995.0, asked_s=999.0, answered_s=None) == 995.0
    # without heartbeats: since it was asked, or since its last answer chunk if later
    assert silent_since(link_heard_s=None, asked_s=999.0, answered_s=None) == 999.0
    assert silent_since(link_heard_s=None, asked_s=999.0, answered_s=999.5) == 999.5
    assert silent_since(link_heard_s=None, asked_s=999.0, answered_s=990.0) == 999.0
