"""Splitting flat activation arrays into per-packet chunks, and putting them back together.

A ``(n_tokens, dim)`` activation is flattened row-major and cut into balanced, half-open element
ranges, one per frame (:func:`chunk_ranges`, :func:`split_ranges`). The receiver collects
``(offset, data)`` pieces in a :class:`Reassembly`, which knows which elements are still missing.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from halo_p2p.errors import WireError

__all__ = ["Reassembly", "chunk_ranges", "split_ranges"]


def split_ranges(total_elems: int, n_chunks: int) -> list[tuple[int, int]]:
    """Cut ``[0, total_elems)`` into ``n_chunks`` balanced half-open ranges.

    The first ``total_elems % n_chunks`` ranges hold one element more than the others, so sizes
    differ by at most one. This is the layout of :class:`~halo_p2p.wire.messages.LayerInput` data
    chunks: a receiver rebuilds every chunk's length from ``(n_tokens * dim, n_data)``.

    Args:
        total_elems: number of elements (>= 0).
        n_chunks: number of ranges (>= 1, and <= ``total_elems`` unless that is 0).

    Returns:
        ``[(start, stop), ...]`` in order, contiguous, covering ``[0, total_elems)``.

    Raises:
        ValueError: negative ``total_elems``, ``n_chunks < 1``, or more chunks than elements.
    """
    if total_elems < 0 or n_chunks < 1 or (total_elems and n_chunks > total_elems):
        raise ValueError(f"cannot split {total_elems} elements into {n_chunks} non-empty chunks")
    base, extra = divmod(total_elems, n_chunks)
    ranges, start = [], 0
    for k in range(n_chunks):
        stop = start + base + (k < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def chunk_ranges(total_elems: int, max_elems: int) -> list[tuple[int, int]]:
    """Cut ``[0, total_elems)`` into the fewest balanced ranges of at most ``max_elems`` elements.

    Equal to ``split_ranges(total_elems, ceil(total_elems / max_elems))``: chunk sizes differ by at
    most one element. Use ``max_elems = codec.max_payload_elems(dtype)`` so that each chunk's frame
    fits one SCTP packet.

    Args:
        total_elems: number of elements (>= 0); 0 gives ``[]``.
        max_elems: the most elements one chunk may hold (>= 1).

    Returns:
        ``[(start, stop), ...]`` half-open, contiguous, in order.

    Raises:
        ValueError: negative ``total_elems`` or ``max_elems < 1``.
    """
    if total_elems < 0 or max_elems < 1:
        raise ValueError(f"cannot cut {total_elems} elements into chunks of at most {max_elems}")
    if total_elems == 0:
        return []
    return split_ranges(total_elems, -(-total_elems // max_elems))


class Reassembly:
    """Collects ``(offset, data)`` pieces of one flat array and tracks which elements arrived.

    Pieces may arrive in any order; a piece overlapping elements already received overwrites
    them (an exact duplicate therefore changes nothing and adds no elements).

    Args:
        total_elems: length of the flat array (e.g. ``n_tokens * dim``).
        dtype: dtype every piece must have (e.g. float16 or float32).

    Raises:
        ValueError: negative ``total_elems``.
    """

    __slots__ = ("_array", "_dtype", "_have", "_n_have", "_total")

    def __init__(self, total_elems: int, dtype: Any) -> None:
        if total_elems < 0:
            raise ValueError(f"total_elems must be >= 0, got {total_elems}")
        self._total = total_elems
        self._dtype = np.dtype(dtype)
        self._array = np.zeros(total_elems, self._dtype)
        self._have = np.zeros(total_elems, np.bool_)
        self._n_have = 0

    def add(self, offset: int, data: np.ndarray) -> int:
        """Store elements ``[offset, offset + len(data))``.

        Args:
            offset: flat index of ``data[0]``.
            data: 1-D array of this reassembly's dtype (copied in; the caller may reuse it).

        Returns:
            How many of its elements had not arrived before (0 for a duplicate).

        Raises:
            WireError: ``data`` is not 1-D, has another dtype, or falls outside ``[0, total)``
                (the caller counts and drops such pieces; nothing is stored).
        """
        if not isinstance(data, np.ndarray) or data.ndim != 1:
            raise WireError(f"piece at offset {offset} must be a 1-D numpy array")
        if data.dtype != self._dtype:
            raise WireError(f"piece at offset {offset} has dtype {data.dtype}, expected {self._dtype}")
        stop = offset + data.size
        if offset < 0 or stop > self._total:
            raise WireError(f"piece [{offset}, {stop}) falls outside [0, {self._total})")
        have = self._have[offset:stop]
        new = data.size - int(np.count_nonzero(have))
        self._array[offset:stop] = data
        have[:] = True
        self._n_have += new
        return new

    @property
    def total_elems(self) -> int:
        """Length of the flat array."""
        return self._total

    @property
    def received_elems(self) -> int:
        """How many distinct elements arrived so far."""
        return self._n_have

    @property
    def complete(self) -> bool:
        """True once every element arrived."""
        return self._n_have == self._total

    @property
    def array(self) -> np.ndarray:
        """The flat ``(total_elems,)`` array, zeros where missing; the live buffer, not a copy."""
        return self._array

    @property
    def received_mask(self) -> np.ndarray:
        """Read-only ``(total_elems,)`` bool view: True where the element arrived."""
        view = self._have.view()
        view.flags.writeable = False
        return view

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``(start, stop)`` ranges of the elements not received yet, in order."""
        if self.complete:
            return []
        edges = np.diff(np.concatenate(([True], self._have, [True])).astype(np.int8))
        starts = np.flatnonzero(edges == -1)  # received -> missing
        stops = np.flatnonzero(edges == 1)  # missing -> received
        return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]
