"""Frames: messages to and from CBOR bytes (RFC 8949), arrays as RFC 8746 typed arrays.

A frame is one CBOR array ``[version, KIND, *fields]`` (declaration order, ``version`` excluded):
shortest-form integers, float64 floats, arrays for tuples, maps for dicts, and numpy arrays as byte
strings under an RFC 8746 little-endian typed-array tag (64 uint8, 84 float16, 85 float32,
69 uint16, 70 uint32). See ``docs/wire-protocol.md``. The only module that imports :mod:`cbor2`; pure.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import sys
import typing
from collections.abc import Callable
from typing import Any

import cbor2
import numpy as np

from halo_p2p.errors import DecodeError, HaloError, VersionMismatch, WireError
from halo_p2p.wire.messages import (
    REGISTRY,
    WIRE_VERSION,
    Bye,
    Dtypes,
    ErrorReply,
    MaxValue,
    Message,
)

__all__ = ["MAX_FRAME_BYTES", "SCTP_USERDATA_BYTES", "TYPED_ARRAY_TAGS", "decode", "encode", "payload_budget"]

SCTP_USERDATA_BYTES = 1160
"""aiortc's SCTP ``USERDATA_MAX_LENGTH``: the largest message that travels as one packet."""

MAX_FRAME_BYTES = 1 << 20
"""The longest frame :func:`decode` parses (bytes): four times the largest message a data channel
carries (256 KiB), so every length inside a frame is bounded before anything is parsed."""

TYPED_ARRAY_TAGS: dict[str, int] = {"uint8": 64, "float16": 84, "float32": 85, "uint16": 69, "uint32": 70}
"""numpy dtype name -> the RFC 8746 little-endian typed-array tag used to encode it."""

# Decoded tags: ours, and the big-endian twins of the multi-byte ones (RFC 8746: endianness bit 4 cleared).
_TAG_DTYPES: dict[int, np.dtype[Any]] = {tag - big * 4: np.dtype(name).newbyteorder(">" if big else "<")
                                         for name, tag in TYPED_ARRAY_TAGS.items() for big in (0, 1)
                                         if not (big and np.dtype(name).itemsize == 1)}
_LE_DTYPES = {name: _TAG_DTYPES[tag] for name, tag in TYPED_ARRAY_TAGS.items()}
_NDARRAY_TAG = 40  # RFC 8746 multi-dimensional array, row-major: 40([shape, typed array])
_MAX_NDIM = 8  # dimensions of a tag-40 shape (numpy's own limit is 64; a field takes only 1)
_MAX_DEPTH = 64  # nesting of a map field (the plan body)
_BIGNUM_TAGS = (2, 3)  # RFC 8949 §3.4.3 unsigned / negative bignum: a byte string of any length
_FROZEN_KINDS = (Bye.KIND, ErrorReply.KIND)  # the same layout in every version
_NATIVE = "<" if sys.byteorder == "little" else ">"
_LITTLE = ("<", "=") if _NATIVE == "<" else ("<",)  # dtype.byteorder values meaning little-endian


class _Invalid(Exception):
    """A field value breaks its schema; the message says how (e.g. "must be int, got str")."""


def _name(value: Any) -> str:
    if isinstance(value, cbor2.CBORTag):
        if value.tag in _BIGNUM_TAGS and type(value.value) is bytes:
            return f"a bignum of {len(value.value)} bytes (CBOR tag {value.tag}; integers are limited to 64 bits)"
        return f"CBOR tag {value.tag}"
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# --- per-type field converters: (encode_fn, decode_fn), each raising _Invalid ----------------


def _uint_codec(max_value: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def check(v: Any) -> Any:
        if type(v) is not int:
            raise _Invalid(f"must be int, got {_name(v)}")
        if not 0 <= v <= max_value:
            raise _Invalid(f"must be in [0, {max_value}], got {v}")
        return v

    return check, check


def _float_encode(v: Any) -> Any:
    if type(v) is not float:
        raise _Invalid(f"must be float, got {_name(v)}")
    if not math.isfinite(v):
        raise _Invalid(f"must be finite, got {v}")
    return v


def _float_decode(v: Any) -> Any:
    return _float_encode(float(v) if type(v) is int else v)  # other encoders may send 0 for 0.0


def _str_codec(choices: tuple[str, ...] | None) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def check(v: Any) -> Any:
        if type(v) is not str:
            raise _Invalid(f"must be str, got {_name(v)}")
        if choices is not None and v not in choices:
            raise _Invalid(f"must be one of {', '.join(map(repr, choices))}, got {v[:80]!r}")
        return v

    return check, check


def _enum_codec(kind: type[enum.Enum]) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """A ``StrEnum`` field: its value string on the wire, the member once decoded (encode also
    takes the plain string)."""
    members = {m.value: m for m in kind}
    choices = ", ".join(map(repr, members))

    def check(v: Any) -> Any:
        if not isinstance(v, str):
            raise _Invalid(f"must be str, got {_name(v)}")
        m = members.get(v)
        if m is None:
            raise _Invalid(f"must be one of {choices}, got {v[:80]!r}")
        return m

    return (lambda v: check(v).value), check


def _body_codec(kind: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """A typed body (``to_dict()`` / ``from_dict()``, e.g. :class:`~halo_p2p.plan.PlanBody`): its
    JSON-like map on the wire; ``from_dict``'s validation errors become ``_Invalid``."""

    def encode_body(v: Any) -> Any:
        if type(v) is not kind:
            raise _Invalid(f"must be {kind.__name__}, got {_name(v)}")
        return _dict_check(v.to_dict())

    def decode_body(v: Any) -> Any:
        try:
            return kind.from_dict(_dict_check(v))
        except HaloError as exc:
            raise _Invalid(f"is invalid: {exc.problem}") from None

    return encode_body, decode_body


def _uint_tuple_encode(v: Any) -> Any:
    return _uint_tuple_decode(v, (tuple,))


def _uint_tuple_decode(v: Any, types: tuple[type, ...] = (list, tuple)) -> Any:
    if type(v) not in types:
        raise _Invalid(f"must be {'tuple' if len(types) == 1 else 'an array of int'}, got {_name(v)}")
    for i, x in enumerate(v):
        if type(x) is not int or not 0 <= x < 2**32:
            raise _Invalid(f"item {i} must be an int in [0, {2**32 - 1}], got {x if type(x) is int else _name(x)}")
    return tuple(v)


def _json_check(v: Any, depth: int = 0) -> None:
    """Raise _Invalid unless ``v`` is JSON-like: None, bool, int, finite float, str, list, dict[str]."""
    if depth > _MAX_DEPTH:
        raise _Invalid(f"nests deeper than {_MAX_DEPTH} levels")
    t = type(v)
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise _Invalid(f"must have str keys, got {_name(k)}")
            _json_check(x, depth + 1)
    elif t is list:
        for x in v:
            _json_check(x, depth + 1)
    elif t is int:
        if not -(2**64) <= v < 2**64:
            raise _Invalid("holds an int outside the 64-bit range")
    elif t is float:
        if not math.isfinite(v):
            raise _Invalid(f"holds a non-finite float ({v})")
    elif v is not None and t not in (bool, str):
        raise _Invalid(f"must hold only JSON-like values (None, bool, int, float, str, list, dict), "
                       f"got {_name(v)}")


def _dict_check(v: Any) -> Any:
    if type(v) is not dict:
        raise _Invalid(f"must be dict, got {_name(v)}")
    _json_check(v)
    return v


def _array_codec(dtypes: tuple[str, ...]) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    allowed = " or ".join(dtypes)
    # (kind, itemsize) is read in C; dtype.name is computed in Python and costs microseconds.
    tags = {(np.dtype(n).kind, np.dtype(n).itemsize): (TYPED_ARRAY_TAGS[n], _LE_DTYPES[n]) for n in dtypes}

    def encode_array(v: Any) -> Any:
        if not isinstance(v, np.ndarray):
            raise _Invalid(f"must be a numpy array, got {_name(v)}")
        if v.ndim != 1:
            raise _Invalid(f"must be a 1-D array, got shape {v.shape}")
        dt = v.dtype
        tag_le = tags.get((dt.kind, dt.itemsize))
        if tag_le is None:
            raise _Invalid(f"must have dtype {allowed}, got {dt}")
        if dt.byteorder not in _LITTLE and dt.byteorder != "|":
            v = v.astype(tag_le[1])
        return cbor2.CBORTag(tag_le[0], v.tobytes())

    def decode_array(v: Any) -> Any:
        arr = _ndarray_from_cbor(v)
        if arr.ndim != 1:
            raise _Invalid(f"must be a 1-D array, got shape {arr.shape}")
        if (arr.dtype.kind, arr.dtype.itemsize) not in tags:
            raise _Invalid(f"must have dtype {allowed}, got {arr.dtype}")
        return arr

    return encode_array, decode_array


def _ndarray_from_cbor(v: Any) -> np.ndarray:
    """A read-only array from an RFC 8746 typed array, or from tag 40 ``[shape, typed array]``.

    A tag-40 shape is checked before numpy sees it: at most :data:`_MAX_NDIM` dimensions, each an
    int below 2**32, whose product (a Python int: no overflow) equals the typed array's length.
    """
    if not isinstance(v, cbor2.CBORTag):
        raise _Invalid(f"must be an RFC 8746 typed array, got {_name(v)}")
    if v.tag == _NDARRAY_TAG:
        # cbor2 decodes a tag's content immutably: arrays inside tags arrive as tuples.
        if type(v.value) not in (list, tuple) or len(v.value) != 2 or type(v.value[0]) not in (list, tuple):
            raise _Invalid("must be tag 40 [shape, typed array] (RFC 8746)")
        dims, inner = v.value
        if not 1 <= len(dims) <= _MAX_NDIM:
            raise _Invalid(f"has a tag 40 shape of {len(dims)} dimensions (1 to {_MAX_NDIM} accepted)")
        shape = list(dims)
        if not all(type(d) is int and 0 <= d < 2**32 for d in shape):
            shown = ", ".join(str(d) if type(d) is int else _name(d) for d in shape)
            raise _Invalid(f"has an invalid tag 40 shape [{shown}]")
        if not isinstance(inner, cbor2.CBORTag) or inner.tag == _NDARRAY_TAG:
            raise _Invalid(f"must be tag 40 [shape, typed array] (RFC 8746), got {_name(inner)} for the typed array")
        if math.prod(max(d, 1) for d in shape) > 2**32:   # numpy refuses such a shape even with a 0 in it
            raise _Invalid(f"has a tag 40 shape {shape} of more than 2**32 elements")
        flat = _ndarray_from_cbor(inner)
        if math.prod(shape) != flat.size:
            raise _Invalid(f"has tag 40 shape {shape} but {flat.size} elements")
        return flat.reshape(shape)
    dtype = _TAG_DTYPES.get(v.tag)
    if dtype is None:
        raise _Invalid(f"must be an RFC 8746 typed array (uint8, float16, float32, uint16, uint32), got tag {v.tag}")
    if type(v.value) is not bytes:
        raise _Invalid(f"typed array (tag {v.tag}) must wrap a byte string, got {_name(v.value)}")
    if len(v.value) % dtype.itemsize:
        raise _Invalid(f"typed array (tag {v.tag}) has {len(v.value)} bytes, "
                       f"not a multiple of {dtype.itemsize}")
    arr = np.frombuffer(v.value, dtype)  # read-only: a view of the immutable bytes
    if dtype.byteorder not in (_NATIVE, "|"):   # "|": one-byte items have no byte order
        arr = arr.astype(dtype.newbyteorder("="))
        arr.flags.writeable = False
    return arr


def _split_hint(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``Annotated[T, m1, m2]`` -> ``(T, (m1, m2))``; any other hint -> ``(hint, ())``."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *meta = typing.get_args(hint)
        return base, tuple(meta)
    return hint, ()


def _meta(meta: tuple[Any, ...], kind: type[MaxValue] | type[Dtypes], default: Any) -> Any:
    """The value of the first ``kind`` item of ``Annotated`` metadata, else ``default``."""
    return next((m.value for m in meta if isinstance(m, kind)), default)


def _field_codec(hint: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The (encode, decode) converters for one field annotation (see :mod:`.messages`)."""
    hint, meta = _split_hint(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return _uint_codec(_meta(meta, MaxValue, 2**32 - 1))
    if hint is float:
        return _float_encode, _float_decode
    if hint is str:
        return _str_codec(None)
    if origin is typing.Literal and all(type(a) is str for a in args):
        return _str_codec(tuple(args))
    if isinstance(hint, type) and issubclass(hint, enum.Enum) and all(type(m.value) is str for m in hint):
        return _enum_codec(hint)
    if isinstance(hint, type) and all(callable(getattr(hint, name, None)) for name in ("from_dict", "to_dict")):
        return _body_codec(hint)
    if origin is tuple and args == (int, ...):
        return _uint_tuple_encode, _uint_tuple_decode
    if origin is dict and args[:1] == (str,):
        return _dict_check, _dict_check
    if hint is np.ndarray:
        return _array_codec(_meta(meta, Dtypes, tuple(TYPED_ARRAY_TAGS)))
    raise TypeError(f"unsupported wire field type {hint!r}")


def _field_names(cls: type) -> list[str]:
    """The wire fields of a message class, in order, without ``version``."""
    return [f.name for f in dataclasses.fields(cls) if f.name != "version"]


def _schema(cls: type) -> tuple[tuple[str, Callable[[Any], Any], Callable[[Any], Any]], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((name, *_field_codec(hints[name])) for name in _field_names(cls))


_SCHEMAS = {cls: _schema(cls) for cls in REGISTRY.values()}  # class -> ((field, encode, decode), ...)


# --- public API ------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Encode a message as one CBOR frame ``[version, KIND, *fields]`` (RFC 8949, RFC 8746).

    Args:
        msg: any message of :data:`~halo_p2p.wire.messages.Message`. Arrays must be 1-D numpy
            arrays of the field's dtypes (any byte order; sent little-endian).

    Returns:
        The frame. A :class:`Partial` of 576 elements in Q8_0 (612 payload bytes) takes about 630 bytes.

    Raises:
        WireError: the message is not a registered kind, is of another version, or a field
            breaks the schema (e.g. "cannot encode Partial: field 'chunk' must be int, got str").
    """
    cls = type(msg)
    schema = _SCHEMAS.get(cls)
    if schema is None:
        raise WireError(f"cannot encode {_name(msg)}: not a registered message kind")
    if msg.version != WIRE_VERSION:
        raise WireError(f"cannot encode {cls.__name__} of version {msg.version!r}: "
                        f"this peer speaks wire version {WIRE_VERSION}")
    items: list[Any] = [WIRE_VERSION, cls.KIND]
    for name, enc, _ in schema:
        try:
            items.append(enc(getattr(msg, name)))
        except _Invalid as exc:
            raise WireError(f"cannot encode {cls.__name__}: field {name!r} {exc}") from None
    problem = msg.check()
    if problem is not None:
        raise WireError(f"cannot encode {cls.__name__}: {problem}")
    return cbor2.dumps(items)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode one frame produced by :func:`encode` (or by any RFC 8949 encoder).

    Arrays come back as **read-only views** of the decoded byte string (zero-copy; a read-only
    converted copy for big-endian data), in native byte order, of the field's dtype; call
    ``.copy()`` before writing. Tag 40 ``[shape, typed array]`` is accepted where the shape is 1-D.

    Any bytes are safe to pass: every failure is one of the two errors below, and the work is
    bounded by the frame's length (at most :data:`MAX_FRAME_BYTES`). Integers are bounded before
    any conversion: a bignum (tags 2 and 3) of more than 64 bits stays an opaque tag that every
    field refuses; other tags with a built-in meaning in cbor2 (dates, decimals, sets, regular
    expressions, ...) are not interpreted; map keys must be strings; nesting is at most 68 deep;
    a tag-40 shape has at most 8 dimensions and must match its data.

    Args:
        data: exactly one CBOR data item; trailing bytes are an error.

    Returns:
        The message, with every field checked against its schema and cross-field rules.

    Raises:
        VersionMismatch: the frame's version is not :data:`WIRE_VERSION` (``peer_version`` set;
            for a Bye or ErrorReply, whose layout never changes, the text quotes its fields).
        DecodeError: longer than :data:`MAX_FRAME_BYTES`, not CBOR, truncated, trailing bytes,
            not an array, unknown KIND, wrong field count, or a field of the wrong type or range
            (the message names the field).
    """
    if type(data) is not bytes:
        try:
            data = memoryview(data).tobytes()  # a memoryview's len() may count items, not bytes
        except TypeError:
            raise DecodeError(f"a frame must be bytes, got {_name(data)}") from None
    if len(data) > MAX_FRAME_BYTES:
        raise DecodeError(f"frame of {len(data)} bytes is longer than {MAX_FRAME_BYTES} bytes")
    buf = io.BytesIO(data)
    try:
        items = cbor2.CBORDecoder(buf, semantic_decoders=_SEMANTIC, max_depth=_MAX_DEPTH + 4,
                                  allow_duplicate_keys=False, strict_hashable_types=True).decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, and ValueError etc. from built-in tags
        raise DecodeError(f"frame of {len(data)} bytes is not valid CBOR: {exc}") from exc
    if buf.tell() != len(data):
        raise DecodeError(f"frame has {len(data) - buf.tell()} trailing bytes after the CBOR item")
    try:
        return _message(items)
    except WireError:
        raise
    except Exception as exc:   # a safety net: every rule above is checked explicitly first
        raise DecodeError(f"frame of {len(data)} bytes cannot be decoded: {type(exc).__name__}") from exc


def _message(items: Any) -> Message:
    """The message of a decoded frame ``[version, KIND, *fields]``; raises DecodeError or VersionMismatch."""
    if type(items) is not list or len(items) < 2:
        raise DecodeError(f"frame must be a CBOR array [version, kind, ...], got {_name(items)}"
                          + (f" of {len(items)} items" if type(items) is list else ""))
    version, kind = items[0], items[1]
    if type(version) is not int:
        raise DecodeError(f"frame version must be int, got {_name(version)}")
    if version != WIRE_VERSION:
        said = ""
        if kind in _FROZEN_KINDS and len(items) == 2 + len(_SCHEMAS[REGISTRY[kind]]):
            said = "; it says: " + ": ".join(_quote(x) for x in items[2:])  # Bye, ErrorReply
        raise VersionMismatch(f"peer speaks wire version {version}, this peer speaks {WIRE_VERSION}{said}",
                              "upgrade the older peer", peer_version=version)
    cls = REGISTRY.get(kind) if type(kind) is int else None
    if cls is None:
        raise DecodeError(f"unknown message kind {kind if type(kind) is int else _quote(kind, 40)}")
    schema = _SCHEMAS[cls]
    if len(items) != len(schema) + 2:
        raise DecodeError(f"{cls.__name__} frame must have {len(schema)} fields, got {len(items) - 2}")
    kwargs: dict[str, Any] = {}
    for (name, _, dec), value in zip(schema, items[2:], strict=True):
        try:
            kwargs[name] = dec(value)
        except _Invalid as exc:
            raise DecodeError(f"{cls.__name__} field {name!r} {exc}") from None
        except Exception as exc:   # a safety net: the converters check types and ranges first
            raise DecodeError(f"{cls.__name__} field {name!r} cannot be decoded: {type(exc).__name__}") from exc
    msg = cls(**kwargs)
    problem = msg.check()
    if problem is not None:
        raise DecodeError(f"{cls.__name__}: {problem}")
    return msg


def _quote(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters; a text string is cut before quoting."""
    if type(value) is str:
        return repr(value[:limit])[:limit]
    if type(value) in (int, float, bool) or value is None:
        return repr(value)
    return _name(value)


def payload_budget(template: Message, budget_bytes: int = SCTP_USERDATA_BYTES) -> int:
    """Payload bytes a frame like ``template`` can carry within ``budget_bytes``.

    ``template`` is the message with its real header fields and an empty ``data`` array; the
    integer fields that vary between the chunks of one vector (``chunk``, ``n_data``,
    ``n_parity``, ``offset``) are counted at their widest (3 bytes each, 5 for ``offset``), and
    the payload's byte-string head at 3 bytes, so every chunk of the vector fits.

    Raises:
        WireError: ``template`` cannot be encoded.
    """
    fields = {f.name for f in dataclasses.fields(template)}
    small: dict[str, Any] = {k: v for k, v in (("chunk", 0), ("n_data", 1), ("n_parity", 0), ("offset", 0))
                             if k in fields}
    frame = encode(dataclasses.replace(template, **small))
    widen = sum(4 if k == "offset" else 2 for k in small)           # 1-byte ints -> 3 bytes (offset: 5)
    return budget_bytes - len(frame) - widen - 2                    # byte-string head: 1 -> 3 bytes


def _head_bytes(value: int) -> int:
    """Bytes of a CBOR initial byte plus argument for an unsigned ``value`` (RFC 8949 §3)."""
    return 1 if value < 24 else 2 if value < 2**8 else 3 if value < 2**16 else 5 if value < 2**32 else 9


def _no_sharing(*_: Any) -> Any:
    raise ValueError("shared references (tags 28, 29) are not allowed")  # cycles, exponential DAGs


def _bignum(tag: int) -> Callable[[Any, bool], Any]:
    """Tag 2 / 3 (RFC 8949 §3.4.3): an int if it fits 64 bits, else the tag itself, unconverted
    (every field refuses it: no unbounded int is ever built, printed or compared)."""

    def decode_bignum(value: Any, immutable: bool) -> Any:
        if type(value) is bytes:
            digits = value.lstrip(b"\0")
            if len(digits) <= 8:
                n = int.from_bytes(digits, "big")
                return n if tag == 2 else -1 - n
        return cbor2.CBORTag(tag, value)

    return decode_bignum


def _opaque(tag: int) -> Callable[[Any, bool], Any]:
    """The tag as a plain :class:`cbor2.CBORTag`: cbor2's built-in meaning is not applied."""
    return lambda value, immutable: cbor2.CBORTag(tag, value)


# cbor2's built-in tags (dates 0/1/100/1004, decimal 4, bigfloat 5, string references 25/256,
# rational 30, regex 35, MIME 36, UUID 37, IP 52/54/260/261, set 258, ...): none is part of
# the protocol, so none builds an object; the schema then refuses the tag by name.
_SEMANTIC: dict[int, Callable[..., Any]] = {
    **{tag: _opaque(tag) for tag in (0, 1, 4, 5, 25, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000)},
    **{tag: _bignum(tag) for tag in _BIGNUM_TAGS},
    **dict.fromkeys((28, 29), _no_sharing),
}
