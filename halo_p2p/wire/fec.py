"""Forward error correction for the downlink input: systematic, interleaved XOR parity.

Every worker needs the whole :class:`~halo_p2p.wire.messages.LayerInput` of a sync point; one lost
chunk would stall it for a round trip (a ``NeedInput``). With ``n_data`` data chunks and
``n_parity = p`` parity chunks, parity chunk ``j`` is the bitwise XOR of the data chunks
``{i : i % p == j}`` (their bit patterns as uint8 / uint16 / uint32, each zero-padded to the longest data
chunk). Each such subset plus its parity survives the loss of any one of its chunks.
``p = 0`` sends no parity, ``p = 1`` one parity over all chunks, ``p = n_data`` duplicates every
chunk. The cost is ``p / n_data`` extra packets; :func:`delivery_probability` gives the benefit.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from halo_p2p.errors import WireError

__all__ = ["delivery_probability", "encode_parity", "min_parity", "parity_dtype", "recover"]

_BITS: dict[np.dtype, np.dtype] = {
    np.dtype(np.uint8): np.dtype(np.uint8),        # Q8_0 blocks (halo_p2p.wire.quant) are bytes already
    np.dtype(np.float16): np.dtype(np.uint16),
    np.dtype(np.float32): np.dtype(np.uint32),
    np.dtype(np.uint16): np.dtype(np.uint16),
    np.dtype(np.uint32): np.dtype(np.uint32),
}


def parity_dtype(dtype: Any) -> np.dtype[Any]:
    """The unsigned dtype of the bit patterns of ``dtype``: uint16 for float16, uint32 for float32,
    uint8 for uint8 (Q8_0 payloads).

    Raises:
        ValueError: any dtype other than float16, float32, uint8, uint16, uint32.
    """
    try:
        return _BITS[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no parity dtype for {np.dtype(dtype)}: use float16 or float32") from None


def _check_p(n_data: int, n_parity: int) -> None:
    if n_data < 1 or not 0 <= n_parity <= n_data:
        raise ValueError(f"need n_data >= 1 and 0 <= n_parity <= n_data, got {n_data} and {n_parity}")


def encode_parity(chunks: list[np.ndarray], n_parity: int) -> list[np.ndarray]:
    """The ``n_parity`` XOR parity chunks of ``chunks``.

    Args:
        chunks: the ``n_data`` data chunks, 1-D, all of one dtype (float16 or float32; or their
            uint16 / uint32 bit patterns), lengths may differ.
        n_parity: ``p`` with ``0 <= p <= n_data``.

    Returns:
        ``p`` arrays, each of the longest chunk's length; parity ``j`` is the XOR of the bit
        patterns of chunks ``{i : i % p == j}`` zero-padded to that length. uint16 for float16
        data, uint32 for float32.

    Raises:
        ValueError: no chunks, mixed dtypes, a chunk that is not 1-D, or ``p`` out of range.
    """
    _check_p(len(chunks), n_parity)
    dtype = chunks[0].dtype
    if any(c.dtype != dtype or c.ndim != 1 for c in chunks):
        raise ValueError("data chunks must all be 1-D and of one dtype")
    bits = parity_dtype(dtype)
    length = max(c.size for c in chunks)
    parity = [np.zeros(length, bits) for _ in range(n_parity)]
    for i, c in enumerate(chunks):
        out = parity[i % n_parity] if n_parity else None
        if out is not None:
            out[: c.size] ^= c.view(bits)
    return parity


def recover(received: dict[int, np.ndarray], n_data: int, n_parity: int, lengths: list[int],
            dtype: Any) -> list[np.ndarray] | None:
    """Every data chunk, rebuilding lost ones from parity where possible.

    Args:
        received: chunk index -> array for the chunks that arrived: indices ``0 .. n_data-1`` are
            data (1-D, ``dtype``), ``n_data .. n_data+n_parity-1`` parity (uint16 / uint32).
        n_data: number of data chunks.
        n_parity: number of parity chunks ``p``.
        lengths: the length of each data chunk (``n_data`` ints), e.g. from
            ``chunks.split_ranges(n_tokens * dim, n_data)``.
        dtype: the data dtype, float16 or float32.

    Returns:
        The ``n_data`` data chunks in order (received ones as given, not copied; rebuilt ones
        new arrays of ``dtype``), or None if some subset ``{i : i % p == j}`` plus its parity lost
        more than one chunk (with ``p = 0``: if any data chunk is missing).

    Raises:
        WireError: a received chunk has the wrong dtype or length, or an index out of range.
        ValueError: ``lengths`` does not have ``n_data`` items, or ``n_parity`` is out of range.
    """
    _check_p(n_data, n_parity)
    if len(lengths) != n_data:
        raise ValueError(f"lengths has {len(lengths)} items, expected n_data = {n_data}")
    dt, bits = np.dtype(dtype), parity_dtype(dtype)
    width = max(lengths)
    for k, arr in received.items():
        if not 0 <= k < n_data + n_parity:
            raise WireError(f"chunk index {k} out of range for {n_data} data + {n_parity} parity chunks")
        want_dtype, want_len = (dt, lengths[k]) if k < n_data else (bits, width)
        if arr.dtype != want_dtype or arr.shape != (want_len,):
            raise WireError(f"chunk {k} is {arr.dtype}[{arr.size}], expected {want_dtype}[{want_len}]")
    out: list[np.ndarray | None] = [received.get(i) for i in range(n_data)]
    missing = [i for i, c in enumerate(out) if c is None]
    if not missing:
        return out  # type: ignore[return-value]  # no None left: every chunk was received
    if n_parity == 0:
        return None
    by_subset: dict[int, int] = {}
    for i in missing:
        j = i % n_parity
        if j in by_subset or n_data + j not in received:
            return None  # two losses in one subset, or a data chunk and its parity
        by_subset[j] = i
    for j, lost in by_subset.items():
        acc = received[n_data + j].copy()
        for i in range(j, n_data, n_parity):
            if i != lost:
                acc[: lengths[i]] ^= received[i].view(bits)
        out[lost] = acc[: lengths[lost]].view(dt)
    return out  # type: ignore[return-value]  # no None left: the one missing chunk was rebuilt


def delivery_probability(n_data: int, n_parity: int, plr: float) -> float:
    """Probability that all ``n_data`` data chunks can be had (received or rebuilt).

    Closed form for independent packet loss: with ``p = 0`` it is ``(1 - plr) ** n_data``;
    otherwise subset ``j`` has ``s_j = ceil((n_data - j) / p)`` data chunks plus one parity and
    survives if at most one of its ``s_j + 1`` chunks is lost, so the result is
    ``prod_j [(1 - plr) ** (s_j + 1) + (s_j + 1) * plr * (1 - plr) ** s_j]``.

    Args:
        n_data: data chunks (>= 1).
        n_parity: parity chunks, ``0 <= p <= n_data``.
        plr: packet loss rate in ``[0, 1]``.

    Raises:
        ValueError: arguments out of range.
    """
    _check_p(n_data, n_parity)
    if not 0.0 <= plr <= 1.0:
        raise ValueError(f"plr must be in [0, 1], got {plr}")
    q = 1.0 - plr
    if n_parity == 0:
        return q**n_data
    result = 1.0
    for j in range(n_parity):
        s = math.ceil((n_data - j) / n_parity)
        result *= q ** (s + 1) + (s + 1) * plr * q**s
    return result


def min_parity(n_data: int, plr: float, target: float) -> int | None:
    """The fewest parity chunks giving ``delivery_probability >= target``.

    Args:
        n_data: data chunks (>= 1).
        plr: packet loss rate in ``[0, 1]``.
        target: wanted delivery probability in ``[0, 1]``.

    Returns:
        ``p`` in ``[0, n_data]``, or None if even ``p = n_data`` (every chunk twice) falls short.

    Raises:
        ValueError: arguments out of range.
    """
    for p in range(n_data + 1):
        if delivery_probability(n_data, p, plr) >= target:
            return p
    return None
