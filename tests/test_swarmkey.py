"""Swarm key: format, file mode and permission check, precedence, HMAC, replay guard."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from halo_p2p.errors import ConfigError
from halo_p2p.net.swarmkey import (
    ENV_VAR,
    ReplayGuard,
    generate_swarm_key,
    load_swarm_key,
    parse_swarm_key,
    save_swarm_key,
    sign,
    verify,
)


def test_generated_keys_are_43_urlsafe_chars_of_32_random_bytes() -> None:
    keys = {generate_swarm_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert len(key) == 43 and set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        raw = parse_swarm_key(key, source="test")
        assert len(raw) == 32 and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == key


def test_parse_accepts_hex_padding_and_whitespace_and_refuses_the_rest() -> None:
    raw = bytes(range(32))
    assert parse_swarm_key(raw.hex(), source="x") == raw
    assert parse_swarm_key(" " + base64.urlsafe_b64encode(raw).decode() + "\n", source="x") == raw  # 44 with '='
    for bad in ["", "abc", "zz" * 32, "A" * 42, "A" * 45, "+" * 43, "é" * 43, raw.hex()[:-1]]:
        with pytest.raises(ConfigError, match="malformed swarm key in here") as info:
            parse_swarm_key(bad, source="here")
        assert bad not in info.value.problem or bad == ""   # the key text is never echoed


def test_save_writes_mode_0600_atomically_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "config" / "swarm.key"
    key = generate_swarm_key()
    save_swarm_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == key + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["swarm.key"]   # no temporary left over
    other = generate_swarm_key()
    with pytest.raises(ConfigError, match="already exists") as info:
        save_swarm_key(other, path)
    assert "--force" in str(info.value) and path.read_text() == key + "\n"
    save_swarm_key(other, path, force=True)
    assert path.read_text() == other + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="malformed"):
        save_swarm_key("nope", tmp_path / "k2")
    assert not (tmp_path / "k2").exists()


def test_save_works_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        save_swarm_key(generate_swarm_key(), tmp_path / "swarm.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "swarm.key").stat().st_mode) == 0o600


def test_load_refuses_a_key_file_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    save_swarm_key(generate_swarm_key(), path)
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(ConfigError) as info:
            load_swarm_key(explicit=None, env={}, path=path)
        assert str(path) in info.value.problem and info.value.fix == f"run: chmod 600 {path}"
    path.chmod(0o600)
    assert len(load_swarm_key(explicit=None, env={}, path=path)) == 32
    path.chmod(0o400)
    assert len(load_swarm_key(explicit=None, env={}, path=path)) == 32


def test_load_precedence_explicit_then_env_then_file(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    k_file, k_env, k_flag = (generate_swarm_key() for _ in range(3))
    save_swarm_key(k_file, path)

    def raw(k: str) -> bytes:
        return parse_swarm_key(k, source="t")

    assert load_swarm_key(explicit=k_flag, env={ENV_VAR: k_env}, path=path) == raw(k_flag)
    assert load_swarm_key(explicit=None, env={ENV_VAR: k_env}, path=path) == raw(k_env)
    assert load_swarm_key(explicit=None, env={ENV_VAR: ""}, path=path) == raw(k_file)   # empty = unset
    assert load_swarm_key(explicit=None, env={}, path=path) == raw(k_file)
    with pytest.raises(ConfigError, match=r"malformed swarm key in \$HALO_SWARM_KEY"):
        load_swarm_key(explicit=None, env={ENV_VAR: "short"}, path=path)
    with pytest.raises(ConfigError, match="malformed swarm key in --swarm-key"):
        load_swarm_key(explicit="short", env={}, path=path)


def test_load_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_swarm_key(explicit=None, env={}, path=tmp_path / "absent.key")
    assert info.value.problem == "no swarm key"
    assert info.value.fix == ("run: halo-peer init (then copy ~/.config/halo-p2p/swarm.key to every device), "
                              "or pass --swarm-key")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\xff\xfe garbage")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match=f"malformed swarm key in {bad}"):
        load_swarm_key(explicit=None, env={}, path=bad)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_swarm_key(explicit=None, env={}, path=tmp_path)


def test_hmac_sign_and_verify() -> None:
    key, other = bytes(32), bytes([1]) * 32
    mac = sign(key, b"payload")
    assert len(mac) == 64 and mac == mac.lower()
    # RFC 4231 test case 2 (HMAC-SHA256, key "Jefe")
    assert sign(b"Jefe", b"what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert verify(key, b"payload", mac) and verify(key, b"payload", mac.upper())
    assert not verify(other, b"payload", mac)
    assert not verify(key, b"payload!", mac)
    assert not verify(key, b"payload", mac[:-1]) and not verify(key, b"payload", "") \
        and not verify(key, b"payload", "é" * 64)


def test_replay_guard_accepts_once_and_within_the_window() -> None:
    guard = ReplayGuard(window_s=30)
    now = 1_000_000.0
    assert guard.check("n1", now, now_s=now) is None
    assert "already used" in (guard.check("n1", now, now_s=now + 1) or "")
    assert "old" in (guard.check("n2", now - 31, now_s=now) or "")
    assert "future" in (guard.check("n3", now + 31, now_s=now) or "")
    assert guard.check("n4", now - 29.9, now_s=now) is None and guard.check("n5", now + 29.9, now_s=now) is None


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(window_s=10, max_nonces=150)
    t = 5000.0
    for i in range(1000):                     # 10 per second for 100 s
        assert guard.check(f"n{i}", t + i / 10, now_s=t + i / 10) is None
        assert len(guard) <= 101
    assert "already used" in (guard.check("n999", t + 99.9, now_s=t + 100) or "")
    full = ReplayGuard(window_s=10, max_nonces=3)
    for i in range(3):
        assert full.check(f"x{i}", t, now_s=t) is None
    assert "too many" in (full.check("x3", t, now_s=t) or "")
    assert full.check("x3", t + 11, now_s=t + 11) is None and len(full) == 1   # old ones forgotten


def test_replay_guard_uses_its_clock() -> None:
    clock = [100.0]
    guard = ReplayGuard(window_s=5, clock=lambda: clock[0])
    assert guard.check("a", 100.0) is None
    clock[0] = 106.0
    assert "old" in (guard.check("a", 100.0) or "") and len(guard) == 0
    with pytest.raises(ConfigError):
        ReplayGuard(window_s=0)


def test_find_gives_none_only_when_no_key_is_configured(tmp_path: Path) -> None:
    from halo_p2p.net.swarmkey import find_swarm_key

    assert find_swarm_key(explicit=None, env={ENV_VAR: ""}, path=tmp_path / "absent.key") is None
    key = generate_swarm_key()
    assert find_swarm_key(explicit=None, env={ENV_VAR: key}, path=tmp_path / "absent.key") == parse_swarm_key(
        key, source="x")
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_text("not a key\n")
    corrupt.chmod(0o600)
    with pytest.raises(ConfigError, match="malformed swarm key"):      # a corrupt key is not "no swarm"
        find_swarm_key(explicit=None, env={}, path=corrupt)
    save_swarm_key(key, tmp_path / "open.key")
    (tmp_path / "open.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        find_swarm_key(explicit=None, env={}, path=tmp_path / "open.key")


def test_a_fifo_key_file_is_refused_without_blocking(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "swarm.key"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | bytes] = []

    def load() -> None:
        try:
            outcome.append(load_swarm_key(explicit=None, env={}, path=fifo))
        except BaseException as exc:     # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)              # a blocking open() would never return (no writer): the guard of a hang
    if reader.is_alive():
        with open(fifo, "wb"):   # unblock the reader so the thread ends
            pass
        pytest.fail("load_swarm_key blocked on a FIFO")
    (result,) = outcome
    assert isinstance(result, ConfigError) and "not a regular file" in str(result), result
