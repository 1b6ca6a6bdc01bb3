"""Wire codec: golden frames, round trips, sizes, and every decode error.

Regenerate the golden frames (only when the protocol changes on purpose, with a version bump):
``python -m tests.test_wire_codec``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from halo_p2p.errors import DecodeError, VersionMismatch, WireError
from halo_p2p.groups import ATTN_TENSORS, MLP_TENSORS, GroupLayout
from halo_p2p.model.config import ModelConfig
from halo_p2p.plan import PlacementPlan, PlanBody
from halo_p2p.wire import (
    MESSAGE_TYPES,
    REGISTRY,
    WIRE_VERSION,
    Bye,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    LayerInput,
    Message,
    NeedInput,
    Partial,
    Plan,
    PlanReady,
    Resend,
    Reset,
    decode,
    encode,
    encode_vector,
    payload_budget,
    wire_format,
)
from halo_p2p.wire.messages import (
    GroupTensor,
    SignalAnswer,
    SignalOffer,
    SignalRefused,
    SyncMode,
    WeightsDone,
    WeightsWanted,
    WireDtype,
)

R = dataclasses.replace
GOLDEN = Path(__file__).parent / "data" / "wire"
SESSION = 0x12345678
SHA = "0123456789abcdef" * 4
TINY = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, hidden_dim=8, vocab_size=16,
                   rope_base=10000.0, norm_eps=1e-5, max_seq_len=32, tied_embeddings=True)
BODY = PlanBody(placement=PlacementPlan.split(GroupLayout.from_config(TINY, 4), ["a", "b"]), config=TINY,
                max_seq_len=16)
BODY_MAP = BODY.to_dict()

EXAMPLES: dict[type, Message] = {
    LayerInput: LayerInput(session=SESSION, step=7, layer=3, part=1, start_pos=12, n_tokens=1, groups=(4, 9, 2),
                           segments=(2, 1), chunk=0, n_data=2, n_parity=1, offset=0,
                           data=np.array([1.0, -2.0, 0.5, 65504.0], np.float16)),
    Partial: Partial(session=SESSION, step=7, layer=3, part=0, chunk=1, n_data=2, n_parity=1, offset=576,
                     norms=np.array([1.5, 0.25], np.float16), data=np.array([0.25, -0.0, 1.5], np.float32)),
    Resend: Resend(session=SESSION, step=7, layer=3, part=0, chunks=(1, 5, 30)),
    NeedInput: NeedInput(session=SESSION, step=7, layer=3, part=1),
    Plan: Plan(session=SESSION, model_sha256=SHA, plan=BODY, wire_dtype=WireDtype.Q8_0,
               mode=SyncMode.STRICT_UNRELIABLE),
    PlanReady: PlanReady(session=SESSION, weight_bytes=5_000_000_000, load_s=1.25),
    Reset: Reset(session=SESSION),
    Bye: Bye(reason="shutting down"),
    ErrorReply: ErrorReply(code="version_mismatch", message="peer speaks wire version 3"),
    Heartbeat: Heartbeat(seq=42, sent_s=1234.5),
    HeartbeatAck: HeartbeatAck(seq=42, sent_s=1234.5),
    SignalOffer: SignalOffer(peer_id="p-a", name="laptop", protocol=1, nonce="0123456789abcdef" * 2,
                             sent_s=1767225600.25, sdp="v=0\r\n", mac="ab" * 32),
    SignalAnswer: SignalAnswer(peer_id="p-b", name="desk", protocol=1, nonce="fedcba9876543210" * 2,
                               offer_nonce="0123456789abcdef" * 2, sent_s=1767225600.5, sdp="v=0\r\n",
                               mac="cd" * 32),
    SignalRefused: SignalRefused(code="auth", reason="bad MAC"),
    WeightsWanted: WeightsWanted(session=SESSION, groups=(0, 1, 5, 3, 0, 2)),
    GroupTensor: GroupTensor(session=SESSION, layer=3, part=1, index=5, name="w2", rows=4, cols=2, offset=2,
                             data=np.array([0.5, -1.0, 2.0], np.float32)),
    WeightsDone: WeightsDone(session=SESSION),
}


def golden_path(cls: type) -> Path:
    return GOLDEN / (re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower() + ".hex")


def frame(*items: Any) -> bytes:
    return cbor2.dumps(list(items))


def partial_items(**override: Any) -> list[Any]:
    """The items of the Partial example's frame, with some replaced (by field name)."""
    values = {"session": SESSION, "step": 7, "layer": 3, "part": 0, "chunk": 1, "n_data": 2, "n_parity": 1,
              "offset": 576, "norms": cbor2.CBORTag(84, np.array([1.5, 0.25], "<f2").tobytes()),
              "data": cbor2.CBORTag(85, np.array([0.25, -0.0, 1.5], "<f4").tobytes())}
    values.update(override)
    return [2, 2, *values.values()]


# --- registry and message classes --------------------------------------------------------------


def test_registry_covers_the_union_and_kinds_fit_one_byte() -> None:
    assert set(typing.get_args(Message)) == set(MESSAGE_TYPES) == set(REGISTRY.values())
    assert all(REGISTRY[cls.KIND] is cls and 0 < cls.KIND < 24 for cls in MESSAGE_TYPES)
    assert {cls.__name__ for cls in MESSAGE_TYPES if not cls.RELIABLE} == {
        "LayerInput", "Partial", "Resend", "NeedInput", "Heartbeat", "HeartbeatAck"}


def test_messages_are_frozen_kw_only_and_compare_arrays_bitwise() -> None:
    p = EXAMPLES[Partial]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.chunk = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Reset(SESSION)  # type: ignore[misc]
    assert p == dataclasses.replace(p, data=p.data.copy())
    assert p != dataclasses.replace(p, data=p.data.astype(np.float16))
    assert p != dataclasses.replace(p, data=np.array([0.25, 0.0, 1.5], np.float32))  # -0.0 differs
    assert p != dataclasses.replace(p, chunk=0) and p != EXAMPLES[NeedInput]
    assert repr(p) == ("Partial(version=2, session=305419896, step=7, layer=3, part=0, chunk=1, n_data=2, "
                       "n_parity=1, offset=576, norms=<float16[2]>, data=<float32[3]>)")
    with pytest.raises(TypeError):
        hash(p)


# --- golden frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_golden_frame_both_ways(cls: type) -> None:
    golden = bytes.fromhex(golden_path(cls).read_text())
    assert encode(EXAMPLES[cls]) == golden
    assert decode(golden) == EXAMPLES[cls]


def test_partial_golden_matches_the_spec_by_hand() -> None:
    """docs/wire-protocol.md, byte by byte, without the codec."""
    expected = (bytes([0x8C, 0x02, 0x02, 0x1A, 0x12, 0x34, 0x56, 0x78, 0x07, 0x03, 0x00, 0x01, 0x02, 0x01,
                       0x19, 0x02, 0x40, 0xD8, 0x54, 0x44, 0x00, 0x3E, 0x00, 0x34, 0xD8, 0x55, 0x4C])
                + np.array([0.25, -0.0, 1.5], "<f4").tobytes())
    assert bytes.fromhex(golden_path(Partial).read_text()) == expected


# --- round trips ------------------------------------------------------------------------------

WIDTH_EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1]


def random_uint(rng: np.random.Generator, max_value: int = 2**32 - 1) -> int:
    if rng.random() < 0.5:
        return min(int(rng.choice(WIDTH_EDGES)), max_value)
    return int.from_bytes(rng.bytes(9)) % (max_value + 1)


def random_text(rng: np.random.Generator) -> str:
    return "".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=int(rng.integers(0, 6))))


def random_array(rng: np.random.Generator, dtype: str) -> np.ndarray:
    n = int(rng.integers(0, 700))
    arr = rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)  # NaNs too
    if rng.random() < 0.2:
        arr = arr.astype(np.dtype(dtype).newbyteorder(">"))  # sent little-endian anyway
    if rng.random() < 0.2:
        arr = np.repeat(arr, 2)[::2]  # not contiguous
    return arr


def random_body(rng: np.random.Generator, u: Any) -> PlanBody:
    """A valid plan body of a small random model, split among 1 to 4 peers by random shares."""
    kv, head_dim, hidden = int(rng.integers(1, 4)), 2 * int(rng.integers(1, 5)), int(rng.choice([4, 6, 12, 64]))
    config = ModelConfig(dim=int(rng.integers(1, 2000)), n_layers=int(rng.integers(1, 5)),
                         n_heads=kv * int(rng.integers(1, 4)), n_kv_heads=kv, head_dim=head_dim, hidden_dim=hidden,
                         vocab_size=max(1, u()), rope_base=float(rng.random() * 1e6), norm_eps=float(rng.random()),
                         max_seq_len=max(1, u()), tied_embeddings=bool(rng.random() < 0.5))
    size = int(rng.choice([d for d in range(1, hidden + 1) if hidden % d == 0]))
    peers = [random_text(rng) + str(i) for i in range(int(rng.integers(1, 5)))]
    placement = PlacementPlan.split(GroupLayout.from_config(config, size), peers,
                                    shares=[float(rng.random()) + 0.01 for _ in peers])
    return PlanBody(placement=placement, config=config, max_seq_len=max(1, u()))


def random_message(rng: np.random.Generator) -> Message:
    cls = MESSAGE_TYPES[int(rng.integers(len(MESSAGE_TYPES)))]
    u, s = (lambda m=2**32 - 1: random_uint(rng, m)), rng.choice(["", "x", "héllo ✓", "a" * 300])
    where = {"session": u(), "step": u(), "layer": u(), "part": u(1)}
    if cls in (LayerInput, Partial):
        n_data = max(1, u())
        n_parity = int(rng.integers(0, n_data, endpoint=True)) if n_data < 100 else u(n_data)
        chunk = int(rng.integers(0, min(n_data + n_parity, 2**32)))
        parity = chunk >= n_data
        dtype = str(rng.choice(["uint8", "uint16", "uint32"] if parity else ["uint8", "float16", "float32"]))
        chunks = {"chunk": chunk, "n_data": n_data, "n_parity": n_parity, "offset": 0 if parity else u(),
                  "data": random_array(rng, dtype)}
        if cls is Partial:
            return Partial(**where, **chunks, norms=random_array(rng, "float16")[:40])
        groups = tuple(int(g) for g in rng.permutation(200)[:int(rng.integers(1, 30))])
        cut = sorted({int(x) for x in rng.integers(1, len(groups), size=3)}) if len(groups) > 1 else []
        segments = tuple(b - a for a, b in zip([0, *cut], [*cut, len(groups)], strict=True))
        return LayerInput(**where, start_pos=u(), n_tokens=max(1, u()), groups=groups, segments=segments, **chunks)
    if cls is Resend:
        return Resend(**where, chunks=tuple(u() for _ in range(int(rng.integers(0, 40)))))
    if cls is NeedInput:
        return NeedInput(**where)
    if cls is Plan:
        sha = "".join(rng.choice(list("0123456789abcdef"), 64))
        return Plan(session=u(), model_sha256=sha, plan=random_body(rng, u),
                    wire_dtype=WireDtype(rng.choice(list(WireDtype))), mode=SyncMode(rng.choice(list(SyncMode))))
    if cls is PlanReady:
        return PlanReady(session=u(), weight_bytes=random_uint(rng, 2**64 - 1),
                         load_s=float(rng.random() * 100))
    if cls is Reset:
        return Reset(session=u())
    if cls is Bye:
        return Bye(reason=str(s))
    if cls is ErrorReply:
        return ErrorReply(code=str(s), message=str(s) * 2)
    if cls in (SignalOffer, SignalAnswer):
        hexes = ["".join(rng.choice(list("0123456789abcdef"), n)) for n in (32, 32, 64)]
        extra = {"offer_nonce": hexes[1]} if cls is SignalAnswer else {}
        return cls(peer_id=str(s), name=str(s), protocol=u(), nonce=hexes[0], sent_s=float(rng.random() * 2e9),
                   sdp=str(s) * 3, mac=str(rng.choice(["", hexes[2]])), **extra)
    if cls is SignalRefused:
        return SignalRefused(code=str(s), reason=str(s))
    if cls is WeightsWanted:
        triples = rng.integers(0, 30, 3 * int(rng.integers(1, 5)))
        return WeightsWanted(session=u(), groups=tuple(int(x) for x in triples))
    if cls is GroupTensor:
        n = int(rng.integers(0, 40))
        return GroupTensor(session=u(), layer=u(), part=int(rng.integers(0, 2)), index=u(), name="w3", rows=8, cols=8,
                           offset=int(rng.integers(0, 64 - n + 1)), data=rng.standard_normal(n).astype(np.float32))
    if cls is WeightsDone:
        return WeightsDone(session=u())
    return cls(seq=u(), sent_s=float(rng.standard_normal() * 1e6))


def test_round_trip_property() -> None:
    rng = np.random.default_rng(20260121)
    for _ in range(600):
        msg = random_message(rng)
        data = encode(msg)
        back = decode(data)
        assert back == msg, msg
        assert encode(back) == data
        for value in (getattr(back, f.name) for f in dataclasses.fields(back)):
            if isinstance(value, np.ndarray):
                assert not value.flags.writeable and value.dtype.isnative and value.ndim == 1


def test_decoded_arrays_are_read_only_views_of_native_dtype() -> None:
    back = decode(encode(EXAMPLES[LayerInput]))
    assert back.data.dtype == np.float16 and not back.data.flags.writeable
    with pytest.raises(ValueError):
        back.data[0] = 1


def test_decoder_accepts_big_endian_tags_and_tag_40() -> None:
    be = cbor2.CBORTag(81, np.array([0.25, -0.0, 1.5], ">f4").tobytes())  # float32 big-endian
    assert decode(frame(*partial_items(data=be))) == EXAMPLES[Partial]
    nd = cbor2.CBORTag(40, [[3], partial_items()[-1]])
    assert decode(frame(*partial_items(data=nd))) == EXAMPLES[Partial]
    empty = decode(frame(*partial_items(data=cbor2.CBORTag(84, b"")))).data
    assert empty.dtype == np.float16 and empty.shape == (0,)
    q8 = decode(frame(*partial_items(data=cbor2.CBORTag(64, bytes(34))))).data
    assert q8.dtype == np.uint8 and q8.shape == (34,)


def test_decoder_accepts_cbor_ints_and_half_floats_for_float_fields() -> None:
    assert decode(frame(2, 13, 42, 0)) == Heartbeat(seq=42, sent_s=0.0)
    assert decode(bytes.fromhex("84020d182af93e00")) == Heartbeat(seq=42, sent_s=1.5)  # float16 1.5


# --- sizes ------------------------------------------------------------------------------------


def _frames(template: Message, values: np.ndarray, fmt: str, budget: int = 1160) -> list[bytes]:
    vec = encode_vector(wire_format(fmt), values, payload_budget(template, budget), parity=True)
    return [encode(dataclasses.replace(template, chunk=k, n_data=vec.n_data, n_parity=vec.n_parity,  # type: ignore[type-var]
                                       offset=vec.offset(k), data=p)) for k, p in enumerate(vec.payloads)]


TOP = 2**32 - 1
TEMPLATES = {
    "LayerInput typical": LayerInput(session=2**31 + 5, step=40_000, layer=29, part=1, start_pos=900, n_tokens=1,
                                     groups=(3, 7, 11, 15, 19, 23), segments=(6,), chunk=0, n_data=1, n_parity=0,
                                     offset=0, data=np.zeros(0, np.uint8)),
    "LayerInput worst": LayerInput(session=TOP, step=TOP, layer=TOP, part=1, start_pos=TOP, n_tokens=TOP,
                                   groups=tuple(range(TOP - 40, TOP)), segments=(20, 20), chunk=0, n_data=1,
                                   n_parity=0, offset=0, data=np.zeros(0, np.uint8)),
    "Partial typical": Partial(session=2**31 + 5, step=40_000, layer=29, part=1, chunk=0, n_data=1, n_parity=0,
                               offset=0, norms=np.zeros(6, np.float16), data=np.zeros(0, np.uint8)),
    "Partial worst": Partial(session=TOP, step=TOP, layer=TOP, part=1, chunk=0, n_data=1, n_parity=0, offset=0,
                             norms=np.zeros(64, np.float16), data=np.zeros(0, np.uint8)),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_payload_budget_is_exact_for_the_widest_chunk_fields(name: str) -> None:
    """A payload of exactly the budget, with chunk/n_data/n_parity at 65535 and offset at 2**32 - 1, is 1160 bytes."""
    for budget in (300, 1160, 4000):
        b = payload_budget(TEMPLATES[name], budget)
        widest = dataclasses.replace(TEMPLATES[name], chunk=0xFFFE, n_data=0xFFFF, n_parity=0xFFFF, offset=TOP,
                                     data=np.zeros(b, np.uint8))
        assert budget - 1 <= len(encode(widest)) <= budget     # 1 less: a payload under 256 B has a 2-byte head


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("fmt", ["q8_0", "float16", "float32"])
def test_every_chunk_of_a_vector_fits_one_packet(name: str, fmt: str) -> None:
    rng = np.random.default_rng(3)
    template = dataclasses.replace(TEMPLATES[name], data=np.zeros(0, wire_format(fmt).dtype))
    for n in (64, 576, 1152, 2048, 8192, 70_000):
        frames = _frames(template, rng.standard_normal(n).astype(np.float32), fmt)
        assert max(len(f) for f in frames) <= 1160, (n, [len(f) for f in frames])


def test_a_smollm2_answer_is_one_packet_of_about_650_bytes() -> None:
    """dim 576 in Q8_0: 18 blocks of 34 bytes (612 B); one sum per worker is one frame each way."""
    frames = _frames(TEMPLATES["Partial typical"], np.ones(576, np.float32), "q8_0")
    assert len(frames) == 2 and len(frames[0]) == 650   # the data chunk and its parity (a copy): 38-byte header
    inp = _frames(TEMPLATES["LayerInput typical"], np.ones(576, np.float32), "q8_0")
    assert len(inp) == 2 and len(inp[0]) == 648         # with its 6 groups in one segment


def test_payload_budget_refuses_an_invalid_template() -> None:
    with pytest.raises(WireError, match="segments"):
        payload_budget(dataclasses.replace(TEMPLATES["LayerInput typical"], segments=(5,)))


# --- decode errors ----------------------------------------------------------------------------

DEEP: list[Any] = []
for _ in range(66):
    DEEP = [DEEP]

BAD_FRAMES = {
    "not CBOR": (b"\xff", "not valid CBOR"),
    "reserved": (b"\x1c", "not valid CBOR"),
    "empty": (b"", "not valid CBOR"),
    "trailing": (frame(*partial_items()) + b"\x00", "1 trailing bytes"),
    "not an array": (cbor2.dumps({"kind": 2}), "must be a CBOR array"),
    "too short": (frame(1), "of 1 items"),
    "version str": (frame("1", 2), "version must be int, got str"),
    "kind str": (frame(2, "2"), "unknown message kind '2'"),
    "unknown kind": (frame(2, 99), "unknown message kind 99"),
    "field count": (frame(*partial_items()[:-1]), "Partial frame must have 10 fields, got 9"),
    "str for int": (frame(*partial_items(chunk="5")), "Partial field 'chunk' must be int, got str"),
    "bool for int": (frame(*partial_items(chunk=True)), "field 'chunk' must be int, got bool"),
    "float for int": (frame(*partial_items(step=7.0)), "field 'step' must be int, got float"),
    "negative step": (frame(*partial_items(step=-1)), "field 'step' must be in [0, 4294967295], got -1"),
    "step too big": (frame(*partial_items(step=2**32)), "got 4294967296"),
    "part 2": (frame(*partial_items(part=2)), "field 'part' must be in [0, 1], got 2"),
    "bytes for array": (frame(*partial_items(data=b"\x00\x00")),
                        "'data' must be an RFC 8746 typed array, got bytes"),
    "list for array": (frame(*partial_items(data=[0.5])), "typed array, got list"),
    "float64 tag": (frame(*partial_items(data=cbor2.CBORTag(86, bytes(8)))), "got tag 86"),
    "text in tag": (frame(*partial_items(data=cbor2.CBORTag(85, "abcd"))),
                    "must wrap a byte string, got str"),
    "odd bytes": (frame(*partial_items(data=cbor2.CBORTag(85, bytes(6)))), "6 bytes, not a multiple of 4"),
    "uint16 partial": (frame(*partial_items(data=cbor2.CBORTag(69, bytes(4)))),
                       "Partial: data chunk 1 must be float16, float32 or uint8 (q8_0 blocks), got uint16"),
    "float32 norms": (frame(*partial_items(norms=cbor2.CBORTag(85, bytes(4)))),
                      "field 'norms' must have dtype float16, got float32"),
    "uint8 big-endian twin": (frame(*partial_items(data=cbor2.CBORTag(60, bytes(4)))), "got tag 60"),
    "2-D": (frame(*partial_items(data=cbor2.CBORTag(40, [[1, 2], cbor2.CBORTag(85, bytes(8))]))),
            "must be a 1-D array, got shape (1, 2)"),
    "bad shape": (frame(*partial_items(data=cbor2.CBORTag(40, [[3], cbor2.CBORTag(85, bytes(8))]))),
                  "tag 40 shape [3] but 2 elements"),
    "bad tag 40": (frame(*partial_items(data=cbor2.CBORTag(40, [2]))), "must be tag 40 [shape, typed array]"),
    "NaN": (frame(2, 13, 1, math.nan), "Heartbeat field 'sent_s' must be finite, got nan"),
    "str for float": (frame(2, 13, 1, "0"), "field 'sent_s' must be float, got str"),
    "bad utf-8": (bytes.fromhex("8302") + b"\x0b" + b"\x62\xc3\x28", "not valid CBOR"),
    "literal": (frame(2, 8, 1, SHA, BODY_MAP, "float16", "fast"),
                "field 'mode' must be one of 'strict', 'strict-unreliable', 'halo'"),
    "dtype": (frame(2, 8, 1, SHA, BODY_MAP, "bfloat16", "halo"),
              "field 'wire_dtype' must be one of 'float16', 'float32', 'q8_0', got 'bfloat16'"),
    "sha": (frame(2, 8, 1, "AB" * 32, BODY_MAP, "float16", "halo"), "model_sha256 must be 64 lowercase hex"),
    "body version": (frame(2, 8, 1, SHA, {**BODY_MAP, "version": 2}, "float16", "halo"),
                     "Plan field 'plan' is invalid: plan body version 2 is not 1"),
    "body empty": (frame(2, 8, 1, SHA, {}, "float16", "halo"), "plan body version None is not 1"),
    "body n_parity": (frame(2, 8, 1, SHA, {**BODY_MAP, "n_parity": 1}, "float16", "halo"),
                      "plan body has unknown field(s) 'n_parity'"),
    "body no config": (frame(2, 8, 1, SHA, {k: v for k, v in BODY_MAP.items() if k != "config"}, "float16", "halo"),
                       "plan body misses field(s) 'config'"),
    "body max_seq_len": (frame(2, 8, 1, SHA, {**BODY_MAP, "max_seq_len": 0}, "float16", "halo"),
                         "plan body field 'max_seq_len' must be an int >= 1, got 0"),
    "body config type": (frame(2, 8, 1, SHA, {**BODY_MAP, "config": {**BODY_MAP["config"], "dim": 8.0}}, "float16",
                               "halo"), "plan body field 'config.dim' must be int, got float"),
    "body config value": (frame(2, 8, 1, SHA, {**BODY_MAP, "config": {**BODY_MAP["config"], "n_kv_heads": 3}},
                                "float16", "halo"), "plan body field 'config' is invalid: n_heads=2 is not a multiple"),
    "body group size": (frame(2, 8, 1, SHA, {**BODY_MAP, "placement": {**BODY_MAP["placement"], "mlp_group_size": 3}},
                              "float16", "halo"), "'placement.mlp_group_size': MLP group size 3 does not divide"),
    "body placement": (frame(2, 8, 1, SHA, {**BODY_MAP, "placement": {**BODY_MAP["placement"], "assign": {"a": []}}},
                             "float16", "halo"), "plan body field 'placement' assigns 0 groups; the layout of field"),
    "body twice": (frame(2, 8, 1, SHA, {**BODY_MAP, "placement": {**BODY_MAP["placement"], "assign": {
        "a": [[0, 0, 0], [0, 1, 0]], "b": [[0, 1, 0]]}}}, "float16", "halo"),
        "plan body field 'placement': group L0.mlp0 is assigned twice ('a' and 'b')"),
    "body huge layout": (frame(2, 8, 1, SHA, {**BODY_MAP, "config": {**BODY_MAP["config"], "n_layers": 2**40}},
                               "float16", "halo"), "assigns 3 groups; the layout of field 'config' has 3298534883328"),
    "body placement list": (frame(2, 8, 1, SHA, {**BODY_MAP, "placement": []}, "float16", "halo"),
                            "plan body field 'placement' must be a map, got list"),
    "plan list": (frame(2, 8, 1, SHA, [], "float16", "halo"), "field 'plan' must be dict, got list"),
    "plan int key": (frame(2, 8, 1, SHA, {1: 2}, "float16", "halo"), "map key must be a text string"),
    "plan tag": (frame(2, 8, 1, SHA, {"t": cbor2.CBORTag(1, 0)}, "float16", "halo"),
                 "JSON-like values (None, bool, int, float, str, list, dict), got CBOR tag 1"),
    "plan typed array": (frame(2, 8, 1, SHA, {"t": cbor2.CBORTag(85, bytes(4))}, "float16", "halo"),
                         "got CBOR tag 85"),
    "plan NaN": (frame(2, 8, 1, SHA, {"x": [math.inf]}, "float16", "halo"), "non-finite float (inf)"),
    "plan deep": (frame(2, 8, 1, SHA, {"x": DEEP}, "float16", "halo"), "deeper than 64"),
    "too deep": (b"\x81" * 100 + b"\x00", "not valid CBOR"),
    "shared ref": (b"\x87\x02\x08\x01" + cbor2.dumps(SHA) + bytes.fromhex("d81ca0") + cbor2.dumps("float16")
                   + cbor2.dumps("halo"), "tag 28"),
    "tuple of str": (frame(2, 3, 1, 7, 3, 0, [1, "2"]), "field 'chunks' item 1 must be an int"),
    "load_s < 0": (frame(2, 9, 1, 10, -1.0), "load_s must be >= 0"),
    "parity float": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0], [1], 2, 2, 1, 0, cbor2.CBORTag(84, bytes(2))),
                     "LayerInput: parity chunk 2 must be uint8, uint16 or uint32, got float16"),
    "data uint": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0], [1], 0, 2, 1, 0, cbor2.CBORTag(69, bytes(2))),
                  "data chunk 0 must be float16, float32 or uint8 (q8_0 blocks), got uint16"),
    "chunk range": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0], [1], 3, 2, 1, 0, cbor2.CBORTag(69, bytes(2))),
                    "chunk 3 out of range for n_data 2 + n_parity 1"),
    "n_parity": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0], [1], 0, 2, 3, 0, cbor2.CBORTag(84, bytes(2))),
                 "n_parity (3) must be <= n_data (2)"),
    "n_data 0": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0], [1], 0, 0, 0, 0, cbor2.CBORTag(84, bytes(2))), "n_data (0)"),
    "signal nonce": (frame(2, 21, "a", "b", 1, "XYZ", 1.0, "v=0", ""), "nonce must be 16 to 64 lowercase hex"),
    "signal mac": (frame(2, 21, "a", "b", 1, "0" * 32, 1.0, "v=0", "ab"), "mac must be empty or 64 lowercase"),
    "answer offer_nonce": (frame(2, 22, "a", "b", 1, "0" * 32, "nope", 1.0, "v=0", ""),
                           "nonce must be 16 to 64 lowercase hex digits, got 'nope'"),
    "segments sum": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0, 1], [1], 0, 1, 0, 0, cbor2.CBORTag(64, bytes(34))),
                     "segments (1,) must be >= 1 each and sum to len(groups) = 2"),
    "repeated group": (frame(2, 1, 1, 7, 3, 0, 0, 1, [3, 3], [2], 0, 1, 0, 0, cbor2.CBORTag(64, bytes(34))),
                       "groups (3, 3) must be non-empty and distinct"),
    "no groups": (frame(2, 1, 1, 7, 3, 0, 0, 1, [], [], 0, 1, 0, 0, cbor2.CBORTag(64, bytes(34))),
                  "must be non-empty and distinct"),
    "bignum": (frame(2, 3, 1, 7, 3, 0, [cbor2.CBORTag(2, b"\xff" * 1800)]), "Resend field 'chunks'"),
    "huge shape": (frame(*partial_items(data=cbor2.CBORTag(40, [[4, 1, 2**32 - 1, 2**32 - 1, 0],
                                                                 cbor2.CBORTag(85, b"")]))), "Partial field 'data'"),
    "parity offset": (frame(2, 1, 1, 7, 3, 0, 0, 1, [0], [1], 2, 2, 1, 8, cbor2.CBORTag(69, bytes(2))),
                      "parity chunk 2 must have offset 0, got 8"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES), ids=str)
def test_decode_error_names_the_problem(case: str) -> None:
    data, message = BAD_FRAMES[case]
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert message in str(info.value)
    assert type(info.value.__cause__).__module__.split(".")[0] in ("builtins", "cbor2", "NoneType")


def test_version_mismatch_is_refused_with_the_peer_version() -> None:
    data = frame(1, *partial_items()[1:])
    with pytest.raises(VersionMismatch, match="peer speaks wire version 1, this peer speaks 2") as info:
        decode(data)
    assert info.value.peer_version == 1 and isinstance(info.value, WireError)
    with pytest.raises(VersionMismatch):
        decode(frame(0, 99))  # the version is checked before the kind
    with pytest.raises(VersionMismatch, match="it says: 'version_mismatch': 'speak 1'") as info:
        decode(frame(1, 12, "version_mismatch", "speak 1"))  # ErrorReply's layout is frozen
    assert info.value.peer_version == 1


def test_every_truncation_is_a_decode_error() -> None:
    for cls, msg in EXAMPLES.items():
        data = encode(msg)
        for cut in range(len(data)):
            with pytest.raises(DecodeError):
                decode(data[:cut])
        assert decode(bytearray(data)) == msg == decode(memoryview(data)), cls


def test_mutated_frames_raise_only_wire_errors() -> None:
    rng = np.random.default_rng(7)
    frames = [encode(m) for m in EXAMPLES.values()]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        data = bytearray(frames[int(rng.integers(len(frames)))])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(data)))
            op = int(rng.integers(3))
            if op == 0:
                data[pos] ^= 1 << int(rng.integers(8))
            elif op == 1:
                data.insert(pos, int(rng.integers(256)))
            else:
                del data[pos]
        try:
            decode(bytes(data))
            outcomes["ok"] += 1
        except WireError:  # DecodeError or VersionMismatch; anything else fails the test
            outcomes["error"] += 1
    assert outcomes["ok"] > 50 and outcomes["error"] > 1000


# --- encode errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(("msg", "message"), [
    (R(EXAMPLES[Partial], chunk="5"), "cannot encode Partial: field 'chunk' must be int, got str"),
    (R(EXAMPLES[Partial], step=np.int64(7)), "field 'step' must be int, got numpy.int64"),
    (R(EXAMPLES[Partial], step=-1), "field 'step' must be in [0, 4294967295], got -1"),
    (R(EXAMPLES[Partial], data=np.zeros((2, 2), np.float32)), "1-D array, got shape (2, 2)"),
    (R(EXAMPLES[Partial], data=np.zeros(2)), "dtype float16 or float32 or uint8 or uint16 or uint32, got float64"),
    (R(EXAMPLES[Partial], norms=np.zeros(2, np.float32)), "field 'norms' must have dtype float16, got float32"),
    (R(EXAMPLES[Partial], data=[0.5]), "must be a numpy array, got list"),
    (R(EXAMPLES[Resend], chunks=[1, 2]), "field 'chunks' must be tuple, got list"),
    (R(EXAMPLES[LayerInput], segments=(3,), groups=(1, 1, 2)), "must be non-empty and distinct"),
    (R(EXAMPLES[PlanReady], load_s=1), "field 'load_s' must be float, got int"),
    (R(EXAMPLES[PlanReady], weight_bytes=2**64), "'weight_bytes' must be in [0, 18446744073709551615]"),
    (R(EXAMPLES[Plan], plan=BODY_MAP), "cannot encode Plan: field 'plan' must be PlanBody, got dict"),
    (R(EXAMPLES[Plan], mode="fast"), "field 'mode' must be one of 'strict', 'strict-unreliable', 'halo', got 'fast'"),
    (R(EXAMPLES[Plan], wire_dtype=1), "field 'wire_dtype' must be str, got int"),
    (R(EXAMPLES[Plan], model_sha256="x"), "model_sha256 must be 64 lowercase hex digits"),
    (R(EXAMPLES[Heartbeat], sent_s=math.inf), "must be finite, got inf"),
    (R(EXAMPLES[LayerInput], chunk=2), "parity chunk 2 must be uint8, uint16 or uint32"),
    (R(EXAMPLES[Reset], version=1), "cannot encode Reset of version 1"),
    (object(), "cannot encode object: not a registered message kind"),
], ids=str)
def test_encode_refuses_invalid_messages(msg: Any, message: str) -> None:
    with pytest.raises(WireError) as info:
        encode(msg)
    assert message in str(info.value)


def test_plan_decodes_to_its_typed_body_and_enums() -> None:
    back = decode(encode(EXAMPLES[Plan]))
    assert isinstance(back, Plan) and back.plan == BODY and back.plan.layout == BODY.layout
    assert back.mode is SyncMode.STRICT_UNRELIABLE and back.wire_dtype is WireDtype.Q8_0
    as_strings = R(EXAMPLES[Plan], mode="strict-unreliable", wire_dtype="q8_0")   # plain strings encode the same
    assert encode(as_strings) == encode(EXAMPLES[Plan])
    assert set(BODY_MAP) == {"version", "max_seq_len", "config", "placement"}    # no unread key (n_parity) is sent


def test_group_tensor_names_are_the_groups_tensor_names() -> None:
    hint = typing.get_type_hints(GroupTensor)["name"]
    assert set(typing.get_args(hint)) == set(ATTN_TENSORS + MLP_TENSORS)


def test_wire_version_is_two() -> None:
    assert WIRE_VERSION == 2 and all(m.version == 2 for m in EXAMPLES.values())


def _write_golden() -> None:  # pragma: no cover - run by hand
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for cls, msg in EXAMPLES.items():
        hexed = encode(msg).hex()
        golden_path(cls).write_text("\n".join(hexed[i:i + 64] for i in range(0, len(hexed), 64)) + "\n")
        print(golden_path(cls))


if __name__ == "__main__":  # pragma: no cover
    _write_golden()
