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
    PartialParity,
    Plan,
    PlanReady,
    Resend,
    Reset,
    decode,
    encode,
    max_payload_elems,
)
from halo_p2p.wire.messages import GroupTensor, SignalAnswer, SignalOffer, SignalRefused, WeightsDone, WeightsWanted

R = dataclasses.replace
GOLDEN = Path(__file__).parent / "data" / "wire"
SESSION = 0x12345678
SHA = "0123456789abcdef" * 4

EXAMPLES: dict[type, Message] = {
    LayerInput: LayerInput(session=SESSION, step=7, layer=3, part=1, start_pos=12, n_tokens=1, chunk=0,
                           n_data=2, n_parity=1, offset=0,
                           data=np.array([1.0, -2.0, 0.5, 65504.0], np.float16)),
    Partial: Partial(session=SESSION, step=7, layer=3, part=0, group=5, offset=4,
                     data=np.array([0.25, -0.0, 1.5], np.float32)),
    PartialParity: PartialParity(session=SESSION, step=7, layer=3, part=1, group=5, n_data=2,
                                 data=np.array([0x3C00 ^ 0xC000, 0x3800], np.uint16)),
    Resend: Resend(session=SESSION, step=7, layer=3, part=0, groups=(1, 5, 30)),
    NeedInput: NeedInput(session=SESSION, step=7, layer=3, part=1),
    Plan: Plan(session=SESSION, model_sha256=SHA, plan={"groups": {"0": [0, 1]}, "peers": ["a", "b"]},
               wire_dtype="float16", mode="halo"),
    PlanReady: PlanReady(session=SESSION, weight_bytes=5_000_000_000, load_s=1.25),
    Reset: Reset(session=SESSION),
    Bye: Bye(reason="shutting down"),
    ErrorReply: ErrorReply(code="version_mismatch", message="peer speaks wire version 2"),
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
    values = {"session": SESSION, "step": 7, "layer": 3, "part": 0, "group": 5, "offset": 4,
              "data": cbor2.CBORTag(85, np.array([0.25, -0.0, 1.5], "<f4").tobytes())}
    values.update(override)
    return [1, 2, *values.values()]


# --- registry and message classes --------------------------------------------------------------


def test_registry_covers_the_union_and_kinds_fit_one_byte() -> None:
    assert set(typing.get_args(Message)) == set(MESSAGE_TYPES) == set(REGISTRY.values())
    assert all(REGISTRY[cls.KIND] is cls and 0 < cls.KIND < 24 for cls in MESSAGE_TYPES)
    assert {cls.__name__ for cls in MESSAGE_TYPES if not cls.RELIABLE} == {
        "LayerInput", "Partial", "PartialParity", "Resend", "NeedInput", "Heartbeat", "HeartbeatAck"}


def test_messages_are_frozen_kw_only_and_compare_arrays_bitwise() -> None:
    p = EXAMPLES[Partial]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.group = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Reset(SESSION)  # type: ignore[misc]
    assert p == dataclasses.replace(p, data=p.data.copy())
    assert p != dataclasses.replace(p, data=p.data.astype(np.float16))
    assert p != dataclasses.replace(p, data=np.array([0.25, 0.0, 1.5], np.float32))  # -0.0 differs
    assert p != dataclasses.replace(p, group=6) and p != EXAMPLES[NeedInput]
    assert repr(p) == ("Partial(version=1, session=305419896, step=7, layer=3, part=0, group=5, "
                       "offset=4, data=<float32[3]>)")
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
    expected = bytes([0x89, 0x01, 0x02, 0x1A, 0x12, 0x34, 0x56, 0x78, 0x07, 0x03, 0x00, 0x05, 0x04,
                      0xD8, 0x55, 0x4C]) + np.array([0.25, -0.0, 1.5], "<f4").tobytes()
    assert bytes.fromhex(golden_path(Partial).read_text()) == expected


# --- round trips ------------------------------------------------------------------------------

WIDTH_EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1]


def random_uint(rng: np.random.Generator, max_value: int = 2**32 - 1) -> int:
    if rng.random() < 0.5:
        return min(int(rng.choice(WIDTH_EDGES)), max_value)
    return int.from_bytes(rng.bytes(9)) % (max_value + 1)


def random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    pick = int(rng.integers(0, 8 if depth < 3 else 6))
    if pick == 0:
        return None
    if pick == 1:
        return bool(rng.integers(2))
    if pick == 2:
        return int(rng.integers(-(2**62), 2**62))
    if pick == 3:
        return float(rng.standard_normal())
    if pick in (4, 5):
        return "".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=int(rng.integers(0, 6))))
    if pick == 6:
        return [random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {f"k{i}": random_json(rng, depth + 1) for i in range(int(rng.integers(0, 4)))}


def random_array(rng: np.random.Generator, dtype: str) -> np.ndarray:
    n = int(rng.integers(0, 700))
    arr = rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)  # NaNs too
    if rng.random() < 0.2:
        arr = arr.astype(np.dtype(dtype).newbyteorder(">"))  # sent little-endian anyway
    if rng.random() < 0.2:
        arr = np.repeat(arr, 2)[::2]  # not contiguous
    return arr


def random_message(rng: np.random.Generator) -> Message:
    cls = MESSAGE_TYPES[int(rng.integers(len(MESSAGE_TYPES)))]
    u, s = (lambda m=2**32 - 1: random_uint(rng, m)), rng.choice(["", "x", "héllo ✓", "a" * 300])
    where = {"session": u(), "step": u(), "layer": u(), "part": u(1)}
    if cls is LayerInput:
        n_data = max(1, u())
        n_parity = int(rng.integers(0, n_data, endpoint=True)) if n_data < 100 else u(n_data)
        chunk = int(rng.integers(0, min(n_data + n_parity, 2**32)))
        parity = chunk >= n_data
        dtype = str(rng.choice(["uint16", "uint32"] if parity else ["float16", "float32"]))
        return LayerInput(**where, start_pos=u(), n_tokens=max(1, u()), chunk=chunk, n_data=n_data,
                          n_parity=n_parity, offset=0 if parity else u(), data=random_array(rng, dtype))
    if cls is Partial:
        return Partial(**where, group=u(), offset=u(),
                       data=random_array(rng, str(rng.choice(["float16", "float32"]))))
    if cls is PartialParity:
        return PartialParity(**where, group=u(), n_data=max(1, u()),
                             data=random_array(rng, str(rng.choice(["uint16", "uint32"]))))
    if cls is Resend:
        return Resend(**where, groups=tuple(u() for _ in range(int(rng.integers(1, 40)))))
    if cls is NeedInput:
        return NeedInput(**where)
    if cls is Plan:
        sha = "".join(rng.choice(list("0123456789abcdef"), 64))
        plan = {"layers": [random_json(rng) for _ in range(3)], "n": u(), "m": {"x": random_json(rng)}}
        wire_dtype, mode = str(rng.choice(["float16", "float32"])), str(rng.choice(["strict", "halo"]))
        return Plan(session=u(), model_sha256=sha, plan=plan, wire_dtype=wire_dtype, mode=mode)
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


def test_decoder_accepts_cbor_ints_and_half_floats_for_float_fields() -> None:
    assert decode(frame(1, 13, 42, 0)) == Heartbeat(seq=42, sent_s=0.0)
    assert decode(bytes.fromhex("84010d182af93e00")) == Heartbeat(seq=42, sent_s=1.5)  # float16 1.5


# --- sizes ------------------------------------------------------------------------------------


def test_partial_of_288_float16_fits_600_bytes() -> None:
    data = np.zeros(288, np.float16)
    typical = Partial(session=2**31 + 5, step=40_000, layer=29, part=1, group=11, offset=288 * 3, data=data)
    assert len(encode(typical)) == 599 <= 600  # header: 23 bytes
    worst = Partial(session=2**32 - 1, step=2**32 - 1, layer=2**32 - 1, part=1, group=2**32 - 1,
                    offset=2**32 - 1, data=data)
    assert len(encode(worst)) == 610  # header: 34 bytes


def worst(cls: type, n: int, dtype: str) -> Message:
    top = 2**32 - 1
    data = np.zeros(n, dtype)
    if cls is Partial:
        return Partial(session=top, step=top, layer=top, part=1, group=top, offset=top, data=data)
    return LayerInput(session=top, step=top, layer=top, part=1, start_pos=top, n_tokens=top, chunk=top - 1,
                      n_data=top, n_parity=top, offset=top, data=data)


@pytest.mark.parametrize("cls", [LayerInput, Partial], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_max_payload_elems_is_tight_for_the_worst_header(cls: type, dtype: str) -> None:
    for budget in [*range(48, 700, 1), 1160, 70_000]:
        n = max_payload_elems(dtype, budget, message_type=cls)
        if n == 0:
            assert len(encode(worst(cls, 1, dtype))) > budget
        else:
            assert len(encode(worst(cls, n, dtype))) <= budget < len(encode(worst(cls, n + 1, dtype))), budget


def test_max_payload_elems_at_the_sctp_budget() -> None:
    kinds, dtypes = (LayerInput, Partial), ("float16", np.float32)
    got = [max_payload_elems(d, message_type=c) for c in kinds for d in dtypes]
    assert got == [553, 276, 563, 281]
    assert max_payload_elems("float16") == 553 and max_payload_elems(np.float32) == 276
    assert max_payload_elems("float16", 10) == 0
    with pytest.raises(ValueError, match="Partial cannot carry uint16"):
        max_payload_elems("uint16", message_type=Partial)


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
    "kind str": (frame(1, "2"), "unknown message kind '2'"),
    "unknown kind": (frame(1, 99), "unknown message kind 99"),
    "field count": (frame(*partial_items()[:-1]), "Partial frame must have 7 fields, got 6"),
    "str for int": (frame(*partial_items(group="5")), "Partial field 'group' must be int, got str"),
    "bool for int": (frame(*partial_items(group=True)), "field 'group' must be int, got bool"),
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
                       "must have dtype float16 or float32, got uint16"),
    "2-D": (frame(*partial_items(data=cbor2.CBORTag(40, [[1, 2], cbor2.CBORTag(85, bytes(8))]))),
            "must be a 1-D array, got shape (1, 2)"),
    "bad shape": (frame(*partial_items(data=cbor2.CBORTag(40, [[3], cbor2.CBORTag(85, bytes(8))]))),
                  "tag 40 shape [3] but 2 elements"),
    "bad tag 40": (frame(*partial_items(data=cbor2.CBORTag(40, [2]))), "must be tag 40 [shape, typed array]"),
    "NaN": (frame(1, 13, 1, math.nan), "Heartbeat field 'sent_s' must be finite, got nan"),
    "str for float": (frame(1, 13, 1, "0"), "field 'sent_s' must be float, got str"),
    "bad utf-8": (bytes.fromhex("8301") + b"\x0b" + b"\x62\xc3\x28", "not valid CBOR"),
    "literal": (frame(1, 8, 1, SHA, {}, "float16", "fast"), "field 'mode' must be one of 'strict', 'halo'"),
    "sha": (frame(1, 8, 1, "AB" * 32, {}, "float16", "halo"), "model_sha256 must be 64 lowercase hex"),
    "plan list": (frame(1, 8, 1, SHA, [], "float16", "halo"), "field 'plan' must be dict, got list"),
    "plan int key": (frame(1, 8, 1, SHA, {1: 2}, "float16", "halo"), "must have str keys, got int"),
    "plan tag": (frame(1, 8, 1, SHA, {"t": cbor2.CBORTag(1, 0)}, "float16", "halo"),
                 "JSON-like values (None, bool, int, float, str, list, dict), got datetime.datetime"),
    "plan typed array": (frame(1, 8, 1, SHA, {"t": cbor2.CBORTag(85, bytes(4))}, "float16", "halo"),
                         "got CBOR tag 85"),
    "plan NaN": (frame(1, 8, 1, SHA, {"x": [math.inf]}, "float16", "halo"), "non-finite float (inf)"),
    "plan deep": (frame(1, 8, 1, SHA, {"x": DEEP}, "float16", "halo"), "deeper than 64"),
    "too deep": (b"\x81" * 100 + b"\x00", "not valid CBOR"),
    "shared ref": (b"\x87\x01\x08\x01" + cbor2.dumps(SHA) + bytes.fromhex("d81ca0") + cbor2.dumps("float16")
                   + cbor2.dumps("halo"), "tag 28"),
    "empty groups": (frame(1, 3, 1, 7, 3, 0, []), "Resend: groups must not be empty"),
    "tuple of str": (frame(1, 3, 1, 7, 3, 0, [1, "2"]), "field 'groups' item 1 must be an int"),
    "load_s < 0": (frame(1, 9, 1, 10, -1.0), "load_s must be >= 0"),
    "parity float": (frame(1, 1, 1, 7, 3, 0, 0, 1, 2, 2, 1, 0, cbor2.CBORTag(84, bytes(2))),
                     "LayerInput: parity chunk 2 must be uint16 or uint32, got float16"),
    "data uint": (frame(1, 1, 1, 7, 3, 0, 0, 1, 0, 2, 1, 0, cbor2.CBORTag(69, bytes(2))),
                  "data chunk 0 must be float16 or float32, got uint16"),
    "chunk range": (frame(1, 1, 1, 7, 3, 0, 0, 1, 3, 2, 1, 0, cbor2.CBORTag(69, bytes(2))),
                    "chunk 3 out of range for n_data 2 + n_parity 1"),
    "n_parity": (frame(1, 1, 1, 7, 3, 0, 0, 1, 0, 2, 3, 0, cbor2.CBORTag(84, bytes(2))),
                 "n_parity (3) must be <= n_data (2)"),
    "n_data 0": (frame(1, 1, 1, 7, 3, 0, 0, 1, 0, 0, 0, 0, cbor2.CBORTag(84, bytes(2))), "n_data (0)"),
    "signal nonce": (frame(1, 21, "a", "b", 1, "XYZ", 1.0, "v=0", ""), "nonce must be 16 to 64 lowercase hex"),
    "signal mac": (frame(1, 21, "a", "b", 1, "0" * 32, 1.0, "v=0", "ab"), "mac must be empty or 64 lowercase"),
    "answer offer_nonce": (frame(1, 22, "a", "b", 1, "0" * 32, "nope", 1.0, "v=0", ""),
                           "nonce must be 16 to 64 lowercase hex digits, got 'nope'"),
    "parity offset": (frame(1, 1, 1, 7, 3, 0, 0, 1, 2, 2, 1, 8, cbor2.CBORTag(69, bytes(2))),
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
    data = frame(2, *partial_items()[1:])
    with pytest.raises(VersionMismatch, match="peer speaks wire version 2, this peer speaks 1") as info:
        decode(data)
    assert info.value.peer_version == 2 and isinstance(info.value, WireError)
    with pytest.raises(VersionMismatch):
        decode(frame(0, 99))  # the version is checked before the kind
    with pytest.raises(VersionMismatch, match="it says: 'version_mismatch': 'speak 2'") as info:
        decode(frame(2, 12, "version_mismatch", "speak 2"))  # ErrorReply's layout is frozen
    assert info.value.peer_version == 2


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
    (R(EXAMPLES[Partial], group="5"), "cannot encode Partial: field 'group' must be int, got str"),
    (R(EXAMPLES[Partial], step=np.int64(7)), "field 'step' must be int, got numpy.int64"),
    (R(EXAMPLES[Partial], step=-1), "field 'step' must be in [0, 4294967295], got -1"),
    (R(EXAMPLES[Partial], data=np.zeros((2, 2), np.float32)), "1-D array, got shape (2, 2)"),
    (R(EXAMPLES[Partial], data=np.zeros(2)), "dtype float16 or float32, got float64"),
    (R(EXAMPLES[Partial], data=[0.5]), "must be a numpy array, got list"),
    (R(EXAMPLES[Resend], groups=[1, 2]), "field 'groups' must be tuple, got list"),
    (R(EXAMPLES[Resend], groups=()), "Resend: groups must not be empty"),
    (R(EXAMPLES[PlanReady], load_s=1), "field 'load_s' must be float, got int"),
    (R(EXAMPLES[PlanReady], weight_bytes=2**64), "'weight_bytes' must be in [0, 18446744073709551615]"),
    (R(EXAMPLES[Plan], plan={"a": (1, 2)}), "JSON-like values"),
    (R(EXAMPLES[Plan], plan={1: 2}), "field 'plan' must have str keys, got int"),
    (R(EXAMPLES[Plan], mode="fast"), "field 'mode' must be one of 'strict', 'halo', got 'fast'"),
    (R(EXAMPLES[Plan], model_sha256="x"), "model_sha256 must be 64 lowercase hex digits"),
    (R(EXAMPLES[Heartbeat], sent_s=math.inf), "must be finite, got inf"),
    (R(EXAMPLES[LayerInput], chunk=2), "parity chunk 2 must be uint16 or uint32"),
    (R(EXAMPLES[Reset], version=2), "cannot encode Reset of version 2"),
    (object(), "cannot encode object: not a registered message kind"),
], ids=str)
def test_encode_refuses_invalid_messages(msg: Any, message: str) -> None:
    with pytest.raises(WireError) as info:
        encode(msg)
    assert message in str(info.value)


def test_wire_version_is_one() -> None:
    assert WIRE_VERSION == 1 and all(m.version == 1 for m in EXAMPLES.values())


def _write_golden() -> None:  # pragma: no cover - run by hand
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for cls, msg in EXAMPLES.items():
        hexed = encode(msg).hex()
        golden_path(cls).write_text("\n".join(hexed[i:i + 64] for i in range(0, len(hexed), 64)) + "\n")
        print(golden_path(cls))


if __name__ == "__main__":  # pragma: no cover
    _write_golden()
