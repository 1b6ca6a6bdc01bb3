"""Activation formats on the wire: float32, float16 and Q8_0 (8-bit blocks with a float16 scale).

An activation vector (a layer input, or a worker's summed partial) travels as a payload of one
:class:`WireFormat`. A format cuts elements into *units*: one element for the float formats, a
block of :data:`Q8_BLOCK` elements for ``q8_0``. Chunks of a vector start on unit boundaries,
so each chunk encodes and decodes alone.

``q8_0`` is GGML's ``block_q8_0`` (ggml ``ggml-common.h``; the format distributed-llama's ``Q80``
sync buffers use), bit for bit as ggml's ``quantize_row_q8_0_ref``: per block of 32 elements,
``d = max|x| / 127`` stored as float16 little-endian, then 32 ``int8`` values
``q = roundf(x / d)`` (with the float32 ``d``); ``x ≈ d * q``. A block is 34 bytes, 1.0625 bytes
per element against 2 for float16. The last block of a chunk may hold fewer than 32 elements
(it is padded with zeros, which quantize exactly). Non-finite inputs are refused on encode.

Pure: numpy only, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from halo_p2p.errors import WireError

__all__ = ["FORMATS", "Q8_BLOCK", "WireFormat", "wire_format"]

Q8_BLOCK: Final = 32
"""Elements per Q8_0 block (GGML ``QK8_0``)."""

_Q8_DTYPE: Final = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])   # 34 bytes, as block_q8_0


@dataclass(frozen=True, slots=True)
class WireFormat:
    """How one activation vector is encoded on the wire.

    Attributes:
        name: ``"float32"``, ``"float16"`` or ``"q8_0"`` (the :class:`~halo_p2p.wire.messages.Plan`'s
            ``wire_dtype``).
        unit_elems: elements per unit (1, or 32 for ``q8_0``); chunks start on unit boundaries.
        unit_bytes: bytes per unit on the wire (4, 2, or 34).
        dtype: numpy dtype of the payload array in a frame (float32, float16, or uint8 for
            ``q8_0`` blocks).
    """

    name: str
    unit_elems: int
    unit_bytes: int
    dtype: np.dtype[Any]

    @property
    def lossless(self) -> bool:
        """True for float32: a float32 activation crosses the wire bit-exactly."""
        return self.name == "float32"

    def units(self, n_elems: int) -> int:
        """Units needed for ``n_elems`` elements (``ceil(n_elems / unit_elems)``)."""
        return -(-n_elems // self.unit_elems)

    def payload_size(self, n_elems: int) -> int:
        """Length (in ``dtype`` items) of the payload of ``n_elems`` elements."""
        units = self.units(n_elems)
        return units * self.unit_bytes if self.dtype == np.uint8 else units

    def pack(self, x: np.ndarray) -> np.ndarray:
        """Encode 1-D float32 ``x`` as a payload array of :attr:`dtype`.

        Raises:
            WireError: ``x`` holds a NaN or infinity (``q8_0`` only: the float formats carry them).
        """
        if self.name == "float32":
            return np.ascontiguousarray(x, dtype=np.float32)
        if self.name == "float16":
            return np.asarray(x, dtype=np.float32).astype(np.float16)
        return _q8_pack(np.asarray(x, dtype=np.float32))

    def unpack(self, payload: np.ndarray, n_elems: int) -> np.ndarray:
        """Decode a payload back to ``n_elems`` float32 elements (a new array).

        Raises:
            WireError: the payload has the wrong dtype or size for ``n_elems`` elements.
        """
        if payload.dtype != self.dtype or payload.shape != (self.payload_size(n_elems),):
            raise WireError(f"{self.name} payload of {n_elems} elements must be {self.dtype}"
                            f"[{self.payload_size(n_elems)}], got {payload.dtype}[{payload.size}]")
        if self.name != "q8_0":
            return payload.astype(np.float32)
        blocks = payload.view(_Q8_DTYPE)
        values = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
        return values.reshape(-1)[:n_elems]


def _q8_pack(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise WireError("cannot encode a non-finite activation as q8_0", "use --wire-dtype float16 or float32")
    n = x.size
    nb = -(-n // Q8_BLOCK)
    if n % Q8_BLOCK:
        x = np.concatenate([x, np.zeros(nb * Q8_BLOCK - n, np.float32)])
    x = x.reshape(nb, Q8_BLOCK)
    d = np.abs(x).max(axis=1) / np.float32(127)                     # ggml quantize_row_q8_0_ref
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    v = x * inv[:, None]
    out = np.empty(nb, _Q8_DTYPE)
    out["d"] = d.astype(np.float16)
    out["qs"] = np.trunc(v + np.copysign(np.float32(0.5), v))        # roundf: half away from zero
    return out.view(np.uint8)


FORMATS: Final = {
    "float32": WireFormat("float32", 1, 4, np.dtype(np.float32)),
    "float16": WireFormat("float16", 1, 2, np.dtype(np.float16)),
    "q8_0": WireFormat("q8_0", Q8_BLOCK, _Q8_DTYPE.itemsize, np.dtype(np.uint8)),
}
"""Every wire format by name."""


def wire_format(name: str) -> WireFormat:
    """The format called ``name``.

    Raises:
        WireError: an unknown name (the message lists the known ones).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise WireError(f"unknown wire format {name!r}", f"use one of {', '.join(FORMATS)}") from None
