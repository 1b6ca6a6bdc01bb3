"""The emulated LAN (halo_p2p.testbed.netns) and its userspace shim (halo_p2p.testbed.shim).

The pure parts (frame classification, specs, nft rules) run anywhere. The rest builds real
network namespaces and is skipped unless this is root on Linux with ``ip netns`` and
``/dev/net/tun``: a 3-device LAN (veth lossless, veth + nft 20 % loss, shim 20 ms + 10 % loss)
checked for reachability, RTT, UDP loss per direction, multicast and cleanup.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from halo_p2p.errors import ConfigError, NetnsError
from halo_p2p.net.link import LinkConditions
from halo_p2p.testbed.netns import DeviceLink, NetnsLan, available, cleanup_stale
from halo_p2p.testbed.shim import ShimSpec, TapEnd, is_udp, nft_hub_ruleset, parse_nft_counters

PREFIX = f"ht{os.getpid() % 100000}"

RECV = r"""
import select, socket, sys
port, group = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("", port))
if group:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("0.0.0.0"))
print("ready", flush=True)
seen = set()
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready:  # the test closed our stdin: drain and report
        s.setblocking(False)
        try:
            while True:
                seen.add(s.recv(64))
        except BlockingIOError:
            pass
        print(len(seen), flush=True)
        break
    seen.add(s.recv(64))
"""

SEND = r"""
import socket, sys, time
dst, port, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
t0 = time.monotonic()
for i in range(n):
    s.sendto(b"%d" % i, (dst, port))
    ahead = t0 + (i + 1) / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
"""


# ---- pure parts ----------------------------------------------------------------------------------

def _frame(ethertype: int, payload: bytes) -> bytes:
    return b"\xff" * 6 + b"\x02" * 6 + ethertype.to_bytes(2, "big") + payload


def test_is_udp() -> None:
    ipv4 = bytearray(20)
    ipv4[0], ipv4[9] = 0x45, 17
    assert is_udp(_frame(0x0800, bytes(ipv4) + b"\0" * 8))
    ipv4[9] = 6  # TCP
    assert not is_udp(_frame(0x0800, bytes(ipv4) + b"\0" * 20))
    ipv4[9] = 2  # IGMP
    assert not is_udp(_frame(0x0800, bytes(ipv4) + b"\0" * 8))
    ipv6 = bytearray(40)
    ipv6[6] = 17
    assert is_udp(_frame(0x86DD, bytes(ipv6) + b"\0" * 8))
    assert not is_udp(_frame(0x0806, b"\0" * 28))  # ARP
    ipv4[9] = 17
    assert is_udp(_frame(0x8100, b"\0\x01\x08\x00" + bytes(ipv4) + b"\0" * 8))  # 802.1Q tagged
    assert not is_udp(b"\0" * 10)


def test_shim_spec_round_trip() -> None:
    spec = ShimSpec(prefix="x", device=TapEnd(tap="xt1d", netns="x-p1", name="lan0"),
                    hub=TapEnd(tap="xt1h", netns="x-hub", name="p1"), plr=0.1, delay_s=0.02, seed=3)
    assert ShimSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="bad shim spec"):
        ShimSpec.from_json('{"prefix": "x"}')


def test_nft_rules_and_counters() -> None:
    text = nft_hub_ruleset({"p1": 0.2})
    assert 'iifname "p1" meta l4proto udp numgen random mod 1000000 < 200000 counter drop' in text
    assert 'oifname "p1" meta l4proto udp numgen random mod 1000000 < 200000 counter drop' in text
    assert "hook prerouting" in text and "hook forward" in text

    def rule(key: str, packets: int, drop: bool) -> dict[str, object]:
        expr: list[dict[str, object]] = [
            {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": "p1"}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"counter": {"packets": packets, "bytes": 0}}]
        return {"rule": {"expr": [*expr, {"drop": None}] if drop else expr}}

    listing = json.dumps({"nftables": [{"metainfo": {}}, rule("iifname", 100, False), rule("iifname", 20, True),
                                       rule("oifname", 50, False), rule("oifname", 9, True)]})
    c = parse_nft_counters(listing)["p1"]
    assert (c["up"].udp, c["up"].dropped, c["down"].udp, c["down"].dropped) == (100, 20, 50, 9)
    assert c["up"].frames is None


def test_device_link_validation() -> None:
    assert DeviceLink().kind(nft=True) == "veth"
    assert DeviceLink(plr=0.1).kind(nft=True) == "veth+nft"
    assert DeviceLink(plr=0.1).kind(nft=False) == "shim"
    assert DeviceLink(delay_s=0.01).kind(nft=True) == "shim"
    assert DeviceLink(mode="shim").kind(nft=True) == "shim"
    with pytest.raises(NetnsError, match="needs nft"):
        DeviceLink(plr=0.1, mode="veth").kind(nft=False)
    with pytest.raises(ConfigError, match="plr"):
        DeviceLink(plr=1.5)
    with pytest.raises(ConfigError, match="mode"):
        DeviceLink(mode="netem")
    with pytest.raises(ConfigError, match="cannot delay"):
        DeviceLink(delay_s=0.01, mode="veth")
    cond = LinkConditions(plr=0.05, delay_s=0.005, jitter_s=0.01)
    assert DeviceLink.from_conditions(cond, seed=2) == DeviceLink(0.05, 0.005, 0.01, 2)
    with pytest.raises(ConfigError, match="prefix"):
        NetnsLan("Bad-Prefix", [DeviceLink()])
    with pytest.raises(ConfigError, match="devices"):
        NetnsLan("ok", [])


# ---- real namespaces -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools() -> None:
    """Skip unless namespaces work here; install ping and nft (apt) if they are missing.

    The LAN itself needs only iproute2; the tests measure RTT with ``ping`` (iputils-ping) and
    the veth loss needs ``nft`` (nftables). As root with apt-get, a missing one is installed
    (bounded to 5 minutes); otherwise the tests are skipped with the reason.
    """
    ok, reason = available()
    if not ok:
        pytest.skip(f"emulated LAN unavailable: {reason}")
    missing = [pkg for tool, pkg in (("ping", "iputils-ping"), ("nft", "nftables")) if shutil.which(tool) is None]
    if missing and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            try:
                subprocess.run(argv, capture_output=True, timeout=150, check=False, env=env)
            except subprocess.TimeoutExpired:
                break
    still = [pkg for tool, pkg in (("ping", "iputils-ping"), ("nft", "nftables")) if shutil.which(tool) is None]
    if still:
        pytest.skip(f"{', '.join(still)} missing and could not be installed (apt-get install {' '.join(still)})")


def _sh(*argv: str) -> str:
    """Run a command (blocking, bounded); return stdout; raise if it fails."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout


def _stray_shim(prefix: str) -> subprocess.Popen[bytes]:
    """A shim as a crashed run would leave it: between namespaces ``PREFIX-p0`` and ``PREFIX-hub``."""
    spec = ShimSpec(prefix=prefix, device=TapEnd(tap=f"{prefix}t0d", netns=f"{prefix}-p0", name="lan0"),
                    hub=TapEnd(tap=f"{prefix}t0h", netns=f"{prefix}-hub", name="p0"))
    argv = [sys.executable, "-m", "halo_p2p.testbed.shim", "--spec", spec.to_json(), "--prefix", prefix]
    shim = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert shim.stdout is not None and b"ready" in shim.stdout.readline()
    return shim


def _leftovers(prefix: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    found = [n for n in names if n.startswith(f"{prefix}-")]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"halo_p2p.testbed.shim" in args and prefix.encode() in args:
            found.append(f"shim pid {cmdline.parent.name}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
    found += re.findall(rf"\d+: ({prefix}t\d+[dh])", links)
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lan(tools: None) -> AsyncIterator[NetnsLan]:
    devices = [DeviceLink(), DeviceLink(plr=0.2), DeviceLink(plr=0.1, delay_s=0.02, seed=7)]
    try:
        async with NetnsLan(PREFIX, devices) as net:
            yield net
        assert _leftovers(PREFIX) == []
    finally:
        cleanup_stale(PREFIX)


async def _ping(net: NetnsLan, i: int, count: int = 5) -> list[float]:
    proc = await net.spawn(i, ["ping", "-n", "-c", str(count), "-i", "0.2", net.address(0)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (out, err)
    return [float(t) for t in re.findall(r"time=([0-9.]+) ms", out.decode())]


async def _udp(net: NetnsLan, src: int, dst: int, port: int, n: int, rate: float, group: str = "") -> int:
    """Send ``n`` datagrams from device ``src`` to ``dst`` (or to ``group``) at ``rate``/s; return how many arrived."""
    recv = await net.spawn(dst, [sys.executable, "-c", RECV, str(port), group], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    assert recv.stdin is not None and recv.stdout is not None
    assert await asyncio.wait_for(recv.stdout.readline(), 15) == b"ready\n"
    if group:
        igmp = await asyncio.to_thread(_sh, *net.exec_argv(dst, ["cat", "/proc/net/igmp"]))
        assert re.search(r"lan0[\s\S]*FB0000E0", igmp), igmp  # 224.0.0.251 joined on lan0
    target = group or net.address(dst)
    send = await net.spawn(src, [sys.executable, "-c", SEND, target, str(port), str(n), str(rate)],
                           stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(send.communicate(), 60)
    assert send.returncode == 0, err.decode()
    await asyncio.sleep(0.3)  # let the delayed frames land
    recv.stdin.close()
    out = await asyncio.wait_for(recv.stdout.read(), 15)
    await recv.wait()
    return int(out.split()[-1])


def _within(received: int, n: int, plr: float) -> bool:
    """``received`` is within 5 binomial standard deviations (+2) of ``n * (1 - plr)``."""
    return abs(received - n * (1 - plr)) <= 5 * math.sqrt(n * plr * (1 - plr)) + 2


@pytest.mark.netns
@pytest.mark.asyncio(loop_scope="module")
async def test_topology_and_reachability(lan: NetnsLan) -> None:
    assert [lan.kind(i) for i in range(3)] == ["veth", "veth+nft", "shim"]
    assert [lan.address(i) for i in range(3)] == ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
    for i in range(3):
        show = await asyncio.to_thread(_sh, *lan.exec_argv(i, ["ip", "-o", "link", "show", "lan0"]))
        assert "MULTICAST" in show and "UP" in show, show
    rtts = await asyncio.gather(*(_ping(lan, i) for i in range(3)))
    assert all(len(r) == 5 for r in rtts)
    assert max(rtts[1]) < 5, "veth + nft adds no delay (ICMP is never dropped)"
    shim = rtts[2]
    assert min(shim) >= 40 and sum(shim) / len(shim) < 80, shim  # 20 ms each way


@pytest.mark.netns
@pytest.mark.asyncio(loop_scope="module")
async def test_udp_loss_matches_plr_each_direction(lan: NetnsLan) -> None:
    n, rate = 2000, 2500.0
    for dev, plr in ((1, 0.2), (2, 0.1)):
        before = (await lan.counters())[dev]
        up, down = await asyncio.gather(_udp(lan, dev, 0, 50100 + dev, n, rate),
                                        _udp(lan, 0, dev, 50200 + dev, n, rate))
        after = (await lan.counters())[dev]
        for received in (up, down):
            assert _within(received, n, plr), (dev, received, n * (1 - plr))
        assert before.up is not None and after.up is not None and before.down is not None and after.down is not None
        # the link's own counters account for every missing datagram (no other drops on the way)
        assert abs((after.up.dropped - before.up.dropped) - (n - up)) <= 3, (after.up, up)
        assert abs((after.down.dropped - before.down.dropped) - (n - down)) <= 3, (after.down, down)
        assert after.up.udp - before.up.udp >= n


@pytest.mark.netns
@pytest.mark.asyncio(loop_scope="module")
async def test_multicast_reaches_other_device(lan: NetnsLan) -> None:
    # device 1 (nft 20 % loss) to device 2 (shim, 10 % loss, 20 ms) on the mDNS group, another port
    n = 60
    received = await _udp(lan, 1, 2, 50000, n, 200.0, group="224.0.0.251")
    assert received >= n * 0.8 * 0.9 - 5 * math.sqrt(n * 0.28 * 0.72), received


@pytest.mark.netns
@pytest.mark.asyncio(loop_scope="module")
async def test_cleanup_after_error_and_stale(tools: None) -> None:
    prefix = f"{PREFIX}c"
    try:
        with pytest.raises(RuntimeError, match="boom"):
            async with NetnsLan(prefix, [DeviceLink(), DeviceLink(delay_s=0.001)]) as net:
                assert net.kind(1) == "shim"
                sleeper = await net.spawn(1, ["sleep", "30"])
                raise RuntimeError("boom")
        assert sleeper.returncode is not None
        assert _leftovers(prefix) == []
        assert 1 in net.shim_summaries and '"up"' in net.shim_summaries[1]

        # leftovers of a "crashed" run: namespaces, a running shim, a TAP in the root namespace
        for ns in (f"{prefix}-hub", f"{prefix}-p0"):
            await asyncio.to_thread(_sh, "ip", "netns", "add", ns)
        shim = await asyncio.to_thread(_stray_shim, prefix)
        await asyncio.to_thread(_sh, "ip", "tuntap", "add", "name", f"{prefix}t9h", "mode", "tap")
        with pytest.raises(NetnsError, match="already exist"):
            async with NetnsLan(prefix, [DeviceLink()]):
                pass
        removed = cleanup_stale(prefix)
        assert f"shim pid {shim.pid}" in removed and f"netns {prefix}-hub" in removed
        assert f"link {prefix}t9h" in removed
        assert shim.wait(timeout=10) == 0
        assert b'"shim"' in shim.communicate(timeout=10)[1]
        assert _leftovers(prefix) == []
        async with NetnsLan(prefix, [DeviceLink()], replace_stale=True) as net:
            assert net.ns(0) == f"{prefix}-p0"
        assert _leftovers(prefix) == []
    finally:
        cleanup_stale(prefix)
