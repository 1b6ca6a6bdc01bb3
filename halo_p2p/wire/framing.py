"""The activation frames of a split-model session, built the same way at both ends.

A layer input (coordinator -> worker) and a worker's answer (worker -> coordinator) are each one
vector cut into chunks (:mod:`.vector`). How many chunks a vector takes depends on the frame's
header and on the channel (one SCTP packet per frame on the unreliable channel, up to
:data:`RELIABLE_CHUNK_BYTES` on the reliable one), so both ends build their frames here: the
coordinator knows, before anything arrives, how many chunks each answer must have and refuses any
other count; the scheduler and the simulator price the same frames. See ``docs/wire-protocol.md``
§4-§6.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from halo_p2p.wire import codec
from halo_p2p.wire.messages import LayerInput, Partial
from halo_p2p.wire.quant import WireFormat
from halo_p2p.wire.vector import EncodedVector, chunk_count, encode_vector

__all__ = ["RELIABLE_CHUNK_BYTES", "answer_chunk_count", "answer_chunks", "answer_template", "encode_frames",
           "input_template"]

RELIABLE_CHUNK_BYTES = 64 * 1024
"""Payload of one activation message on the reliable channel (it has no per-packet loss, and
WebRTC messages may be up to 256 KiB); the unreliable channel keeps one SCTP packet per frame."""

def input_template(session: int, step: int, layer: int, part: int, *, start_pos: int, n_tokens: int,
                   groups: tuple[int, ...], segments: tuple[int, ...], fmt: WireFormat) -> LayerInput:
    """A :class:`LayerInput` with every field but the chunk's (``data`` empty)."""
    return LayerInput(session=session, step=step, layer=layer, part=part, start_pos=start_pos,
                      n_tokens=n_tokens, groups=groups, segments=segments, chunk=0, n_data=1, n_parity=0, offset=0,
                      data=np.zeros(0, fmt.dtype))


def answer_template(session: int, step: int, layer: int, part: int, *, n_groups: int, norms: bool,
                    fmt: WireFormat) -> Partial:
    """A :class:`Partial` with every field but the chunk's; ``norms`` reserves room for ``n_groups``
    float16 norms (sent on chunk 0 of a ``halo`` decode step's answer)."""
    return Partial(session=session, step=step, layer=layer, part=part, chunk=0, n_data=1,
                   n_parity=0, offset=0, norms=np.zeros(n_groups if norms else 0, np.float16),
                   data=np.zeros(0, fmt.dtype))


_TOP = 2**32 - 1


@functools.lru_cache(maxsize=4096)
def _packet_budget(kind: type, groups: tuple[int, ...], segments: tuple[int, ...], n_norms: int, dtype: str) -> int:
    """:func:`codec.payload_budget` of a frame with these variable parts and every other integer
    field at its widest: the same for every step, so computed once per shape."""
    data = np.zeros(0, dtype)
    if kind is LayerInput:
        widest: LayerInput | Partial = LayerInput(
            session=_TOP, step=_TOP, layer=_TOP, part=1, start_pos=_TOP, n_tokens=_TOP, groups=groups,
            segments=segments, chunk=0, n_data=1, n_parity=0, offset=0, data=data)
    else:
        widest = Partial(session=_TOP, step=_TOP, layer=_TOP, part=1, chunk=0, n_data=1, n_parity=0, offset=0,
                         norms=np.zeros(n_norms, np.float16), data=data)
    return codec.payload_budget(widest)


def _budget(template: LayerInput | Partial, reliable: bool) -> int:
    if reliable:
        return RELIABLE_CHUNK_BYTES
    if isinstance(template, LayerInput):
        return _packet_budget(LayerInput, template.groups, template.segments, 0, template.data.dtype.str)
    return _packet_budget(Partial, (), (), template.norms.size, template.data.dtype.str)


def answer_chunks(template: Partial, n_elems: int, fmt: WireFormat, *, reliable: bool) -> int:
    """Data chunks of an ``n_elems`` answer framed like ``template`` (on the reliable channel or not)."""
    return chunk_count(fmt, n_elems, _budget(template, reliable))


def answer_chunk_count(n_elems: int, fmt: WireFormat, *, n_norms: int, reliable: bool) -> int:
    """:func:`answer_chunks` of an answer whose frames reserve room for ``n_norms`` norms, without
    building its template (the coordinator asks this for every worker at every sync point)."""
    budget = RELIABLE_CHUNK_BYTES if reliable else _packet_budget(Partial, (), (), n_norms, fmt.dtype.str)
    return chunk_count(fmt, n_elems, budget)


def encode_frames(template: LayerInput | Partial, values: np.ndarray, fmt: WireFormat, *, reliable: bool,
                  parity: bool, norms: np.ndarray | None = None,
                  cache: dict[tuple[int, bool], EncodedVector] | None = None) -> tuple[EncodedVector, list[bytes]]:
    """The frames of ``values`` (1-D float32): ``template`` with each chunk's fields and payload.

    On the unreliable channel every frame fits one SCTP packet (``codec.payload_budget`` of the
    frame's shape with its step-dependent integers at their widest, so both ends agree whatever
    the step), on the reliable one a chunk carries up to :data:`RELIABLE_CHUNK_BYTES`. ``norms`` (answers only)
    goes on chunk 0; it must have the template's length. ``cache`` (one dict per vector, keyed by
    chunk count and parity) keeps the encoded payloads, so one input sent to several workers is
    quantized once, whatever their headers and whether their links take parity.

    Raises:
        WireError: ``values`` cannot be encoded in ``fmt`` (a NaN in ``q8_0``).
    """
    budget = _budget(template, reliable)
    if cache is None:
        vec = encode_vector(fmt, values, budget, parity=parity)
    else:
        n_data = chunk_count(fmt, values.size, budget)
        hit = cache.get((n_data, parity))
        if hit is None:
            other = cache.get((n_data, not parity))
            hit = other.with_parity(parity) if other is not None else encode_vector(fmt, values, budget,
                                                                                   parity=parity)
            cache[n_data, parity] = hit
        vec = hit
    frames = []
    for k, payload in enumerate(vec.payloads):
        extra: dict[str, Any] = {}
        if isinstance(template, Partial):
            extra["norms"] = norms if k == 0 and norms is not None else template.norms[:0]
        frames.append(codec.encode(dataclasses.replace(
            template, chunk=k, n_data=vec.n_data, n_parity=vec.n_parity, offset=vec.offset(k), data=payload,
            **extra)))
    return vec, frames
