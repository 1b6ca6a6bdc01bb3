"""One activation vector as chunks with XOR parity: the sending and the receiving side.

Both :class:`~halo_p2p.wire.messages.LayerInput` (a layer's input, coordinator -> worker) and
:class:`~halo_p2p.wire.messages.Partial` (a worker's summed partials, worker -> coordinator) carry
a flat float vector of ``n_elems`` elements in one :class:`~halo_p2p.wire.quant.WireFormat`, cut
into ``n_data`` data chunks followed by ``n_parity`` XOR parity chunks (:mod:`.fec`):

* the data chunks cover :func:`chunk_ranges` ``(fmt, n_elems, n_data)``: the vector's units
  (elements, or Q8_0 blocks) split into balanced ranges (:func:`.chunks.split_ranges`), so a
  receiver knows the element range, hence the payload length, of a chunk it never got;
* parity chunk ``j`` is the XOR of the payloads of data chunks ``{i : i % n_parity == j}``
  (zero-padded to the longest), as bit patterns (uint8 / uint16 / uint32).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

import numpy as np

from halo_p2p.errors import WireError
from halo_p2p.wire import fec
from halo_p2p.wire.chunks import split_ranges
from halo_p2p.wire.quant import WireFormat

__all__ = ["ChunkedVector", "EncodedVector", "chunk_count", "chunk_ranges", "default_parity", "encode_vector"]


def chunk_ranges(fmt: WireFormat, n_elems: int, n_data: int) -> list[tuple[int, int]]:
    """Half-open element ranges of the ``n_data`` data chunks of an ``n_elems`` vector.

    Raises:
        WireError: ``n_data`` is below 1 or above the vector's unit count.
    """
    units = fmt.units(n_elems)
    if not 1 <= n_data <= max(1, units):
        raise WireError(f"{n_data} chunks for a {n_elems}-element {fmt.name} vector ({units} units)")
    u = fmt.unit_elems
    return [(a * u, min(b * u, n_elems)) for a, b in split_ranges(units, n_data)]


def chunk_count(fmt: WireFormat, n_elems: int, max_payload_bytes: int) -> int:
    """Data chunks of an ``n_elems`` vector whose chunk payloads fit ``max_payload_bytes``: the fewest.

    Raises:
        WireError: not even one unit fits.
    """
    units_per_chunk = max_payload_bytes // fmt.unit_bytes
    if units_per_chunk < 1:
        raise WireError(f"a {fmt.name} unit of {fmt.unit_bytes} bytes does not fit {max_payload_bytes} bytes")
    return max(1, -(-fmt.units(n_elems) // units_per_chunk))


def default_parity(n_data: int) -> int:
    """Parity chunks for ``n_data`` data chunks on a lossy link: one per four data chunks, at least one.

    With one parity chunk a single loss among ``n_data + 1`` packets is rebuilt (a one-chunk
    vector is simply sent twice); see :func:`.fec.delivery_probability`.
    """
    return min(n_data, max(1, math.ceil(n_data / 4)))


class EncodedVector:
    """The payloads of one vector, ready to frame.

    Attributes:
        n_data, n_parity: chunk counts.
        offsets: first element of each data chunk.
        payloads: ``n_data + n_parity`` arrays: data payloads (``fmt.dtype``), then parity bits.
    """

    __slots__ = ("n_data", "n_parity", "offsets", "payloads")

    def __init__(self, n_data: int, n_parity: int, offsets: list[int], payloads: list[np.ndarray]) -> None:
        self.n_data, self.n_parity, self.offsets, self.payloads = n_data, n_parity, offsets, payloads

    def offset(self, chunk: int) -> int:
        """``offset`` field of chunk ``chunk`` (0 for a parity chunk)."""
        return self.offsets[chunk] if chunk < self.n_data else 0

    def with_parity(self, parity: bool) -> EncodedVector:
        """The same data chunks followed by :func:`default_parity` parity chunks (``parity``) or by
        none: what :func:`encode_vector` returns for that ``parity``, without packing again."""
        n_parity = default_parity(self.n_data) if parity else 0
        if n_parity == self.n_parity:
            return self
        data = self.payloads[:self.n_data]
        return EncodedVector(self.n_data, n_parity, self.offsets, data + fec.encode_parity(data, n_parity))


def encode_vector(fmt: WireFormat, values: np.ndarray, max_payload_bytes: int, *, parity: bool) -> EncodedVector:
    """Cut float32 ``values`` into the fewest chunks whose payload fits ``max_payload_bytes``.

    Args:
        fmt: the wire format.
        values: 1-D float32 (or float16) elements.
        max_payload_bytes: payload bytes one frame can carry (the packet budget minus the header).
        parity: add :func:`default_parity` parity chunks.

    Raises:
        WireError: not even one unit fits, or ``values`` cannot be encoded (a NaN in ``q8_0``).
    """
    n = values.size
    n_data = chunk_count(fmt, n, max_payload_bytes)
    ranges = chunk_ranges(fmt, n, n_data)
    data = [fmt.pack(values[a:b]) for a, b in ranges]
    n_parity = default_parity(n_data) if parity else 0
    return EncodedVector(n_data, n_parity, [a for a, _ in ranges], data + fec.encode_parity(data, n_parity))


class ChunkedVector:
    """Receives the chunks of one vector, rebuilds lost ones from parity, decodes what arrived.

    Args:
        fmt: the wire format.
        n_elems: vector length.
        n_data, n_parity: chunk counts, as announced by the frames.

    Raises:
        WireError: the counts do not fit the vector (see :func:`chunk_ranges`), or ``n_parity``
            is outside ``[0, n_data]``.
    """

    __slots__ = ("_payloads", "_values", "fmt", "n_data", "n_elems", "n_parity", "ranges")

    def __init__(self, fmt: WireFormat, n_elems: int, n_data: int, n_parity: int) -> None:
        if not 0 <= n_parity <= n_data:
            raise WireError(f"{n_parity} parity chunks for {n_data} data chunks")
        self.fmt, self.n_elems, self.n_data, self.n_parity = fmt, n_elems, n_data, n_parity
        self.ranges = chunk_ranges(fmt, n_elems, n_data)
        self._payloads: dict[int, np.ndarray] = {}
        self._values: dict[int, np.ndarray] = {}          # decoded data chunks

    def matches(self, n_data: int, n_parity: int) -> bool:
        """Whether a frame announcing these counts belongs to this vector."""
        return n_data == self.n_data and n_parity == self.n_parity

    def add(self, chunk: int, offset: int, payload: np.ndarray) -> bool:
        """Store chunk ``chunk``; rebuild lost data chunks if parity now allows it.

        Returns:
            True if data elements became available that were not before (a duplicate: False).

        Raises:
            WireError: ``chunk`` out of range, a data chunk whose ``offset`` or payload does not
                match its range, or a parity chunk of the wrong dtype or length (nothing stored).
        """
        if not 0 <= chunk < self.n_data + self.n_parity:
            raise WireError(f"chunk {chunk} out of range for {self.n_data} data + {self.n_parity} parity chunks")
        if chunk < self.n_data:
            a, b = self.ranges[chunk]
            if offset != a:
                raise WireError(f"chunk {chunk} must start at element {a}, got offset {offset}")
            if chunk in self._values:
                return False
            self._values[chunk] = self.fmt.unpack(payload, b - a)
            self._payloads[chunk] = payload
        else:
            bits, width = fec.parity_dtype(self.fmt.dtype), self._width()
            if payload.dtype != bits or payload.shape != (width,):
                raise WireError(f"parity chunk {chunk} must be {bits}[{width}], got {payload.dtype}[{payload.size}]")
            if chunk in self._payloads:
                return False
            self._payloads[chunk] = payload
        return self._recover() or chunk < self.n_data

    def _width(self) -> int:
        return max(self.fmt.payload_size(b - a) for a, b in self.ranges)

    def _recover(self) -> bool:
        missing = [i for i in range(self.n_data) if i not in self._values]
        if not missing or not self.n_parity:
            return False
        lengths = [self.fmt.payload_size(b - a) for a, b in self.ranges]
        data = fec.recover(self._payloads, self.n_data, self.n_parity, lengths, self.fmt.dtype)
        if data is None:
            return False
        for i in missing:
            a, b = self.ranges[i]
            self._payloads[i] = data[i]
            self._values[i] = self.fmt.unpack(np.ascontiguousarray(data[i]), b - a)
        return True

    @property
    def complete(self) -> bool:
        """Every data chunk arrived or was rebuilt."""
        return len(self._values) == self.n_data

    @property
    def received(self) -> bool:
        """At least one data chunk is available."""
        return bool(self._values)

    def missing_chunks(self) -> list[int]:
        """Data chunks neither received nor rebuilt, in order."""
        return [i for i in range(self.n_data) if i not in self._values]

    def covers(self, start: int, stop: int) -> bool:
        """Whether elements ``[start, stop)`` are all available."""
        return all(i in self._values for i, (a, b) in enumerate(self.ranges) if a < stop and start < b)

    def touches(self, start: int, stop: int) -> bool:
        """Whether any element of ``[start, stop)`` is available."""
        return any(i in self._values for i, (a, b) in enumerate(self.ranges) if a < stop and start < b)

    def values(self) -> np.ndarray:
        """float32 ``(n_elems,)``: the available elements, zeros where chunks are missing.

        Read-only by contract: a one-chunk vector returns its decoded chunk itself, not a copy.
        """
        if self.complete and self.n_data == 1:
            return self._values[0]
        out = np.zeros(self.n_elems, np.float32)
        for i, v in self._values.items():
            a, b = self.ranges[i]
            out[a:b] = v
        return out
