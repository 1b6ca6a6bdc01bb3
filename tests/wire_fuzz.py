"""Seeded fuzzing of wire frames: shared by ``tests/test_fuzz_frames.py`` and ``benchmarks/fuzz_frames.py``.

:class:`FrameFuzzer` draws frames from one seeded generator, each from one strategy:

* byte mutations of the golden frames (``tests/data/wire/*.hex``, one per message kind): bit flips,
  byte overwrites, insertions, deletions, truncations, splices of two frames, random tails;
* ``crafted``: a golden frame decoded, one of its items (any depth: the version, the kind, a field,
  an item inside the plan body or inside a tag) replaced by a hostile CBOR value, encoded again.
  Hostile values: bignums (tags 2 and 3, up to 2,000 bytes), integers at and beyond the 32- and
  64-bit edges, non-finite floats, nesting 40 to 130 deep, tags that cbor2 gives a meaning
  (dates, decimals, sets, regular expressions, ...) and unknown ones, tag-40 arrays whose shape
  does not match their data or has up to 70 dimensions, typed arrays of every RFC 8746 tag and odd
  lengths, maps with non-string keys, long strings;
* ``raw``: CBOR heads written by hand: huge declared lengths, indefinite-length items, reserved
  additional-information values, stray breaks, deep tag chains, after a valid frame header.

Tests use cbor2 directly (the import contract binds only ``halo_p2p``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

__all__ = ["GOLDEN", "STRATEGIES", "FrameFuzzer", "golden_frames", "issue_examples"]

GOLDEN = Path(__file__).parent / "data" / "wire"

STRATEGIES = ("flip", "overwrite", "insert", "delete", "truncate", "splice", "tail", "crafted", "raw")

_BUILTIN_TAGS = (0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)
_TYPED_TAGS = tuple(range(64, 88))    # every RFC 8746 typed-array tag, ours and not
_DIMS = (0, 1, 2, 3, 7, 2**31, 2**32 - 1, 2**32, 2**64 - 1, -1)


def golden_frames() -> dict[str, bytes]:
    """Kind name (the file's stem, e.g. ``"partial"``) -> its golden frame."""
    return {p.stem: bytes.fromhex("".join(p.read_text().split())) for p in sorted(GOLDEN.glob("*.hex"))}


def _bignum(n_bytes: int, negative: bool = False) -> cbor2.CBORTag:
    return cbor2.CBORTag(3 if negative else 2, b"\x01" + b"\x00" * (n_bytes - 1))


def issue_examples() -> dict[str, bytes]:
    """The frames of issue #12 (wire version 1, as filed), and the same attacks in this version."""
    partial = cbor2.loads(golden_frames()["partial"])      # [2, 2, session, ..., norms, data]

    def with_data(data: Any) -> bytes:
        return cbor2.dumps([*partial[:-1], data])

    return {
        "issue: tag-40 shape": bytes.fromhex("890102010101000100d8288284011affffffff1affffffff00d85540"),
        "issue: [1,10,2(h'ff'*1800)]": cbor2.dumps([1, 10, cbor2.CBORTag(2, b"\xff" * 1800)]),
        "issue: [1,13,1,2(h'01'+h'00'*128)]": cbor2.dumps([1, 13, 1, _bignum(129)]),
        "Reset of a 1800-byte bignum": cbor2.dumps([2, 10, cbor2.CBORTag(2, b"\xff" * 1800)]),
        "Heartbeat sent_s bignum": cbor2.dumps([2, 13, 1, _bignum(129)]),
        "Heartbeat seq bignum": cbor2.dumps([2, 13, _bignum(129), 1.0]),
        "version bignum": cbor2.dumps([cbor2.CBORTag(2, b"\xff" * 1800), 11, "bye"]),
        "kind bignum": cbor2.dumps([2, cbor2.CBORTag(3, b"\xff" * 1800), "bye"]),
        "v1 Bye quoting a bignum": cbor2.dumps([1, 11, cbor2.CBORTag(2, b"\xff" * 1800)]),
        "Resend chunk bignum": cbor2.dumps([2, 3, 1, 7, 3, 0, [cbor2.CBORTag(2, b"\xff" * 1800)]]),
        "tag-40 shape of 2**64 elements with no data": with_data(
            cbor2.CBORTag(40, [[1, 2**32 - 1, 2**32 - 1, 0], cbor2.CBORTag(85, b"")])),
        "tag-40 shape that does not match its data": with_data(cbor2.CBORTag(40, [[3], cbor2.CBORTag(85, bytes(8))])),
        "tag-40 of 65 dimensions": with_data(cbor2.CBORTag(40, [[1] * 65, cbor2.CBORTag(85, bytes(4))])),
        "tag-40 of 64 dimensions": with_data(cbor2.CBORTag(40, [[1] * 64, cbor2.CBORTag(85, bytes(4))])),
        "tag-40 inside tag-40": with_data(cbor2.CBORTag(40, [[1], cbor2.CBORTag(40, [[1], cbor2.CBORTag(85, b"")])])),
    }


def _paths(obj: Any, path: tuple[Any, ...], out: list[tuple[Any, ...]]) -> None:
    out.append(path)
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _paths(x, (*path, i), out)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _paths(x, (*path, k), out)
    elif isinstance(obj, cbor2.CBORTag):
        _paths(obj.value, (*path, None), out)


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``obj`` with the item at ``path`` replaced by ``value`` (``None`` steps into a tag)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, cbor2.CBORTag):
        return cbor2.CBORTag(obj.tag, _replace(obj.value, rest, value))
    new = list(obj) if isinstance(obj, (list, tuple)) else dict(obj)
    new[head] = _replace(obj[head], rest, value)
    return new


def _head(major: int, arg: int) -> bytes:
    """A CBOR initial byte and argument in the shortest form (RFC 8949 §3)."""
    m = major << 5
    if arg < 24:
        return bytes([m | arg])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if arg < 1 << (8 * struct.calcsize(fmt)):
            return bytes([m | info]) + struct.pack(fmt, arg)
    raise ValueError(arg)


class FrameFuzzer:
    """Frames drawn from one seeded generator (the same seed gives the same frames).

    Args:
        seed: the generator's seed.
        seeds: the frames to mutate (default: every golden frame).
    """

    def __init__(self, seed: int, seeds: dict[str, bytes] | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.seeds = list((seeds or golden_frames()).values())
        self.items = [cbor2.loads(f) for f in self.seeds]
        self.paths = []
        for items in self.items:
            found: list[tuple[Any, ...]] = []
            _paths(items, (), found)
            self.paths.append(found)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while True:
            yield self.frame()

    def _int(self, high: int) -> int:
        return int(self.rng.integers(high))

    def _bytes(self, n: int) -> bytes:
        return self.rng.bytes(n)

    def frame(self) -> tuple[str, bytes]:
        """One ``(strategy, frame)``."""
        strategy = STRATEGIES[self._int(len(STRATEGIES))]
        k = self._int(len(self.seeds))
        data = bytearray(self.seeds[k])
        n = len(data)
        if strategy == "flip":
            for _ in range(1 + self._int(4)):
                data[self._int(n)] ^= 1 << self._int(8)
        elif strategy == "overwrite":
            for _ in range(1 + self._int(4)):
                data[self._int(n)] = self._int(256)
        elif strategy == "insert":
            at = self._int(n + 1)
            data[at:at] = self._bytes(1 + self._int(8))
        elif strategy == "delete":
            at = self._int(n)
            del data[at:at + 1 + self._int(8)]
        elif strategy == "truncate":
            del data[self._int(n):]
        elif strategy == "splice":
            other = self.seeds[self._int(len(self.seeds))]
            data = data[:self._int(n + 1)] + other[self._int(len(other) + 1):]
        elif strategy == "tail":
            data += self._bytes(1 + self._int(64))
        elif strategy == "crafted":
            return strategy, self._crafted(k)
        else:
            return strategy, self._raw()
        return strategy, bytes(data)

    def _crafted(self, k: int) -> bytes:
        paths = self.paths[k]
        path = paths[self._int(len(paths))]
        return cbor2.dumps(_replace(self.items[k], path, self.hostile()))

    def hostile(self, depth: int = 0) -> Any:
        """One hostile CBOR value (Python objects for :func:`cbor2.dumps`)."""
        r = self._int(14 if depth < 2 else 11)
        if r == 0:                                               # bignum, any length
            return cbor2.CBORTag(2 + self._int(2), self._bytes(self._int(2001)))
        if r == 1:                                               # bignum that fits, with leading zeros
            return cbor2.CBORTag(2 + self._int(2), b"\x00" * self._int(4) + self._bytes(self._int(9)))
        if r == 2:
            edges = (0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -1, -(2**32), -(2**63), -(2**64))
            return edges[self._int(len(edges))]
        if r == 3:
            floats = (math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 65504.0, 1.5)
            return floats[self._int(len(floats))]
        if r == 4:                                               # deep nesting
            deep: Any = self._int(3)
            for _ in range(40 + self._int(91)):
                deep = [deep] if self._int(2) else {"k": deep}
            return deep
        if r == 5:                                               # tags with a meaning in cbor2, and unknown ones
            tag = _BUILTIN_TAGS[self._int(len(_BUILTIN_TAGS))] if self._int(3) else int(self.rng.integers(2**63))
            contents = ("(a*)*b", "2020-13-45T99:99:99Z", [1, 0], [2**64 - 1, 2**64 - 1], b"\x00" * 17, -5, 1e300,
                        [[1], [2]], "Content-Type: text/plain\n\nx")
            return cbor2.CBORTag(tag, contents[self._int(len(contents))])
        if r == 6:                                               # tag 40 with a bad or huge shape
            ndim = self._int(71)
            shape = [_DIMS[self._int(len(_DIMS))] if self._int(4) == 0 else 1 + self._int(3) for _ in range(ndim)]
            inner_tag = _TYPED_TAGS[self._int(len(_TYPED_TAGS))] if self._int(8) else 40
            inner = cbor2.CBORTag(inner_tag, self._bytes(self._int(41)))
            return cbor2.CBORTag(40, [shape, inner] if self._int(8) else [shape])
        if r == 7:                                               # a typed array of any tag and length
            return cbor2.CBORTag(_TYPED_TAGS[self._int(len(_TYPED_TAGS))], self._bytes(self._int(67)))
        if r == 8:                                               # maps with keys that are not strings
            keys: tuple[Any, ...] = (1, -1, 1.5, b"k", (1, 2), True, None)
            return {keys[self._int(len(keys))]: self.hostile(depth + 1) if depth < 2 else 0}
        if r == 9:
            texts = ("", "x" * 10_000, "\u0000\ufffd", "9" * 4301)
            return texts[self._int(len(texts))]
        if r == 10:
            others = (None, True, False, cbor2.undefined, cbor2.CBORSimpleValue(99), b"", self._bytes(33))
            return others[self._int(len(others))]
        if r == 11:                                              # a short list of hostile values
            return [self.hostile(depth + 1) for _ in range(self._int(4))]
        if r == 12:
            return {"version": self.hostile(depth + 1), "k": self.hostile(depth + 1)}
        return cbor2.CBORTag(2, self._bytes(1 + self._int(16)))

    def _raw(self) -> bytes:
        """A valid frame header followed by hand-written CBOR heads."""
        header = (b"", b"\x8c\x02\x02", b"\x83\x02\x0b", b"\x9f\x02\x08", b"\x87\x02\x08\x01")[self._int(5)]
        parts = [header]
        for _ in range(1 + self._int(6)):
            r = self._int(8)
            if r == 0:                                           # a huge declared length
                parts.append(_head(self._int(8) % 6, int(self.rng.integers(2**63)) * 2))
            elif r == 1:
                parts.append(bytes([0x1c + self._int(3) + 32 * self._int(8)]))   # reserved additional info
            elif r == 2:
                parts.append(b"\x9f" * self._int(200) + b"\xff" * self._int(200))   # indefinite arrays
            elif r == 3:
                parts.append(b"\x5f" + _head(3, 2) + b"ab" + b"\xff")   # text chunk in an indefinite byte string
            elif r == 4:
                parts.append(b"\xd8\x28" * self._int(300) + b"\x00")    # tag chains
            elif r == 5:
                parts.append(b"\xff")                                    # a stray break
            elif r == 6:
                parts.append(b"\xc2" + _head(2, 2000) + self._bytes(2000))   # a raw bignum
            else:
                parts.append(self._bytes(self._int(32)))
        return b"".join(parts)
