"""llama2.c checkpoints: header parsing, layout, and clear errors for bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from halo_p2p.errors import ModelFormatError, ModelNotFound, UnsupportedModel
from halo_p2p.model.llama2c import Llama2cModel
from halo_p2p.model.registry import resolve

STORIES = resolve("stories260K").path


def test_header_and_layout() -> None:
    m = Llama2cModel.open(STORIES)
    c = m.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert c.tied_embeddings and not m.has("output")
    # the final norm sits right after w3 of the last layer (run.c memory_map_weights)
    raw = np.fromfile(STORIES, dtype="<f4", offset=28)
    n_before_norm = 512 * 64 + 5 * (64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 64 + 3 * 172 * 64)
    np.testing.assert_array_equal(m.load("norm"), raw[n_before_norm:n_before_norm + 64])
    np.testing.assert_array_equal(m.load("layers.1.wk", rows=(8, 16)), m.load("layers.1.wk")[8:16])


def test_version1_export_reads_the_same_weights(tmp_path: Path) -> None:
    """Write stories260K in export.py's version-1 layout and read it back."""
    m = Llama2cModel.open(STORIES)
    c = m.config
    header = struct.pack("<Ii7iB", 0x616B3432, 1, c.dim, c.hidden_dim, c.n_layers, c.n_heads,
                         c.n_kv_heads, c.vocab_size, c.max_seq_len, 1)
    header += bytes(256 - len(header))
    parts = [m.load(f"layers.{i}.attention_norm") for i in range(c.n_layers)]
    parts += [m.load(f"layers.{i}.ffn_norm") for i in range(c.n_layers)]
    parts += [m.load("norm"), m.load("tok_embeddings")]
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        parts += [m.load(f"layers.{i}.{name}") for i in range(c.n_layers)]
    path = tmp_path / "v1.bin"
    path.write_bytes(header + b"".join(p.astype("<f4").tobytes() for p in parts))
    v1 = Llama2cModel.open(path)
    assert v1.config == c
    for name in ("tok_embeddings", "norm", "layers.3.w2", "layers.0.attention_norm"):
        np.testing.assert_array_equal(v1.load(name), m.load(name))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        Llama2cModel.open(tmp_path / "absent.bin")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(STORIES.read_bytes()[:500_000])
    with pytest.raises(ModelFormatError, match="truncated"):
        Llama2cModel.open(truncated)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + bytes(100))
    with pytest.raises(ModelFormatError, match="does not look like"):
        Llama2cModel.open(garbage)
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii", 0x616B3432, 2) + bytes(300))
    with pytest.raises(UnsupportedModel, match="version-2"):
        Llama2cModel.open(v2)
