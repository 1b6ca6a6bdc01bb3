"""The CLI's edge (issue #12, items 8-10): every value checked before anything starts, key files
opened without blocking, a corrupt key always an error, ``swarm`` stopping its peers on SIGTERM and
SIGINT without a secret on any command line, and notices of conditions the plan leaves without effect."""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halo_p2p.cli.main import build_parser, main
from halo_p2p.cli.notices import flag_notices, plan_notices
from halo_p2p.cli.peers import offers_caption
from halo_p2p.groups import GroupLayout
from halo_p2p.net.swarmkey import ENV_VAR, generate_swarm_key, save_swarm_key
from halo_p2p.plan import PlacementPlan
from tests.test_groups_plan import SMOLLM2


def _env(config: Path) -> dict[str, str]:
    """This environment without a swarm key, with its own config folder (where the key file would be)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["XDG_CONFIG_HOME"] = str(config)
    return env


def _halo(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "halo_p2p", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def _one_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("halo-peer: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- every value at the edge -------------------------------------------------------------------

REPORTED = [       # the cases of the issue: tracebacks or silently accepted
    (("generate", "--prompt", "x", "--temperature", "nan"), "--temperature"),
    (("generate", "--prompt", "x", "--seed", "-1"), "--seed"),
    (("generate", "--prompt", "x", "--critical-fraction", "5"), "--critical-fraction"),
    (("join", "--port", "99999"), "--port"),
    (("join", "--emulate-plr", "5"), "--emulate-plr"),
    (("generate", "--prompt", "x", "--mlp-group-size", "0"), "--mlp-group-size"),
    (("generate", "--prompt", "x", "--max-peers", "-1"), "--max-peers"),
]


@pytest.mark.parametrize(("argv", "flag"), REPORTED, ids=[" ".join(a) for a, _ in REPORTED])
def test_reported_bad_values_are_one_line_usage_errors(argv: tuple[str, ...], flag: str, tmp_path: Path) -> None:
    out = _halo(*argv, env=_env(tmp_path), timeout=60)
    assert out.returncode == 2, (out.returncode, out.stderr)
    _one_line(out.stderr, f"argument {flag}: ", "(use ")


GEN, PPL, CHAT = ("generate", "--prompt", "x"), ("perplexity", "--text-file", "t.txt"), ("chat", "--prompt", "x")
SAMPLING = [("--max-tokens", "0"), ("--max-tokens", "x"), ("--temperature", "nan"), ("--temperature", "-1"),
            ("--temperature", "inf"), ("--top-p", "0"), ("--top-p", "1.5"), ("--seed", "-1"), ("--seed", "1.5")]
MODEL = [("--ctx", "1"), ("--ctx", "abc"), ("--dtype", "int8")]
SPLIT = [("--emulate-peers", "-1"), ("--emulate-peers", "65"), ("--sync", "fast"), ("--plr", "1"),
         ("--plr", "-0.1"), ("--plr", "nan"), ("--lossy-peers", "-1"), ("--delay-ms", "-1"), ("--delay-ms", "inf"),
         ("--delay-ms", "1e300"), ("--jitter-ms", "nan"), ("--rto-ms", "0"), ("--rto-ms", "1e9"),
         ("--shares", "1,-1"), ("--shares", "a,b"), ("--shares", "0,0"), ("--wire-dtype", "int4"),
         ("--critical-fraction", "-0.1"), ("--critical-fraction", "5"), ("--mlp-group-size", "0"),
         ("--mlp-group-size", "-4"), ("--link-seed", "-1"), ("--planner", "random")]
NETWORK = [("--swarm-key", "short"), ("--address", "1.2.3"), ("--address", "::1"), ("--peer", "nohost"),
           ("--peer", "host:70000")]
SWARM = [("--wait-peers", "-1"), ("--wait-peers", "nan"), ("--max-peers", "-1"), ("--max-peers", "0")]
CASES = (
    [(c, f, v) for c in (GEN, CHAT) for f, v in SAMPLING]
    + [(c, f, v) for c in (GEN, PPL, CHAT, ("calibrate", "--text-file", "t.txt"), ("bench",)) for f, v in MODEL]
    + [(c, f, v) for c in (GEN, PPL, CHAT) for f, v in SPLIT + NETWORK + SWARM]
    + [(c, f, v) for c in (("join",), ("peers",)) for f, v in NETWORK]
    + [(PPL, "--chunk-tokens", "0"), (("calibrate", "--text-file", "t.txt"), "--rank", "0"),
       (("calibrate", "--text-file", "t.txt"), "--max-tokens", "10")]
    + [(("join",), f, v) for f, v in [("--port", "99999"), ("--port", "-1"), ("--port", "http"),
                                      ("--emulate-plr", "5"), ("--emulate-plr", "1"), ("--name", ""),
                                      ("--name", "a\tb"), ("--peer-id", "bad id"), ("--peer-id", "x" * 49)]]
    + [(("peers",), f, v) for f, v in [("--wait", "-1"), ("--wait", "inf"), ("--peer-id", "x.y")]]
    + [(("swarm",), f, v) for f, v in [("--peers", "0"), ("--peers", "1000"), ("--plr", "1"), ("--lossy-peers", "-1"),
                                       ("--delay-ms", "-1"), ("--jitter-ms", "nan"), ("--duration", "0"),
                                       ("--duration", "inf")]]
    + [(("bench",), f, "0") for f in ("--prompt-tokens", "--tokens", "--repeat")]
)


@pytest.mark.parametrize(("command", "flag", "value"), CASES,
                         ids=[f"{c[0]} {f} {v}" for c, f, v in CASES])
def test_every_option_refuses_a_bad_value_in_one_line(command: tuple[str, ...], flag: str, value: str,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main([*command, flag, value])
    assert info.value.code == 2
    _one_line(capsys.readouterr().err, f"argument {flag}: ")


CROSS = [
    (("generate", "--prompt", "x", "--emulate-peers", "3", "--lossy-peers", "3"), "--lossy-peers 3 is more than"),
    (("generate", "--prompt", "x", "--emulate-peers", "3", "--shares", "1,2"), "--shares has 2 values for 3 peers"),
    (("swarm", "--peers", "2", "--lossy-peers", "3"), "--lossy-peers 3 is more than the 2 peer(s)"),
    (("generate",), "the following arguments are required: --prompt"),
]


@pytest.mark.parametrize(("argv", "needle"), CROSS, ids=[" ".join(a) for a, _ in CROSS])
def test_flags_that_cannot_hold_together_are_usage_errors(argv: tuple[str, ...], needle: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    _one_line(capsys.readouterr().err, needle)


def test_a_bad_swarm_key_flag_is_never_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    secret = generate_swarm_key()[:-1] + "!"          # 43 characters, one of them not base64url
    with pytest.raises(SystemExit):
        main(["peers", f"--swarm-key={secret}"])        # "=": a base64url key may start with "-"
    err = capsys.readouterr().err
    _one_line(err, "malformed swarm key in --swarm-key (43 characters)")
    assert secret not in err and secret[:20] not in err


FREE_TEXT = {"model", "tokenizer", "prompt", "system", "text_file", "interface", "profile", "swarm_file", "name"}
"""Options whose value is any text (checked when used: a file, a model name, an interface)."""


def test_every_option_with_a_value_has_a_check() -> None:
    """A new flag needs a converter from cli/checks.py (or choices), or a place in FREE_TEXT."""
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")
    unchecked = []
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            if action.type is None and action.choices is None and action.dest not in FREE_TEXT:
                unchecked.append(f"{command} {'/'.join(action.option_strings) or action.dest}")
            if command != "pull" and action.dest == "name" and action.option_strings:
                assert action.type is not None, f"{command} --name"
    assert not unchecked, unchecked


# --- key files ---------------------------------------------------------------------------------

def _key_file(config: Path) -> Path:
    path = config / "halo-p2p" / "swarm.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_fifo_as_key_file_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(_key_file(tmp_path), 0o600)
    out = _halo("peers", "--interface", "lo", "--wait", "0", env=_env(tmp_path), timeout=60)
    assert out.returncode == 1, out.stderr
    _one_line(out.stderr, "is not a regular file")


@pytest.mark.parametrize("fault", ["corrupt", "readable by others"])
def test_a_bad_key_file_is_an_error_under_generate(fault: str, tmp_path: Path) -> None:
    """Only a missing key means "no swarm, run here": a bad one is an error, as for join and peers."""
    path = _key_file(tmp_path)
    if fault == "corrupt":
        path.write_text("this is not a swarm key\n")
        path.chmod(0o600)
        needle = "malformed swarm key"
    else:
        save_swarm_key(generate_swarm_key(), path, force=True)
        path.chmod(0o644)
        needle = "readable by group or others"
    env = _env(tmp_path)
    for argv in (("generate", "--prompt", "Once", "--max-tokens", "2"), ("join",), ("peers", "--wait", "0")):
        out = _halo(*argv, "--interface", "lo", env=env, timeout=120)
        assert out.returncode == 1, (argv, out.stderr)
        _one_line(out.stderr, needle)
    path.unlink()
    out = _halo("generate", "--prompt", "Once", "--max-tokens", "2", env=env)  # no key at all: runs here
    assert out.returncode == 0, out.stderr


# --- notices: requested conditions without effect ----------------------------------------------

def _args(**kw: object) -> argparse.Namespace:
    base = {"emulate_peers": 3, "plr": 0.0, "lossy_peers": None, "delay_ms": 0.0, "jitter_ms": 0.0, "shares": None,
            "link_seed": 0, "planner": "schedule", "sync": "halo", "critical_fraction": 0.5}
    return argparse.Namespace(**{**base, **kw})


def _plan(shares: list[float]) -> PlacementPlan:
    peers = ["coordinator"] + [f"worker{i}" for i in range(1, len(shares))]
    return PlacementPlan.split(GroupLayout.from_config(SMOLLM2), peers, shares=shares)


def test_plan_notices_name_idle_workers_and_lossy_links_that_carry_nothing() -> None:
    (line,) = plan_notices(_plan([1, 0, 0]), _args(plr=0.05, delay_ms=2.0), emulated=True)
    assert line.startswith("--emulate-peers 3 --plr 0.05 --delay-ms 2: the plan runs every group on the coordinator")
    assert "--planner split" in line
    (line,) = plan_notices(_plan([1, 1, 0]), _args(plr=0.05, lossy_peers=1), emulated=True)
    assert line.startswith("--plr 0.05 has no effect: the plan gives no group to the lossy worker(s) worker2")
    assert plan_notices(_plan([1, 1, 0]), _args(plr=0.05), emulated=True) == []    # worker1 is lossy and busy
    assert plan_notices(_plan([1, 1, 1]), _args(plr=0.05), emulated=True) == []
    (line,) = plan_notices(_plan([1, 0]), _args(emulate_peers=0, planner="split"), emulated=False)
    assert "1 peer(s) found: the plan runs every group on the coordinator" in line


def test_flag_notices_name_flags_without_effect() -> None:
    assert flag_notices(_args(emulate_peers=0, plr=0.1, delay_ms=3.0)) == [
        "--plr, --delay-ms only apply to an emulated split (--emulate-peers N): ignored"]
    assert flag_notices(_args(emulate_peers=1, plr=0.1)) == ["--plr 0.1 has no effect: it has no workers"]
    assert flag_notices(_args(plr=0.1, lossy_peers=0)) == ["--plr 0.1 has no effect: --lossy-peers 0 picks no worker"]
    assert flag_notices(_args(sync="strict", critical_fraction=0.25)) == [
        "--critical-fraction only applies to --sync halo: ignored with --sync strict"]
    assert flag_notices(_args(plr=0.1)) == []


def test_generate_says_when_the_loss_has_no_effect(tmp_path: Path) -> None:
    """A share of 0 leaves the one lossy worker idle: said on stderr and in --json; a split that
    gives the lossy workers groups says nothing."""
    common = ("generate", "--prompt", "Once upon a time", "--max-tokens", "4", "--temperature", "0", "--json")
    out = _halo(*common, "--emulate-peers", "2", "--shares", "1,0", "--plr", "0.1", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if line.startswith("halo-peer: warning: ")]
    assert len(warned) == 1 and "every group on the coordinator" in warned[0], out.stderr
    assert json.loads(out.stdout)["warnings"] == [warned[0].removeprefix("halo-peer: warning: ")]
    out = _halo(*common, "--emulate-peers", "3", "--planner", "split", "--plr", "0.2", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr and json.loads(out.stdout)["warnings"] == []


def test_the_offers_footer_is_words_not_a_dict() -> None:
    assert offers_caption({"peer_connections": 1, "accepted": 1}) == "offers: 1 accepted, 0 refused"
    assert offers_caption({"accepted": 2, "refused_bad_mac": 3, "refused_busy": 1, "failed": 1}) == \
        "offers: 2 accepted, 4 refused (bad-mac 3, busy 1), 1 failed"


# --- halo-peer swarm: stopped by SIGTERM or SIGINT, no key on a command line --------------------

def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run_swarm_and_stop(tmp_path: Path, sig: signal.Signals, *extra: str) -> tuple[list[int], str, str]:
    """Start ``halo-peer swarm`` (2 stories260K peers), check the joins' command lines, send ``sig``.

    Returns:
        The joins' pids, the swarm's stdout and its stderr (after it exited).
    """
    proc = subprocess.Popen([sys.executable, "-m", "halo_p2p", "swarm", "--peers", "2", "--model", "stories260K",
                             *extra], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    joins: list[int] = []
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()        # read the pipe itself: a TextIOWrapper's buffer would hide lines from select
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        shown = ""
        deadline = time.monotonic() + 240
        while "stops the swarm" not in " ".join(shown.split()):
            assert time.monotonic() < deadline and proc.poll() is None, shown
            if sel.select(5):
                shown += os.read(fd, 65536).decode()
        joins = [p for p in _children(proc.pid)
                 if b"join" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
        assert len(joins) == 2, shown
        for pid in joins:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
            key = env[ENV_VAR.encode()]
            assert len(key) == 43 and key not in argv and b"--swarm-key" not in argv, argv
            assert key.decode() not in shown                # not printed either (the hint reads a 0600 file)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=90)
        return joins, shown + out, err
    finally:
        if proc.poll() is None:                              # a failed test: let it clean up, then insist
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in joins:                                    # a failed test leaves nothing behind either
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_swarm_on_loopback_stops_its_joins_on_a_signal(sig: signal.Signals, tmp_path: Path) -> None:
    joins, _, err = _run_swarm_and_stop(tmp_path, sig, "--loopback")
    assert [p for p in joins if _alive(p)] == [], err
    assert err.strip().splitlines()[-1] == ("halo-peer: terminated" if sig == signal.SIGTERM
                                            else "halo-peer: interrupted"), err


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(600)
def test_swarm_in_namespaces_stops_its_joins_and_deletes_its_namespaces_on_sigterm(tmp_path: Path) -> None:
    from halo_p2p.testbed.netns import available

    ok, why = available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    joins, _, err = _run_swarm_and_stop(tmp_path, signal.SIGTERM)
    assert [p for p in joins if _alive(p)] == [], err
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    assert [n for n in after if n.startswith("hs") and n not in before] == [], after
