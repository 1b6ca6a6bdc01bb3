"""Memory-mapped GGUF model files: metadata, config and lazily dequantized tensors.

The header (key/value metadata and tensor infos) is parsed here directly from the mapped file,
following the GGUF spec (ggml ``docs/gguf.md``, versions 2 and 3, little-endian). ``gguf``'s own
``GGUFReader`` builds one numpy view per array element and takes about 2 s on the 49k-token
SmolLM2 vocabulary; this parser takes a few tens of milliseconds. Tensor bytes stay in the
mapping until :meth:`GgufModel.load`, which dequantizes only the requested rows with
``gguf.quants.dequantize`` (block layouts from ggml ``ggml-quants.c``).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from halo_p2p.errors import ModelFormatError, ModelNotFound, UnsupportedModel
from halo_p2p.model.config import ModelConfig
from halo_p2p.model.gguf_tokenizer import GgufTokenizer
from halo_p2p.model.source import LAYER_TENSORS

__all__ = ["SUPPORTED_TYPES", "GgufModel", "gguf_tensor_name"]

log = logging.getLogger(__name__)

_Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
                             _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K})
"""GGML tensor types :meth:`GgufModel.load` dequantizes (each checked by the tests)."""

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_REDOWNLOAD = "download it again: halo-peer pull <model>"
_REQUANTIZE = "re-quantize to Q4_K/Q8_0/F16 with llama.cpp's llama-quantize"
_GLOBAL_NAMES = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
                 "output": "output.weight"}
_LAYER_NAMES = dict(zip(LAYER_TENSORS, ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                        "ffn_norm", "ffn_gate", "ffn_down", "ffn_up"), strict=True))
_V = GGUFValueType
_SCALARS: dict[int, struct.Struct] = {t: struct.Struct(f) for t, f in (
    (_V.UINT8, "<B"), (_V.INT8, "<b"), (_V.UINT16, "<H"), (_V.INT16, "<h"), (_V.UINT32, "<I"),
    (_V.INT32, "<i"), (_V.FLOAT32, "<f"), (_V.BOOL, "<?"), (_V.UINT64, "<Q"), (_V.INT64, "<q"),
    (_V.FLOAT64, "<d"))}
_ARRAY_DTYPES = {t: np.dtype(s.format) for t, s in _SCALARS.items()}
_U32, _U64 = _SCALARS[_V.UINT32], _SCALARS[_V.UINT64]


def gguf_tensor_name(name: str) -> str | None:
    """GGUF tensor name of canonical ``name`` (``layers.3.wq`` -> ``blk.3.attn_q.weight``).

    Returns ``None`` when ``name`` is not a canonical name (see :mod:`halo_p2p.model.source`).
    """
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"blk.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


class _Tensor(NamedTuple):
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]     # numpy order: (out_features, in_features) for matrices
    offset: int                # absolute byte offset in the file
    nbytes: int


class _Header:
    """Sequential little-endian parse of the GGUF header over the mapped bytes."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 0
        self.where = "the file header"

    def corrupt(self, problem: str) -> ModelFormatError:
        return ModelFormatError(f"GGUF file {self.path} {problem}", _REDOWNLOAD)

    def need(self, n: int) -> int:
        """Reserve ``n`` bytes at the cursor; return their offset."""
        if n > self.size - self.pos:
            raise self.corrupt(f"is truncated: {self.where} runs past the end of the file "
                               f"({self.size} bytes)")
        self.pos += n
        return self.pos - n

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack_from(self.buf, self.need(st.size))

    def strings(self, count: int) -> list[str]:
        self.need(8 * count)  # each string is at least its u64 length
        buf, size, pos, out = self.buf, self.size, self.pos - 8 * count, []
        unpack = _U64.unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                if pos + 8 + n > size:
                    pos = size + 1
                    break
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except struct.error:
            pos = size + 1
        except UnicodeDecodeError as e:
            raise self.corrupt(f"has invalid UTF-8 in {self.where}") from e
        self.pos = min(pos, self.size)
        self.need(pos - self.pos)  # raises when the strings ran past the end
        return out

    def value(self, vtype: int) -> object:
        if vtype == _V.STRING:
            return self.strings(1)[0]
        if vtype == _V.ARRAY:
            itype, count = self.unpack(_U32)[0], self.unpack(_U64)[0]
            if itype == _V.STRING:
                return self.strings(count)
            if itype == _V.ARRAY:
                return [self.value(_V.ARRAY) for _ in range(count)]
            if itype not in _ARRAY_DTYPES:
                raise self.corrupt(f"has unknown value type {itype} in {self.where}")
            dtype = _ARRAY_DTYPES[itype]
            return np.frombuffer(self.buf, dtype, count, self.need(count * dtype.itemsize)).tolist()
        if vtype not in _SCALARS:
            raise self.corrupt(f"has unknown value type {vtype} in {self.where}")
        (v,) = self.unpack(_SCALARS[vtype])
        # float32 -> the shortest decimal with the same float32 value (1e-05, not 9.99e-06)
        return float(str(np.float32(v))) if vtype == _V.FLOAT32 else v

    def parse(self) -> tuple[dict[str, object], dict[str, tuple[int, tuple[int, ...], int]], int]:
        """Returns (metadata, {name: (raw type id, ggml dims, relative offset)}, data start)."""
        if self.size < 4 or self.buf[:4] != _MAGIC:
            raise self.corrupt(f"is not a GGUF file (magic {bytes(self.buf[:4])!r}, "
                               f"expected {_MAGIC!r})")
        self.pos = 4
        (version,) = self.unpack(_U32)
        if version not in (2, 3):
            kind = "is big-endian" if version & 0xFFFF == 0 else f"has GGUF version {version}"
            raise UnsupportedModel(f"GGUF file {self.path} {kind}; only little-endian GGUF v2/v3 "
                                   "files are read", "convert it again with a current llama.cpp")
        n_tensors, n_kv = self.unpack(_U64)[0], self.unpack(_U64)[0]
        meta: dict[str, object] = {}
        for i in range(n_kv):
            self.where = f"metadata key #{i}"
            key = self.strings(1)[0]
            self.where = f"metadata key {key!r}"
            meta[key] = self.value(self.unpack(_U32)[0])
        infos = {}
        for i in range(n_tensors):
            self.where = f"tensor info #{i}"
            name = self.strings(1)[0]
            self.where = f"tensor info of {name}"
            (n_dims,) = self.unpack(_U32)
            if not 1 <= n_dims <= 4:
                raise self.corrupt(f"has {n_dims} dimensions for tensor {name}")
            dims = tuple(self.unpack(_U64)[0] for _ in range(n_dims))
            infos[name] = (self.unpack(_U32)[0], dims, self.unpack(_U64)[0])
        align = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise self.corrupt(f"has general.alignment={align!r}, not a power of two")
        return meta, infos, -(-self.pos // align) * align


class GgufModel:
    """A LLaMA-family GGUF file: implements :class:`~halo_p2p.model.source.TensorSource`.

    Create it with :meth:`open`. The file stays memory-mapped; tensors are read only by
    :meth:`load`.
    """

    def __init__(self, path: Path, buf: mmap.mmap, metadata: dict[str, object],
                 tensors: dict[str, _Tensor], config: ModelConfig) -> None:
        self._path, self._buf, self._meta = path, buf, metadata
        self._tensors, self._config = tensors, config
        self._tokenizer: GgufTokenizer | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GgufModel:
        """Map ``path``, parse and check its header, and read the config from its metadata.

        Checks the architecture (``general.architecture == "llama"``), every tensor's type
        against :data:`SUPPORTED_TYPES`, every tensor's data range against the file size, and the
        presence and shape of every tensor the config implies. No tensor data is read.

        Raises:
            ModelNotFound: ``path`` does not exist or cannot be read.
            ModelFormatError: not a GGUF file, truncated, corrupt or inconsistent.
            UnsupportedModel: another architecture, or a tensor type we cannot dequantize.
        """
        t0 = time.perf_counter()
        path = Path(path)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise ModelFormatError(f"GGUF file {path} is empty", _REDOWNLOAD)
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelNotFound(f"model file {path} does not exist",
                                "check the path, or list models with: halo-peer models") from None
        except OSError as e:
            raise ModelNotFound(f"cannot read model file {path}: {e.strerror or e}",
                                "check the path and its permissions") from None
        try:
            meta, infos, data_start = _Header(buf, path).parse()
        except (RecursionError, ValueError, IndexError, struct.error) as e:  # e.g. arrays nested 10^4 deep
            raise ModelFormatError(f"GGUF file {path} is corrupt: {type(e).__name__}: {e}",
                                   _REDOWNLOAD) from None
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"GGUF file {path} has no general.architecture", _REDOWNLOAD)
        if arch != "llama":
            raise UnsupportedModel(f"GGUF architecture {arch!r} of {path} is not supported",
                                   "use a LLaMA-family GGUF (general.architecture = llama)")
        tensors = {name: _tensor(path, name, *info, data_start, len(buf))
                   for name, info in infos.items()}
        config = _config(path, arch, meta, tensors)
        _check_shapes(path, config, tensors)
        log.debug("opened %s in %.3f s: %d tensors, %d metadata keys", path,
                  time.perf_counter() - t0, len(tensors), len(meta))
        return cls(path, buf, meta, tensors, config)

    @property
    def path(self) -> Path:
        """The file this model was opened from."""
        return self._path

    @property
    def config(self) -> ModelConfig:
        """Hyper-parameters read from the metadata and tensor shapes."""
        return self._config

    @property
    def metadata(self) -> dict[str, object]:
        """The decoded key/value section (do not mutate).

        Scalars are ``int``/``float``/``bool``/``str``; arrays are ``list``s (so
        ``tokenizer.ggml.tokens`` is a ``list[str]``).
        """
        return self._meta

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template (``tokenizer.chat_template``), if the file carries one."""
        template = self._meta.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    def tokenizer(self) -> GgufTokenizer:
        """The tokenizer embedded in the metadata (built on first call, then cached).

        Raises:
            TokenizerError: the tokenizer metadata is missing or inconsistent.
            UnsupportedModel: a tokenizer model other than ``gpt2`` or ``llama``.
        """
        if self._tokenizer is None:
            self._tokenizer = GgufTokenizer.from_metadata(self._meta, source=str(self._path))
        return self._tokenizer

    def has(self, name: str) -> bool:
        """Whether the file holds canonical tensor ``name`` (``output`` is absent when tied)."""
        return gguf_tensor_name(name) in self._tensors

    def tensor_types(self) -> dict[str, str]:
        """GGML type name (``"Q4_1"``, ``"F32"``...) of every canonical tensor present."""
        return {n: self._tensors[t].qtype.name for n, _ in _expected_shapes(self._config)
                if (t := gguf_tensor_name(n)) is not None}

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Dequantize canonical tensor ``name`` (or rows ``[start, stop)`` of it) to float32.

        Only the raw blocks of the requested rows are read and dequantized.

        Args:
            name: canonical tensor name, e.g. ``layers.0.wq``.
            rows: half-open range over the first axis (``out_features`` for matrices).

        Returns:
            A new float32 array of shape ``(stop - start, *shape[1:])`` or the full shape.

        Raises:
            ModelFormatError: the file has no such tensor (e.g. ``output`` when tied).
            ValueError: ``name`` is not a canonical name or ``rows`` is out of range.
        """
        gname = gguf_tensor_name(name)
        if gname is None:
            raise ValueError(f"{name!r} is not a canonical tensor name")
        t = self._tensors.get(gname)
        if t is None:
            fix = "use tok_embeddings (the embeddings are tied)" if name == "output" else _REDOWNLOAD
            raise ModelFormatError(f"GGUF file {self._path} has no tensor {gname} ({name})", fix)
        start, stop = (0, t.shape[0]) if rows is None else rows
        if not 0 <= start <= stop <= t.shape[0]:
            raise ValueError(f"rows {rows} out of range for {name} with {t.shape[0]} rows")
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        per_row = math.prod(t.shape[1:])
        if start == stop:  # gguf's dequantizers reject empty input
            return np.zeros((0, *t.shape[1:]), np.float32)
        if per_row % block:  # a quantized vector: its "rows" are not block-aligned
            raw = np.frombuffer(self._buf, np.uint8, t.nbytes, t.offset).reshape(1, t.nbytes)
            return dequantize(raw, t.qtype).reshape(t.shape)[start:stop].copy()
        row_bytes = per_row // block * type_size
        raw = np.frombuffer(self._buf, np.uint8, (stop - start) * row_bytes,
                            t.offset + start * row_bytes).reshape(stop - start, row_bytes)
        out = dequantize(raw, t.qtype).reshape(stop - start, *t.shape[1:])
        return out.copy() if t.qtype == _Q.F32 else out  # F32 "dequantize" is a view of the map


def _tensor(path: Path, name: str, type_id: int, dims: tuple[int, ...], rel: int,
            data_start: int, file_size: int) -> _Tensor:
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise UnsupportedModel(f"tensor {name} of {path} has unknown GGML type id {type_id}",
                               _REQUANTIZE) from None
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModel(f"tensor {name} of {path} has type {qtype.name}, which halo-p2p "
                               "cannot dequantize", _REQUANTIZE)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise ModelFormatError(f"tensor {name} of {path} has rows of {dims[0]} values, not a "
                               f"multiple of the {qtype.name} block size {block}", _REDOWNLOAD)
    nbytes = math.prod(dims) // block * type_size
    end = data_start + rel + nbytes
    if end > file_size:
        raise ModelFormatError(f"GGUF file {path} is truncated: tensor {name} needs bytes up to "
                               f"{end} but the file has {file_size}", _REDOWNLOAD)
    return _Tensor(qtype, tuple(reversed(dims)), data_start + rel, nbytes)


def _config(path: Path, arch: str, meta: dict[str, object],
            tensors: dict[str, _Tensor]) -> ModelConfig:
    def get(key: str, kind: type, default: object = None) -> Any:    # checked to be a ``kind`` below
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelFormatError(f"GGUF file {path} has no metadata key {arch}.{key}",
                                   _REDOWNLOAD)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ModelFormatError(f"GGUF file {path} has {arch}.{key}={v!r}, expected {kind.__name__}",
                                   _REDOWNLOAD)
        return v

    embd = tensors.get(_GLOBAL_NAMES["tok_embeddings"])
    if embd is None or len(embd.shape) != 2:
        raise ModelFormatError(f"GGUF file {path} has no 2-D tensor token_embd.weight", _REDOWNLOAD)
    dim, n_heads = get("embedding_length", int), get("attention.head_count", int)
    try:
        return ModelConfig(
            dim=dim, n_layers=get("block_count", int), n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", int, n_heads),
            head_dim=get("attention.key_length", int, dim // n_heads if n_heads > 0 else 0),
            hidden_dim=get("feed_forward_length", int), vocab_size=embd.shape[0],
            rope_base=get("rope.freq_base", float, 10000.0),
            norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-5),
            max_seq_len=get("context_length", int),
            tied_embeddings=_GLOBAL_NAMES["output"] not in tensors)
    except ModelFormatError as e:
        raise ModelFormatError(f"GGUF file {path}: {e.problem}", e.fix) from None


def _expected_shapes(c: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Canonical name and (out, in) shape of every tensor ``c`` implies, lazily."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    yield "tok_embeddings", (c.vocab_size, c.dim)
    yield "norm", (c.dim,)
    if not c.tied_embeddings:
        yield "output", (c.vocab_size, c.dim)
    layer = {"attention_norm": (c.dim,), "wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim),
             "wo": (c.dim, q), "ffn_norm": (c.dim,), "w1": (c.hidden_dim, c.dim),
             "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim)}
    for i in range(c.n_layers):
        for t in LAYER_TENSORS:
            yield f"layers.{i}.{t}", layer[t]


def _check_shapes(path: Path, c: ModelConfig, tensors: dict[str, _Tensor]) -> None:
    for name, shape in _expected_shapes(c):  # stops at the first miss, even if n_layers is huge
        gname = gguf_tensor_name(name)
        if gname not in tensors:
            raise ModelFormatError(f"GGUF file {path} has no tensor {gname} ({name})", _REDOWNLOAD)
        if tensors[gname].shape != shape:
            raise ModelFormatError(f"GGUF file {path}: tensor {gname} has shape "
                                   f"{tensors[gname].shape}, expected {shape}", _REDOWNLOAD)
