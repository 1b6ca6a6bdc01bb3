"""Real peers: `halo-peer join` processes, real zeroconf and aiortc, on loopback and in namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from halo_p2p.testbed.netns import DeviceLink, NetnsLan

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


def _peer_env(env: dict[str, str], tmp: Path, name: str) -> dict[str, str]:
    cfg = tmp / f"cfg-{name}"          # each device keeps its own peer id
    return {**env, "XDG_CONFIG_HOME": str(cfg)}


def _wait_joined(proc: subprocess.Popen[str], timeout_s: float = 60) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        proc.kill()
        raise AssertionError(f"peer did not join in {timeout_s} s: {proc.stderr.read() if proc.stderr else ''}")
    line = proc.stdout.readline()
    assert line.startswith("halo-peer: joined as"), line
    return line


@pytest.fixture(scope="module")
def loopback_swarm(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    tmp = tmp_path_factory.mktemp("peers")
    procs = [subprocess.Popen([sys.executable, "-m", "halo_p2p", "join", "--model", "smollm2-135m-instruct",
                               "--name", f"peer{i}", "--interface", "lo", "--no-ui"],
                              env=_peer_env(env, tmp, f"p{i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    try:
        yield [_wait_joined(p) for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _halo(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "halo_p2p", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_peers_discover_each_other_on_loopback(env, loopback_swarm, tmp_path) -> None:
    out = _halo(_peer_env(env, tmp_path, "observer"), "peers", "--interface", "lo", "--json", "--wait", "3")
    assert out.returncode == 0, out.stderr
    names = sorted(p["name"] for p in json.loads(out.stdout))
    assert names == ["peer0", "peer1", "peer2"]


def test_strict_swarm_generation_equals_local(env, loopback_swarm, tmp_path) -> None:
    args = ("generate", "--model", "smollm2-135m-instruct", "--chat", "--prompt", QUESTION, "--temperature", "0",
            "--max-tokens", "12", "--json")
    local = _halo(env, *args, "--local")
    swarm = _halo(_peer_env(env, tmp_path, "coordinator"), *args, "--sync", "strict", "--interface", "lo",
                  "--wire-dtype", "float32", "--planner", "split")
    assert local.returncode == 0, local.stderr
    assert swarm.returncode == 0, swarm.stderr
    want, got = json.loads(local.stdout), json.loads(swarm.stdout)
    assert "Paris" in want["text"]
    assert got["token_ids"] == want["token_ids"]
    assert got["split"]["peers"] == 4            # the coordinator and the three joined peers


async def netns_run(env: dict[str, str], tmp: Path, plr: float, modes: tuple[str, ...] = ("strict", "halo"),
                    planner: str = "split", tokens: int = 10, wire_dtype: str = "q8_0") -> dict[str, dict]:
    """3 devices on an emulated LAN (device 2's link lossy); join on each, prompts from device 0."""
    devices = [DeviceLink(0, 0.001, 0, seed=1), DeviceLink(0, 0.001, 0, seed=2), DeviceLink(plr, 0.001, 0, seed=3)]
    results = {}
    async with NetnsLan(f"hi{os.getpid() % 10000}", devices, replace_stale=True) as lan:
        procs = []
        for i in range(3):
            procs.append(await lan.spawn(i, [sys.executable, "-m", "halo_p2p", "join", "--model",
                                             "smollm2-135m-instruct", "--name", f"dev{i}", "--address", lan.address(i),
                                             "--no-ui"], env=_peer_env(env, tmp, f"ns{i}"),
                                         stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL))
        for p in procs:
            line = await asyncio.wait_for(p.stdout.readline(), 90)
            assert line.startswith(b"halo-peer: joined as"), line
        for mode in modes:
            proc = await lan.spawn(0, [sys.executable, "-m", "halo_p2p", "generate", "--model",
                                       "smollm2-135m-instruct", "--chat", "--prompt", QUESTION, "--temperature", "0",
                                       "--max-tokens", str(tokens), "--json", "--sync", mode, "--planner", planner,
                                       "--address", lan.address(0), "--wait-peers", "60", "--wire-dtype", wire_dtype,
                                       "--max-peers", "3"],   # returns once all 3 are seen
                                   env=_peer_env(env, tmp, f"coord-{mode}"), stdout=asyncio.subprocess.PIPE,
                                   stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 600)
            assert proc.returncode == 0, err.decode()
            results[mode] = json.loads(out)
    return results
