"""Peer profiles and swarm files (halo_p2p.profiles): the shipped files load, bad input names the fix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from halo_p2p.errors import ConfigError
from halo_p2p.net.link import LinkConditions
from halo_p2p.profiles import (
    PeerProfile,
    available_profiles,
    load_profile,
    load_swarm,
    parse_bytes,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["lan", "rpi4", "rpi5", "flaky-wifi", "slow-laptop"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load(name: str) -> None:
    spec = load_profile(name)
    assert spec.name == name
    assert spec.slowdown > 0
    assert spec.description
    assert isinstance(spec.link, LinkConditions)
    text = (REPO / "peers" / f"{name}.toml").read_text()
    assert text.startswith("#"), "each profile starts with a comment header"


def test_shipped_values() -> None:
    assert set(SHIPPED) <= set(available_profiles())
    assert "example" not in available_profiles() and "example.swarm" not in available_profiles()
    rpi4 = load_profile("rpi4")
    assert (rpi4.threads, rpi4.memory_budget_bytes, rpi4.slowdown) == (4, 3 << 30, 4.0)
    assert load_profile("rpi5").slowdown < rpi4.slowdown
    wifi = load_profile("flaky-wifi").link
    assert (wifi.plr, wifi.delay_s, wifi.jitter_s) == (0.05, 0.005, 0.01)
    lan = load_profile("lan")
    assert (lan.link, lan.threads, lan.share) == (LinkConditions(), None, None)


def test_load_by_path_and_default_name(tmp_path: Path) -> None:
    p = tmp_path / "mybox.toml"
    p.write_text('threads = 2\nmemory_budget = "512MiB"\nshare = 0.5\nplr = 0.1\ndelay_ms = 3\n')
    spec = load_profile(p)
    assert spec == PeerProfile(name="mybox", threads=2, memory_budget_bytes=512 << 20, share=0.5,
                               link=LinkConditions(plr=0.1, delay_s=0.003), profile=str(p))
    assert load_profile(str(p)).name == "mybox"
    assert load_profile("rpi4.toml").name == "rpi4"
    assert spec.link.delay_s == pytest.approx(0.003)


@pytest.mark.parametrize(("text", "needles"), [
    ("thread = 2\n", ["'thread'", "unknown key", "threads"]),
    ("threads = 0\n", ["threads = 0", "integer >= 1"]),
    ("threads = true\n", ["threads = True"]),
    ("plr = 1.5\n", ["plr = 1.5", "[0, 1]"]),
    ('plr = "5%"\n', ["plr = '5%'"]),
    ("delay_ms = -1\n", ["delay_ms = -1"]),
    ("compute_slowdown = 0\n", ["compute_slowdown = 0", "> 0"]),
    ('memory_budget = "lots"\n', ["memory_budget = 'lots'", "3GiB"]),
    ('name = "bad name!"\n', ["name = 'bad name!'"]),
    ("plr = 0.1\nplr = 0.2\n", ["not valid TOML"]),
])
def test_bad_profile_names_file_key_and_fix(tmp_path: Path, text: str, needles: list[str]) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(p)
    msg = str(info.value)
    assert str(p) in msg
    for needle in needles:
        assert needle in msg, msg
    assert info.value.fix


def test_unknown_profile_name_lists_known() -> None:
    with pytest.raises(ConfigError, match="unknown peer profile 'rpi9'") as info:
        load_profile("rpi9")
    assert "rpi4" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile("no/such/file.toml")


def test_parse_bytes() -> None:
    assert parse_bytes(1024) == 1024
    assert parse_bytes("3GiB") == 3 << 30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    for bad in (0, -1, "x", "3 parsecs", "0.1", True, 1.5):
        with pytest.raises(ConfigError, match=r"is not a size \(use a positive whole number of bytes"):
            parse_bytes(bad)


def test_swarm_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "local.toml").write_text("compute_slowdown = 2.5\nthreads = 1\n")
    swarm = tmp_path / "s.swarm.toml"
    swarm.write_text("""
description = "test"
[[peer]]
name = "host"
[[peer]]
name = "pi-a"
profile = "rpi4"
plr = 0.05
[[peer]]
name = "pi-b"
profile = "rpi4"
delay_ms = 20
jitter_ms = 1
share = 2
[[peer]]
name = "mine"
profile = "local.toml"
[[peer]]
name = "beside"
profile = "local"
""")
    peers = load_swarm(swarm)
    assert [p.name for p in peers] == ["host", "pi-a", "pi-b", "mine", "beside"]
    assert peers[0] == PeerProfile(name="host")
    rpi4 = load_profile("rpi4")
    assert peers[1].link.plr == 0.05 and peers[1].slowdown == rpi4.slowdown
    assert peers[1].profile == "rpi4" and peers[1].threads == 4
    link = peers[2].link
    assert (link.delay_s, link.jitter_s, peers[2].share, link.plr) == (0.02, 0.001, 2.0, 0.0)
    assert peers[3].slowdown == 2.5 and peers[3].threads == 1
    assert peers[4].slowdown == 2.5


def test_shipped_example_swarm() -> None:
    peers = load_swarm(REPO / "peers" / "example.swarm.toml")
    assert len(peers) == 4 and peers[0].name == "host"
    assert peers[3].link.delay_s == pytest.approx(0.005)


@pytest.mark.parametrize(("text", "needles"), [
    ("", ["no [[peer]] tables"]),
    ("[[peer]]\nprofile = 'lan'\n", ["peer #1 has no name"]),
    ("[[peer]]\nname = 'a'\n[[peer]]\nname = 'a'\n", ["peer 'a'", "used twice"]),
    ("[[peer]]\nname = 'a'\nprofile = 'rpi9'\n", ["peer 'a'", "unknown peer profile 'rpi9'"]),
    ("[[peer]]\nname = 'a'\nprofile = 3\n", ["peer 'a'", "profile = 3"]),
    ("[[peer]]\nname = 'a'\nloss = 0.1\n", ["peer 'a'", "unknown key 'loss'", "plr"]),
    ("[[peer]]\nname = 'a'\nplr = 2\n", ["peer 'a'", "plr = 2"]),
    ("seed = 1\n[[peer]]\nname = 'a'\n", ["unknown top-level key 'seed'"]),
])
def test_bad_swarm(tmp_path: Path, text: str, needles: list[str]) -> None:
    p = tmp_path / "bad.swarm.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_swarm(p)
    msg = str(info.value)
    assert str(p) in msg
    for needle in needles:
        assert needle in msg, msg


def test_a_compute_slowdown_below_one_is_a_config_error() -> None:
    from halo_p2p.engine.compute import ComputeThread

    with pytest.raises(ConfigError, match=r"compute slowdown 0.5 is below 1 \(emulate a device"):
        ComputeThread(slowdown=0.5)


@pytest.mark.parametrize("loader", [load_profile, load_swarm], ids=["profile", "swarm"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, loader: Callable[[str], object]) -> None:
    import threading

    fifo = tmp_path / "peer.toml"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def load() -> None:
        try:
            outcome.append(loader(str(fifo)))
        except BaseException as exc:     # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)                       # guards a hang: a blocking open() never returns without a writer
    if reader.is_alive():
        with open(fifo, "wb"):
            pass
        pytest.fail(f"{loader} blocked on a FIFO")
    (result,) = outcome
    assert isinstance(result, ConfigError) and "is not a regular file" in str(result), result
