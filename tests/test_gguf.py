"""GgufModel: header parsing, config, dequantization per tensor type, row loads, bad files.

Synthetic files are written with ``gguf.GGUFWriter``; expected values come from small numpy
dequantizers written here from the ggml block layouts (ggml ``ggml-quants.c``), not from the
code under test.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from halo_p2p.errors import HaloError, ModelFormatError, ModelNotFound, UnsupportedModel
from halo_p2p.model.gguf import SUPPORTED_TYPES, GgufModel, gguf_tensor_name
from halo_p2p.model.source import layer_tensor_names

# A tiny LLaMA whose every matrix row (in_features) is a multiple of 256, for the K-quants.
TINY = dict(dim=256, layers=2, heads=4, kv_heads=2, hidden=256, vocab=32)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _ref_q8_0(b: np.ndarray) -> np.ndarray:  # fp16 d, 32 x int8; w = d*q
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # byte j: low nibble = weight j, high = j+16
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)


def _ref_q4_0(b: np.ndarray) -> np.ndarray:  # fp16 d, 16 bytes; w = d*(q-8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)


def _ref_q4_1(b: np.ndarray) -> np.ndarray:  # fp16 d, fp16 m, 16 bytes; w = d*q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def _q5_values(qh_bytes: np.ndarray, qs: np.ndarray) -> np.ndarray:  # 5th bit j from qh bit j
    qh = np.ascontiguousarray(qh_bytes).view("<u4")
    bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32)
    return _nibbles(qs) + 16 * bits


def _ref_q5_0(b: np.ndarray) -> np.ndarray:  # fp16 d, u32 qh, 16 bytes; w = d*(q-16)
    return _f16(b[:, :2]) * (_q5_values(b[:, 2:6], b[:, 6:]) - 16)


def _ref_q5_1(b: np.ndarray) -> np.ndarray:  # fp16 d, fp16 m, u32 qh, 16 bytes; w = d*q + m
    return _f16(b[:, :2]) * _q5_values(b[:, 4:8], b[:, 8:]) + _f16(b[:, 2:4])


def _ref_q4_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_K: fp16 d, fp16 dmin, 12 scale bytes (6-bit sc/m), 128 nibble bytes."""
    d, dmin, s, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16].astype(np.int32), b[:, 16:]
    out = []
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            sc, m = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            m = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
        chunk = qs[:, 32 * (j // 2):32 * (j // 2) + 32]
        q = (chunk & 0xF) if j % 2 == 0 else (chunk >> 4)
        out.append((d * sc[:, None]) * q.astype(np.float32) - dmin * m[:, None])
    return np.concatenate(out, axis=1)


def _ref_q6_k(b: np.ndarray) -> np.ndarray:
    """dequantize_row_q6_K: 128 bytes ql, 64 bytes qh, 16 int8 scales, fp16 d (at the end)."""
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    y = np.zeros((b.shape[0], 256), np.float32)
    is_ = np.arange(32) // 16
    for n in range(2):
        lo, hi, s = ql[:, 64 * n:64 * n + 64], qh[:, 32 * n:32 * n + 32], sc[:, 8 * n:8 * n + 8]
        quads = [(lo[:, :32] & 0xF, 0), (lo[:, 32:] & 0xF, 2), (lo[:, :32] >> 4, 4),
                 (lo[:, 32:] >> 4, 6)]
        for k, (low, shift) in enumerate(quads):
            q = (low | (((hi >> shift) & 3) << 4)) - 32
            y[:, 128 * n + 32 * k:128 * n + 32 * k + 32] = d * s[:, is_ + 2 * k] * q
    return y


REFERENCE = {Q.Q8_0: _ref_q8_0, Q.Q4_0: _ref_q4_0, Q.Q4_1: _ref_q4_1, Q.Q5_0: _ref_q5_0,
             Q.Q5_1: _ref_q5_1, Q.Q4_K: _ref_q4_k, Q.Q6_K: _ref_q6_k}
# fp16 scale fields of the K-quant blocks (byte offsets), set to sane values in random blocks
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                   Q.Q6_K: (208,)}


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw array to write, the float32 values a correct reader must return)."""
    if qtype == Q.F32:
        return values, values
    if qtype == Q.F16:
        raw = values.astype(np.float16)
        return raw, raw.astype(np.float32)
    if qtype == Q.BF16:  # the upper 16 bits of a float32
        raw = quantize(values, qtype)
        return raw, (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype not in SUPPORTED_TYPES:  # only its type matters
        return rng.integers(0, 256, (*values.shape[:-1], values.shape[-1] // block * size), np.uint8), None
    if qtype in K_SCALE_OFFSETS:  # no quantizer in gguf: random blocks with small scales
        blocks = rng.integers(0, 256, (values.size // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            blocks[:, off:off + 2] = rng.uniform(0.001, 0.01, (len(blocks), 1)).astype(
                np.float16).view(np.uint8)
        raw = blocks.reshape(*values.shape[:-1], -1)
    else:
        raw = quantize(values, qtype)
    ref = REFERENCE.get(qtype)
    expected = ref(raw.reshape(-1, size)) if ref else dequantize(raw, qtype)
    return raw, expected.reshape(values.shape).astype(np.float32)


def tensor_shapes(dim: int, layers: int, heads: int, kv_heads: int, hidden: int, vocab: int,
                  head_dim: int | None = None, tied: bool = True) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy (out, in) shape of a LLaMA model."""
    hd = head_dim or dim // heads
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (vocab, dim)
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.attn_q.weight": (heads * hd, dim),
                       f"blk.{i}.attn_k.weight": (kv_heads * hd, dim),
                       f"blk.{i}.attn_v.weight": (kv_heads * hd, dim),
                       f"blk.{i}.attn_output.weight": (dim, heads * hd),
                       f"blk.{i}.ffn_norm.weight": (dim,), f"blk.{i}.ffn_gate.weight": (hidden, dim),
                       f"blk.{i}.ffn_down.weight": (dim, hidden),
                       f"blk.{i}.ffn_up.weight": (hidden, dim)})
    return shapes


def write_gguf(path: Path, qtype: Q = Q.F32, *, arch: str = "llama", tied: bool = True,
               head_dim: int | None = None, meta: dict | None = None, drop: tuple[str, ...] = (),
               shapes: dict | None = None, types: dict | None = None, size: dict | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Write a LLaMA GGUF; matrices in ``qtype``, vectors in F32. Returns expected values."""
    s = {**TINY, **(size or {})}
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    kv = {"embedding_length": s["dim"], "block_count": s["layers"], "context_length": 128,
          "attention.head_count": s["heads"], "attention.head_count_kv": s["kv_heads"],
          "feed_forward_length": s["hidden"]}
    for key, value in kv.items():
        if key not in drop:
            w.add_uint32(f"{arch}.{key}", value)
    if "rope.freq_base" not in drop:
        w.add_float32(f"{arch}.rope.freq_base", 50000.0)
    if "attention.layer_norm_rms_epsilon" not in drop:
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if head_dim is not None:
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
    for key, (value, vtype) in (meta or {}).items():
        w.add_key_value(key, value, vtype)
    expected = {}
    all_shapes = {**tensor_shapes(s["dim"], s["layers"], s["heads"], s["kv_heads"], s["hidden"],
                                  s["vocab"], head_dim, tied), **(shapes or {})}
    for name, shape in all_shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        t = (types or {}).get(name, qtype if len(shape) == 2 else Q.F32)
        raw, expected[name] = encode(values, t, rng)
        w.add_tensor(name, raw, raw_dtype=None if t in (Q.F32, Q.F16) else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("f32") / "tiny-f32.gguf"
    return path, write_gguf(path)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.name),
                         ids=lambda t: t.name)
def test_load_values_per_type(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    expected = write_gguf(path, qtype)
    m = GgufModel.open(path)
    assert m.tensor_types()["layers.1.wk"] == qtype.name
    assert m.tensor_types()["norm"] == "F32"
    for name in ["tok_embeddings", "norm", *layer_tensor_names(1)]:
        got = m.load(name)
        want = expected[gguf_tensor_name(name)]
        assert got.dtype == np.float32 and got.shape == want.shape and got.flags.writeable
        if qtype in (Q.F32, Q.F16, Q.BF16) or name.endswith("norm"):
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        rows = (3, 17) if got.ndim == 2 else (5, 200)
        np.testing.assert_array_equal(m.load(name, rows=rows), got[rows[0]:rows[1]])
    np.testing.assert_array_equal(m.load("layers.0.w2", rows=(7, 7)), np.zeros((0, 256)))


def test_quantized_vector_row_range(tmp_path: Path) -> None:
    expected = write_gguf(tmp_path / "v.gguf", types={"output_norm.weight": Q.Q8_0})
    m = GgufModel.open(tmp_path / "v.gguf")
    assert m.tensor_types()["norm"] == "Q8_0"
    np.testing.assert_allclose(m.load("norm", rows=(5, 200)), expected["output_norm.weight"][5:200],
                               rtol=1e-6)


def test_quantizers_match_the_float_weights(tmp_path: Path) -> None:
    """Q8_0/Q4_x/Q5_x files hold the weights they were made from, within the format's error."""
    for qtype, tol in ((Q.Q8_0, 0.02), (Q.Q5_0, 0.1), (Q.Q5_1, 0.1), (Q.Q4_0, 0.25),
                       (Q.Q4_1, 0.25)):
        path = tmp_path / f"{qtype.name}.gguf"
        floats = write_gguf(path, Q.F32, seed=3)["blk.0.attn_q.weight"]
        write_gguf(path, qtype, seed=3)
        got = GgufModel.open(path).load("layers.0.wq")
        assert np.abs(got - floats).max() < tol * np.abs(floats).max(), qtype.name


def test_k_quant_blocks_with_known_scales() -> None:
    """Hand-built Q4_K and Q6_K blocks decode to the values ggml-quants.c defines."""
    b = np.zeros(144, np.uint8)
    b[0:2] = np.array([0.5], np.float16).view(np.uint8)     # d
    b[2:4] = np.array([0.25], np.float16).view(np.uint8)    # dmin
    b[4:8], b[8:12], b[12:16] = 2, 4, 0x31   # sc 0-3 = 2, m 0-3 = 4; sc 4-7 = 1, m 4-7 = 3
    b[16:] = 0x21                            # low nibble 1, high nibble 2
    want = np.repeat([0.0, 1.0, 0.0, 1.0, -0.25, 0.25, -0.25, 0.25], 32).astype(np.float32)
    np.testing.assert_array_equal(dequantize(b[None], Q.Q4_K)[0], want)
    np.testing.assert_array_equal(_ref_q4_k(b[None])[0], want)
    b = np.zeros(210, np.uint8)
    b[:128] = 0x21                           # ql: low nibble 1, high nibble 2
    b[128:192] = 0b11100100                  # qh 2-bit fields 0, 1, 2, 3
    b[192:208] = np.arange(1, 17, dtype=np.int8).view(np.uint8)  # scales 1..16
    b[208:210] = np.array([0.5], np.float16).view(np.uint8)
    i = np.arange(256)  # scale index 8*half + 2*quarter + (l // 16), scales[k] = k + 1
    scale = 0.5 * (1 + 8 * (i // 128) + 2 * (i % 128 // 32) + (i % 32 // 16))
    q = np.repeat([1 - 32, 1 + 16 - 32, 2 + 32 - 32, 2 + 48 - 32], 32)  # per 32-value quarter
    want = (scale * np.tile(q, 2)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(b[None], Q.Q6_K)[0], want)
    np.testing.assert_array_equal(_ref_q6_k(b[None])[0], want)



def test_config_from_metadata(f32_file: tuple[Path, dict]) -> None:
    m = GgufModel.open(f32_file[0])
    c = m.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size,
            c.max_seq_len) == (256, 2, 4, 2, 64, 256, 32, 128)
    assert (c.rope_base, c.norm_eps, c.tied_embeddings) == (50000.0, 1e-6, True)
    assert m.path == f32_file[0] and m.chat_template is None
    assert m.metadata["general.architecture"] == "llama"
    assert not m.has("output") and m.has("layers.1.w3") and not m.has("layers.2.w3")
    with pytest.raises(ModelFormatError, match=r"output.weight.*tied"):
        m.load("output")
    with pytest.raises(ValueError, match=r"canonical"):
        m.load("blk.0.attn_q.weight")
    with pytest.raises(ValueError, match=r"out of range"):
        m.load("layers.0.wq", rows=(10, 300))


def test_config_defaults_and_key_length(tmp_path: Path) -> None:
    drop = ("attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon")
    write_gguf(tmp_path / "d.gguf", drop=drop, size={"kv_heads": 4})
    c = GgufModel.open(tmp_path / "d.gguf").config
    assert (c.n_kv_heads, c.rope_base, c.norm_eps, c.head_dim) == (4, 10000.0, 1e-5, 64)
    write_gguf(tmp_path / "k.gguf", head_dim=32)
    m = GgufModel.open(tmp_path / "k.gguf")
    assert m.config.head_dim == 32 and m.load("layers.0.wo").shape == (256, 128)


def test_untied_output(tmp_path: Path) -> None:
    expected = write_gguf(tmp_path / "u.gguf", Q.Q8_0, tied=False)
    m = GgufModel.open(tmp_path / "u.gguf")
    assert not m.config.tied_embeddings and m.has("output")
    assert m.tensor_types()["output"] == "Q8_0"
    np.testing.assert_allclose(m.load("output"), expected["output.weight"], rtol=1e-6)


def test_metadata_value_types_match_gguf_reader(tmp_path: Path) -> None:
    V = GGUFValueType
    meta = {"t.u8": (200, V.UINT8), "t.i8": (-5, V.INT8), "t.u16": (60000, V.UINT16),
            "t.i16": (-300, V.INT16), "t.i32": (-7, V.INT32), "t.u64": (2**40, V.UINT64),
            "t.i64": (-(2**40), V.INT64), "t.f64": (0.1, V.FLOAT64), "t.bool": (True, V.BOOL),
            "t.str": ("héllo", V.STRING), "t.f32": (0.1, V.FLOAT32),
            "t.ints": ([3, -1, 4], V.ARRAY), "t.floats": ([0.5, 1.5], V.ARRAY),
            "t.strs": (["a", "", "ü b"], V.ARRAY), "tokenizer.chat_template": ("{{x}}", V.STRING)}
    write_gguf(tmp_path / "m.gguf", meta=meta)
    m = GgufModel.open(tmp_path / "m.gguf")
    reader = GGUFReader(tmp_path / "m.gguf")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert m.metadata[key] == pytest.approx(field.contents()), key
    assert m.metadata["t.f32"] == 0.1 and m.metadata["t.strs"] == ["a", "", "ü b"]
    assert m.chat_template == "{{x}}"


# ---- bad input: each raises its own error class, naming the file or tensor ----------------

def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"nope.gguf does not exist"):
        GgufModel.open(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFound, match=re.escape(str(tmp_path))):
        GgufModel.open(tmp_path)


def test_bad_magic_version_and_empty(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFormatError, match=r"x.gguf is not a GGUF file.*pull"):
        GgufModel.open(tmp_path / "x.gguf")
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(100))
    with pytest.raises(UnsupportedModel, match=r"v1.gguf has GGUF version 1"):
        GgufModel.open(tmp_path / "v1.gguf")
    (tmp_path / "be.gguf").write_bytes(b"GGUF" + struct.pack(">I", 3) + bytes(100))
    with pytest.raises(UnsupportedModel, match=r"be.gguf is big-endian"):
        GgufModel.open(tmp_path / "be.gguf")
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"e.gguf is empty"):
        GgufModel.open(tmp_path / "e.gguf")


def test_truncated_header_at_every_cut(tmp_path: Path, f32_file: tuple[Path, dict]) -> None:
    data = f32_file[0].read_bytes()
    header_end = GGUFReader(f32_file[0]).data_offset
    cut_file = tmp_path / "cut.gguf"
    for cut in np.unique(np.linspace(1, header_end - 1, 60).astype(int)):
        cut_file.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError) as e:
            GgufModel.open(cut_file)
        assert "cut.gguf" in str(e.value) and ("truncated" in str(e.value) or cut < 4)
    cut_file.write_bytes(data[:100])
    with pytest.raises(ModelFormatError, match=r"truncated: metadata key 'llama"):
        GgufModel.open(cut_file)


def test_truncated_tensor_data(tmp_path: Path, f32_file: tuple[Path, dict]) -> None:
    data = f32_file[0].read_bytes()
    cut = len(data) - 1000
    first_cut = next(t.name for t in GGUFReader(f32_file[0]).tensors
                     if t.data_offset + t.n_bytes > cut)
    (tmp_path / "t.gguf").write_bytes(data[:cut])
    with pytest.raises(ModelFormatError, match=rf"t.gguf is truncated: tensor {first_cut} needs "
                       rf"bytes up to \d+ but the file has {cut}"):
        GgufModel.open(tmp_path / "t.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(UnsupportedModel, match=r"architecture 'qwen2' of .*q.gguf.*LLaMA-family"):
        GgufModel.open(tmp_path / "q.gguf")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    write_gguf(tmp_path / "u.gguf", types={"blk.1.attn_q.weight": Q.IQ4_NL})
    with pytest.raises(UnsupportedModel, match=r"blk.1.attn_q.weight of .*u.gguf has type "
                                               r"IQ4_NL.*llama-quantize"):
        GgufModel.open(tmp_path / "u.gguf")


def test_shape_mismatch(tmp_path: Path) -> None:
    write_gguf(tmp_path / "s.gguf", shapes={"blk.1.attn_k.weight": (256, 256)})
    with pytest.raises(ModelFormatError, match=r"s.gguf: tensor blk.1.attn_k.weight has shape "
                                               r"\(256, 256\), expected \(128, 256\)"):
        GgufModel.open(tmp_path / "s.gguf")


def test_missing_key_and_tensor(tmp_path: Path) -> None:
    write_gguf(tmp_path / "k.gguf", drop=("block_count",))
    with pytest.raises(ModelFormatError, match=r"k.gguf has no metadata key llama.block_count"):
        GgufModel.open(tmp_path / "k.gguf")
    write_gguf(tmp_path / "t.gguf", size={"layers": 1}, meta={"llama.block_count": (
        2, GGUFValueType.UINT32)})
    with pytest.raises(ModelFormatError, match=r"no tensor blk.1.attn_norm.weight"):
        GgufModel.open(tmp_path / "t.gguf")


def test_deeply_nested_arrays(tmp_path: Path) -> None:
    key = b"x"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    nested = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 20000 + struct.pack("<IQ", 4, 0)
    (tmp_path / "n.gguf").write_bytes(header + nested)
    with pytest.raises(ModelFormatError, match=r"n.gguf is corrupt: RecursionError"):
        GgufModel.open(tmp_path / "n.gguf")


def test_corrupted_headers_raise_only_halo_errors(tmp_path: Path) -> None:
    """Random byte damage in the header never lets a raw exception out of open()."""
    src = tmp_path / "small.gguf"
    write_gguf(src, size=dict(dim=32, layers=1, heads=4, kv_heads=2, hidden=64, vocab=16))
    data, end = src.read_bytes(), GGUFReader(src).data_offset
    rng = np.random.default_rng(7)
    bad = tmp_path / "bad.gguf"
    failures = 0
    for _ in range(300):
        damaged = bytearray(data)
        for pos in rng.integers(4, end, rng.integers(1, 4)):
            damaged[pos] = rng.integers(0, 256)
        bad.write_bytes(bytes(damaged))
        try:
            GgufModel.open(bad)
        except HaloError as e:
            failures += 1
            assert "bad.gguf" in str(e)
    assert failures > 50


# ---- the real SmolLM2 file -----------------------------------------------------------------

def test_smollm2_config_and_lazy_open(smollm2_path: Path) -> None:
    t0 = time.perf_counter()
    m = GgufModel.open(smollm2_path)
    assert time.perf_counter() - t0 < 0.5
    c = m.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size,
            c.rope_base, c.norm_eps, c.max_seq_len, c.tied_embeddings) == (
        30, 576, 9, 3, 64, 1536, 49152, 100000.0, 1e-5, 8192, True)
    types = m.tensor_types()
    assert len(types) == 272 and types["tok_embeddings"] == "Q8_0"
    assert {types[n] for n in types if n.endswith(("norm", "_norm"))} == {"F32"}
    assert sum(t == "Q4_1" for t in types.values()) == 210
    assert m.chat_template.startswith("{% for message in messages %}")
    np.testing.assert_array_equal(m.load("layers.0.wq", rows=(64, 128)),
                                  m.load("layers.0.wq")[64:128])


def test_smollm2_tensors_match_gguf_reader(smollm2_path: Path) -> None:
    m = GgufModel.open(smollm2_path)
    reader = {t.name: t for t in GGUFReader(smollm2_path).tensors}
    for name in ("tok_embeddings", "norm", "layers.0.wq", "layers.29.w2", "layers.7.ffn_norm"):
        t = reader[gguf_tensor_name(name)]
        np.testing.assert_array_equal(m.load(name), dequantize(t.data, t.tensor_type))
