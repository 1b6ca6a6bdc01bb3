"""The connector seam in memory: a MemoryHub joins peers with seeded, per-peer link conditions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from halo_p2p.errors import AuthError, ConfigError, TransportError
from halo_p2p.net.connector import Connector, MemoryConnector, WebRtcConnector
from halo_p2p.net.hub import MemoryHub
from halo_p2p.net.link import Channel, Link, LinkConditions
from halo_p2p.net.memory import memory_link_pair

KEY = bytes(range(32))


@dataclass(frozen=True)
class Target:
    peer_id: str
    host: str
    signaling_port: int


async def _unreliable_fates(link: Link, peer: Link, n: int = 200) -> list[bool]:
    """Which of ``n`` distinct unreliable messages from ``link`` reach ``peer``."""
    for i in range(n):
        await link.send(Channel.UNRELIABLE, i.to_bytes(4, "big"))
    await link.wait_idle()      # type: ignore[attr-defined]
    got = set()
    while peer.stats.unreliable.messages_delivered > len(got):
        _, data = await peer.recv()
        got.add(int.from_bytes(data, "big"))
    return [i in got for i in range(n)]


async def test_memory_connectors_dial_listen_and_check_identity_and_key() -> None:
    hub = MemoryHub(seed=5)
    lossy = LinkConditions(plr=0.3, delay_s=0.001)
    a = MemoryConnector(hub, "a", swarm_key=KEY)
    b = MemoryConnector(hub, "b", swarm_key=KEY, conditions=lossy)
    c = MemoryConnector(hub, "c", swarm_key=bytes(32))
    assert all(isinstance(x, Connector) for x in (a, b, c))
    accepted: list[tuple[Link, str]] = []

    async def on_link(link: Link, remote: str) -> None:
        accepted.append((link, remote))

    ports = [await x.listen(on_link) for x in (a, b, c)]
    assert len(set(ports)) == 3 and b.port == ports[1] and b.address == hub.address
    link = await a.dial(Target("b", hub.address, b.port), timeout_s=1)
    (theirs, remote), = accepted
    assert remote == "a" and theirs.remote_id == "a" and link.remote_id == "b" and b.stats["accepted"] == 1
    assert link.conditions == lossy                                 # type: ignore[attr-defined]
    # seeded like memory_link_pair(a, b, seed=hub.seed + 1): the second member's link to the first
    a2, b2 = memory_link_pair("a", "b", a_to_b=lossy, seed=6)
    assert await _unreliable_fates(link, theirs) == await _unreliable_fates(a2, b2)
    with pytest.raises(AuthError, match="refused our swarm key"):
        await a.dial(Target("c", hub.address, c.port), timeout_s=1)
    assert c.stats["refused_auth"] == 1 and len(accepted) == 1
    with pytest.raises(AuthError, match="not the expected peer"):
        await a.dial(Target("x", hub.address, b.port), timeout_s=1)
    await b.aclose()
    with pytest.raises(TransportError, match="nobody listens"):
        await a.dial(Target("b", hub.address, ports[1]), timeout_s=1)
    with pytest.raises(ConfigError, match="twice"):
        MemoryConnector(hub, "a")


async def test_two_lossy_members_compound_their_conditions() -> None:
    hub = MemoryHub()
    one, two = LinkConditions(plr=0.1, delay_s=0.002), LinkConditions(plr=0.2, jitter_s=0.001, rto_s=0.5)
    x, y = MemoryConnector(hub, "x", conditions=one), MemoryConnector(hub, "y", conditions=two)
    await y.listen(lambda link, remote: _noop())
    link = await x.dial(Target("y", hub.address, y.port), timeout_s=1)
    got = link.conditions                                        # type: ignore[attr-defined]
    assert got.plr == pytest.approx(1 - 0.9 * 0.8) and got.delay_s == 0.002 and got.jitter_s == 0.001
    assert got.rto_s == 0.5


async def _noop() -> None:
    return None


def test_webrtc_connector_is_a_connector_before_listening() -> None:
    connector = WebRtcConnector("p", "p", KEY, host="127.0.0.1", emulated_plr=0.1)
    assert isinstance(connector, Connector)
    assert (connector.port, connector.address, connector.stats) == (0, "127.0.0.1", Counter())
