"""How many activation elements one frame of the session carries, per wire format (pure: no I/O).

The scheduler counts frames per vector to price losses and the stack's CPU; the counts come from
the session's own framing (:mod:`halo_p2p.wire.framing`), so they follow any change of the
frame headers.
"""

from __future__ import annotations

import functools

import numpy as np

from halo_p2p.wire import codec
from halo_p2p.wire.framing import answer_chunks, answer_template, encode_frames, input_template
from halo_p2p.wire.quant import wire_format

__all__ = ["REFERENCE_GROUPS", "wire_chunk_elems"]


REFERENCE_GROUPS = 8
"""Groups a worker answers for in the frame templates that size the scheduler's chunks."""


@functools.lru_cache(maxsize=8)
def wire_chunk_elems(wire_dtype: str) -> tuple[float, int, int]:
    """``(bytes per element, LayerInput elements per frame, Partial elements per frame)`` of a
    wire format on the unreliable channel: the most elements whose vector the session's own
    framing (``wire.framing``: ``answer_chunks``, ``encode_frames``) sends in one frame, for a
    worker answering for :data:`REFERENCE_GROUPS` groups with their norms."""
    fmt = wire_format(wire_dtype)
    groups = tuple(range(REFERENCE_GROUPS))
    inp = input_template(1, 1000, 10, 1, start_pos=1000, n_tokens=1, groups=groups, segments=(len(groups),), fmt=fmt)
    out = answer_template(1, 1000, 10, 1, n_groups=len(groups), norms=True, fmt=fmt)

    def in_chunks(n: int) -> int:
        return encode_frames(inp, np.zeros(n, np.float32), fmt, reliable=False, parity=False)[0].n_data

    def out_chunks(n: int) -> int:
        return answer_chunks(out, n, fmt, reliable=False)

    per_frame = []
    for chunks in (in_chunks, out_chunks):
        lo, hi = fmt.unit_elems, 2 * codec.SCTP_USERDATA_BYTES * fmt.unit_elems   # one frame holds lo, not hi
        while hi - lo > fmt.unit_elems:
            mid = (lo + hi) // 2 // fmt.unit_elems * fmt.unit_elems
            lo, hi = (mid, hi) if chunks(mid) == 1 else (lo, mid)
        per_frame.append(lo)
    return fmt.unit_bytes / fmt.unit_elems, per_frame[0], per_frame[1]
