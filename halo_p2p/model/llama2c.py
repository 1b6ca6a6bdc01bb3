"""Weights in llama2.c's checkpoint formats (``run.c`` legacy format and ``export.py`` version 1).

Source: karpathy/llama2.c ``run.c`` (``read_checkpoint``, ``memory_map_weights``) and
``export.py`` (``legacy_export``, ``version1_export``). Both store float32 little-endian
matrices as ``(out, in)`` row-major, with Q/K rows already in the adjacent-pair RoPE layout.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from halo_p2p.errors import ModelFormatError, ModelNotFound, UnsupportedModel
from halo_p2p.model.config import ModelConfig

__all__ = ["Llama2cModel"]

log = logging.getLogger(__name__)

_MAGIC_V1 = 0x616B3432  # "ak42"
_LEGACY_HEADER_BYTES = 7 * 4
_V1_HEADER_BYTES = 256
_ROPE_BASE = 10000.0      # llama2.c hard-codes theta = 10000 in run.c
_NORM_EPS = 1e-5          # likewise


class Llama2cModel:
    """A llama2.c checkpoint as a :class:`~halo_p2p.model.source.TensorSource`.

    The file is memory-mapped; :meth:`load` copies only the rows asked for.

    Raises (from :meth:`open`):
        ModelNotFound: the file does not exist.
        ModelFormatError: the header is nonsense or the file is shorter than the header says.
        UnsupportedModel: a quantized (version 2) export.
    """

    def __init__(self, path: Path, config: ModelConfig,
                 offsets: dict[str, tuple[int, tuple[int, ...]]], data: np.ndarray) -> None:
        self.path = path
        self._config = config
        self._offsets = offsets   # name -> (offset in floats, shape)
        self._data = data         # float32 memmap of the whole file after the header

    @property
    def config(self) -> ModelConfig:
        return self._config

    @classmethod
    def open(cls, path: str | Path) -> Llama2cModel:
        path = Path(path)
        if not path.is_file():
            raise ModelNotFound(f"model file {path} does not exist",
                                "check the path, or run 'halo-peer models' to list models")
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_V1_HEADER_BYTES)
        if len(head) < _LEGACY_HEADER_BYTES:
            raise ModelFormatError(f"{path} is too short ({size} bytes) for a llama2.c checkpoint",
                                   "the file is truncated: copy or export it again")
        magic, version = struct.unpack_from("<Ii", head)
        if magic == _MAGIC_V1:
            if version != 1:
                raise UnsupportedModel(
                    f"{path} is a llama2.c version-{version} export; only legacy and version 1 "
                    "(float32) are supported", "export it with llama2.c export.py --version 1")
            dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", head, 8)
            shared = head[36] != 0
            header_bytes = _V1_HEADER_BYTES
            order = "v1"
        else:
            dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", head)
            shared = vocab > 0       # run.c: a negative vocab_size means an unshared classifier
            vocab = abs(vocab)
            header_bytes = _LEGACY_HEADER_BYTES
            order = "legacy"
        if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
            raise ModelFormatError(
                f"{path} does not look like a llama2.c checkpoint (header dim={dim} "
                f"hidden_dim={hidden} n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv})",
                "pass a llama2.c .bin or a .gguf file")
        head_dim = dim // n_heads
        config = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                             head_dim=head_dim, hidden_dim=hidden, vocab_size=vocab,
                             rope_base=_ROPE_BASE, norm_eps=_NORM_EPS, max_seq_len=seq_len,
                             tied_embeddings=shared)
        offsets, n_floats = _layout(config, order)
        need = header_bytes + 4 * n_floats
        if size < need:
            raise ModelFormatError(
                f"{path} is truncated: its header needs {need} bytes but the file has {size}",
                "copy or export the checkpoint again")
        data = np.memmap(path, dtype="<f4", mode="r", offset=header_bytes,
                         shape=((size - header_bytes) // 4,))
        log.debug("opened %s (%s format, %d floats)", path, order, n_floats)
        return cls(path, config, offsets, data)

    def has(self, name: str) -> bool:
        return name in self._offsets

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        try:
            offset, shape = self._offsets[name]
        except KeyError:
            raise ModelFormatError(f"{self.path} has no tensor {name!r}",
                                   "the checkpoint is not a LLaMA model") from None
        row_len = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        start, stop = (0, shape[0]) if rows is None else rows
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows [{start}, {stop}) out of range for {name} {shape}")
        flat = self._data[offset + start * row_len: offset + stop * row_len]
        return np.array(flat, dtype=np.float32).reshape((stop - start, *shape[1:]))


def _layout(c: ModelConfig, order: str) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Offsets (in floats) of every canonical tensor, following run.c / export.py."""
    kv_dim = c.n_kv_heads * c.head_dim
    q_dim = c.n_heads * c.head_dim
    per_layer = {
        "attention_norm": (c.dim,), "ffn_norm": (c.dim,),
        "wq": (q_dim, c.dim), "wk": (kv_dim, c.dim), "wv": (kv_dim, c.dim),
        "wo": (c.dim, q_dim), "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim),
        "w3": (c.hidden_dim, c.dim),
    }
    if order == "legacy":
        seq = ["tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm",
               "w1", "w2", "w3", "norm", "freq_cis", "output"]
    else:
        seq = ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo",
               "w1", "w2", "w3", "output"]
    offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
    pos = 0
    for item in seq:
        if item in per_layer:
            shape = per_layer[item]
            n = int(np.prod(shape))
            for layer in range(c.n_layers):
                offsets[f"layers.{layer}.{item}"] = (pos, shape)
                pos += n
        elif item == "tok_embeddings":
            offsets[item] = (pos, (c.vocab_size, c.dim))
            pos += c.vocab_size * c.dim
        elif item == "norm":
            offsets[item] = (pos, (c.dim,))
            pos += c.dim
        elif item == "freq_cis":   # legacy only: real and imaginary RoPE tables, unused
            pos += c.max_seq_len * c.head_dim
        elif item == "output" and not c.tied_embeddings:
            offsets[item] = (pos, (c.vocab_size, c.dim))
            pos += c.vocab_size * c.dim
    return offsets, pos
