"""mDNS discovery with real zeroconf: on loopback in one process, and across two network namespaces.

Network rule: traffic stays on loopback (``interfaces=["127.0.0.1"]``) or inside namespaces the
test creates. Every service name carries a per-run prefix, so concurrent runs on one machine do
not see each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from halo_p2p.discovery import SERVICE_TYPE, PeerEvent, PeerInfo, PeerSubscription, model_entry
from halo_p2p.discovery.mdns import MdnsDiscovery, all_interfaces_stay_local, interface_addresses
from halo_p2p.errors import ConfigError, DiscoveryError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ["127.0.0.1"]
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def run_prefix() -> str:
    """A fresh instance-name prefix (``t`` + 8 hex + ``-``)."""
    return f"t{secrets.token_hex(4)}-"


def peer(pid: str, port: int, *, host: str = "127.0.0.1", gflops: float = 10.0) -> PeerInfo:
    return PeerInfo(peer_id=pid, name=f"Peer {pid} ✓", models=(model_entry("smollm2-135m-instruct", SHA),
                                                                  model_entry("stories260K", "ab" * 32)),
                    cores=2, memory_budget_bytes=3 << 30, compute_gflops=gflops, host=host, signaling_port=port)


async def next_event(events: PeerSubscription, timeout_s: float) -> PeerEvent:
    async with asyncio.timeout(timeout_s):
        return await anext(events)


def test_interface_rules() -> None:
    assert interface_addresses("lo") == ["127.0.0.1"]
    with pytest.raises(ConfigError, match=r"no such network interface.*lo"):
        interface_addresses("no-such-if0")
    with pytest.raises(ConfigError, match="not an IP address"):
        MdnsDiscovery(interfaces=["lo"])
    with pytest.raises(ConfigError, match="instance_prefix"):
        MdnsDiscovery(interfaces=LOOPBACK, instance_prefix="bad.prefix")
    with pytest.raises(ConfigError, match="resolve_timeout_s"):
        MdnsDiscovery(interfaces=LOOPBACK, resolve_timeout_s=0)
    MdnsDiscovery(allow_all_interfaces=True)            # constructing opens no socket
    if all_interfaces_stay_local():
        pytest.skip("this process runs in an isolated namespace; the root-namespace refusal is not testable here")
    with pytest.raises(ConfigError, match="would multicast on this machine's LAN"):
        MdnsDiscovery()


async def test_three_peers_find_each_other_update_and_leave_on_loopback() -> None:
    prefix = run_prefix()
    ds = [MdnsDiscovery(interfaces=LOOPBACK, instance_prefix=prefix) for _ in range(3)]
    me = [peer(f"p{i}", 17000 + i) for i in range(3)]
    stranger = MdnsDiscovery(interfaces=LOOPBACK, instance_prefix=run_prefix())    # another "test run"
    bad_zc = AsyncZeroconf(interfaces=LOOPBACK)         # a broken peer: TXT without 'c'
    bad = AsyncServiceInfo(SERVICE_TYPE, f"{prefix}broken.{SERVICE_TYPE}", port=17009, parsed_addresses=LOOPBACK,
                           properties={"v": "1", "id": "broken", "n": "b", "m": "", "mem": "1", "gf": "1.0"},
                           server=f"{prefix}broken.local.")
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(d.start(m) for d, m in zip(ds, me, strict=True)), stranger.start(peer("p0", 17100)),
                             bad_zc.async_register_service(bad))
        started_s = time.monotonic() - t0
        views = await asyncio.gather(*(d.wait_for_peers(2, 10.0) for d in ds))
        found_s = time.monotonic() - t0
        for i, view in enumerate(views):
            assert view == {m.peer_id: m for j, m in enumerate(me) if j != i}      # every TXT field intact
        assert started_s < 5.0 and found_s < 6.0, (started_s, found_s)
        await asyncio.sleep(0.3)                        # let the broken record arrive everywhere
        assert all(set(d.peers()) == set(views[i]) for i, d in enumerate(ds))    # no stranger, no broken
        assert ds[0].stats.malformed_txt == 1 and stranger.peers() == {}

        events = ds[0].subscribe(replay=False)
        t1 = time.monotonic()
        await ds[1].update(peer("p1", 17001, gflops=42.0))
        ev = await next_event(events, 5.0)
        assert (ev.kind, ev.peer.peer_id, ev.peer.compute_gflops) == ("updated", "p1", 42.0)
        update_s = time.monotonic() - t1

        events1 = ds[1].subscribe(replay=False)
        t2 = time.monotonic()
        await ds[2].aclose()                            # goodbye packets: the others drop p2 at once
        ev = await next_event(events, 5.0)
        gone_s = time.monotonic() - t2
        assert (ev.kind, ev.peer.peer_id) == ("removed", "p2")
        ev = await next_event(events1, 5.0)
        assert (ev.kind, ev.peer.peer_id) == ("removed", "p2")
        assert set(ds[0].peers()) == {"p1"} and set(ds[1].peers()) == {"p0"}
        print(f"mdns loopback: started {started_s:.2f} s, all found {found_s:.2f} s, "
              f"update seen {update_s:.3f} s, removal seen {gone_s:.3f} s")
    finally:
        await asyncio.gather(*(d.aclose() for d in [*ds, stranger]), bad_zc.async_close())


async def test_missing_interface_is_a_clear_error() -> None:
    d = MdnsDiscovery(interfaces=["198.51.100.123"])   # TEST-NET-2, on no interface here
    with pytest.raises(DiscoveryError, match="cannot open mDNS sockets"):
        await d.start(peer("x", 17400, host="198.51.100.123"))
    with pytest.raises(DiscoveryError, match="already started or closed"):
        await d.start(peer("x", 17400, host="198.51.100.123"))
    await d.aclose()


async def test_duplicate_id_is_refused_on_loopback() -> None:
    prefix = run_prefix()
    first, copy = (MdnsDiscovery(interfaces=LOOPBACK, instance_prefix=prefix) for _ in range(2))
    try:
        await first.start(peer("dup", 17201))
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError, match=r"peer id dup is already used by 127\.0\.0\.1:17201 .*--peer-id"):
            await copy.start(peer("dup", 17202))
        assert time.monotonic() - t0 < 5.0
        await copy.aclose()                             # closed by start already; idempotent
        assert first.peers() == {} and first.stats.refused_duplicates == 0     # the copy never registered
    finally:
        await asyncio.gather(first.aclose(), copy.aclose())


# --- two network namespaces joined by a veth pair ---------------------------------------------------

NS_SCRIPT = """
import asyncio, json, sys, time
from halo_p2p.discovery import PeerInfo
from halo_p2p.discovery.mdns import MdnsDiscovery

async def main(pid, host, prefix):
    d = MdnsDiscovery(instance_prefix=prefix)   # all interfaces: allowed inside an `ip netns` namespace
    me = PeerInfo(peer_id=pid, name=pid, cores=1, memory_budget_bytes=1, compute_gflops=1.0, host=host,
                  signaling_port=7700)
    t0 = time.monotonic()
    await d.start(me)
    try:
        view = await d.wait_for_peers(1, 15.0)
        found_s = time.monotonic() - t0
        await asyncio.sleep(2.0)                # stay visible while the other side looks
    finally:
        await d.aclose()
    sys.stdout.write(json.dumps({"found_s": found_s, "peers": {k: [v.host, v.signaling_port]
                                                                for k, v in view.items()}}))

asyncio.run(main(*sys.argv[1:]))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns_pair() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces ``(name, address)`` joined by a veth pair in 10.213.x.0/24; deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")
    token = secrets.token_hex(3)
    subnet = f"10.213.{secrets.randbelow(254) + 1}"
    names = [f"halo-d{token}{s}" for s in "ab"]
    devs = [f"hd{token}{s}" for s in "ab"]
    created: list[str] = []
    try:
        try:
            for name in names:
                _ip("netns", "add", name)
                created.append(name)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"`ip netns add` does not work here: {exc.stderr.strip()}")
        # created inside the namespaces: the veth never exists in the root namespace
        _ip("-n", names[0], "link", "add", devs[0], "type", "veth", "peer", "name", devs[1], "netns", names[1])
        for i, (name, dev) in enumerate(zip(names, devs, strict=True)):
            _ip("-n", name, "addr", "add", f"{subnet}.{i + 1}/24", "dev", dev)
            _ip("-n", name, "link", "set", dev, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield [(name, f"{subnet}.{i + 1}") for i, name in enumerate(names)]
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.netns
async def test_two_namespaces_find_each_other(netns_pair: list[tuple[str, str]]) -> None:
    prefix = run_prefix()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", NS_SCRIPT, f"n{i}", addr, prefix, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for i, (ns, addr) in enumerate(netns_pair)]
    try:
        async with asyncio.timeout(40.0):
            outputs = await asyncio.gather(*(p.communicate() for p in procs))
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    results = []
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out))
    (_, addr0), (_, addr1) = netns_pair
    assert results[0]["peers"] == {"n1": [addr1, 7700]}
    assert results[1]["peers"] == {"n0": [addr0, 7700]}
    assert all(r["found_s"] < 10.0 for r in results)
    print(f"mdns across namespaces: found after {[round(r['found_s'], 2) for r in results]} s")
