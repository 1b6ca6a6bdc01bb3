"""The frames of one sync point on the wire, measured with the project's own encoder.

Per sync point the coordinator sends each worker one :class:`~halo_p2p.wire.messages.LayerInput`
vector and the worker answers with one :class:`~halo_p2p.wire.messages.Partial` vector (the sum
of its groups' partials), both cut as :func:`halo_p2p.wire.framing.encode_frames` cuts them:
on the unreliable channel into frames of one SCTP packet (``codec.payload_budget`` of the real
header, which grows with the worker's group count), plus :func:`~halo_p2p.wire.vector.default_parity`
XOR parity frames on a lossy link; on the reliable channel into one message (up to
``RELIABLE_CHUNK_BYTES``) that SCTP fragments into ``packet_bytes`` packets. The sizes here are
``len()`` of real encoded frames, cached per shape.

Pure module: no I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from halo_p2p.net.link import SCTP_FRAGMENT_BYTES
from halo_p2p.wire import codec
from halo_p2p.wire.framing import answer_template, encode_frames, input_template
from halo_p2p.wire.messages import NeedInput, Resend
from halo_p2p.wire.quant import wire_format

__all__ = ["VectorFrames", "control_bytes", "vector_frames"]

_STEP = {"session": 1, "step": 1000, "layer": 10, "part": 1}   # typical header values (2-byte step)


@dataclass(frozen=True, slots=True)
class VectorFrames:
    """The packets of one vector.

    Attributes:
        sizes: bytes of each packet, data chunks first, then parity (unreliable); the packets
            of the one message (reliable).
        n_data: data chunks (unreliable) or 1 (reliable: one message).
        n_parity: parity chunks (0 on the reliable channel and on a link without loss).
    """

    sizes: tuple[int, ...]
    n_data: int
    n_parity: int


@functools.lru_cache(maxsize=512)
def vector_frames(dim: int, n_groups: int, *, kind: str, fmt: str = "q8_0", parity: bool = False,
                  reliable: bool = False, norms: bool = False,
                  packet_bytes: int = SCTP_FRAGMENT_BYTES) -> VectorFrames:
    """The packets of a one-token layer input (``kind="in"``) or answer (``"out"``) of ``dim`` elements.

    Args:
        dim: elements of the vector (the model's width: one row).
        n_groups: groups the worker answers with (they are listed in the input's header; an
            answer carries one float16 norm each when ``norms``).
        kind: ``"in"`` (coordinator -> worker) or ``"out"`` (worker -> coordinator).
        fmt: wire format, ``"q8_0"``, ``"float16"`` or ``"float32"``.
        parity: add XOR parity frames (unreliable channel, lossy link).
        reliable: the reliable channel: one message, fragmented into ``packet_bytes`` packets.
        norms: the answer carries its groups' norms (``halo`` decode steps).
        packet_bytes: SCTP user data per packet.
    """
    wf = wire_format(fmt)
    groups = tuple(range(max(1, n_groups)))
    if kind == "in":
        template = input_template(_STEP["session"], _STEP["step"], _STEP["layer"], _STEP["part"], start_pos=1000,
                                  n_tokens=1, groups=groups, segments=(len(groups),), fmt=wf)
        extra: dict[str, Any] = {}
    elif kind == "out":
        # mypy: a Partial template where the in-branch has a LayerInput
        template = answer_template(_STEP["session"], _STEP["step"], _STEP["layer"], _STEP["part"],  # type: ignore[assignment]
                                   n_groups=len(groups), norms=norms, fmt=wf)
        extra = {"norms": np.ones(len(groups), np.float16) if norms else None}
    else:
        raise ValueError(f"kind must be 'in' or 'out', got {kind!r}")
    vec, frames = encode_frames(template, np.ones(dim, np.float32), wf, reliable=reliable,
                                parity=parity and not reliable, **extra)
    if not reliable:
        return VectorFrames(tuple(len(f) for f in frames), vec.n_data, vec.n_parity)
    sizes = [min(packet_bytes, len(f) - a) for f in frames for a in range(0, len(f), packet_bytes)]
    return VectorFrames(tuple(sizes), 1, 0)


@functools.lru_cache(maxsize=8)
def control_bytes() -> dict[str, int]:
    """Bytes of a ``Resend`` naming two chunks and of a ``NeedInput``."""
    resend = Resend(**_STEP, chunks=(0, 1))
    return {"resend": len(codec.encode(resend)), "need": len(codec.encode(NeedInput(**_STEP)))}
