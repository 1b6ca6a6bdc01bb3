"""The wire layer: messages, their CBOR frames, chunking and FEC. Pure: no I/O, no asyncio, no torch.

- :mod:`.messages`: the frozen message dataclasses, the :data:`Message` union and ``REGISTRY``.
- :mod:`.codec`: :func:`encode` / :func:`decode` (RFC 8949 CBOR, RFC 8746 typed arrays) and the
  per-packet payload budget :func:`payload_budget`.
- :mod:`.quant`: the activation formats on the wire (float32, float16, Q8_0 blocks).
- :mod:`.vector`: one activation vector as chunks with XOR parity (:class:`ChunkedVector`).
- :mod:`.chunks`: balanced chunk ranges and :class:`Reassembly` of flat arrays (weight streaming).
- :mod:`.fec`: interleaved XOR parity.

The protocol is specified in ``docs/wire-protocol.md``.
"""

from __future__ import annotations

from halo_p2p.wire.chunks import Reassembly, chunk_ranges, split_ranges
from halo_p2p.wire.codec import SCTP_USERDATA_BYTES, TYPED_ARRAY_TAGS, decode, encode, payload_budget
from halo_p2p.wire.fec import delivery_probability, encode_parity, min_parity, parity_dtype, recover
from halo_p2p.wire.messages import (
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
    Plan,
    PlanReady,
    Resend,
    Reset,
)
from halo_p2p.wire.quant import FORMATS, WireFormat, wire_format
from halo_p2p.wire.vector import ChunkedVector, EncodedVector, encode_vector

__all__ = [
    "FORMATS",
    "MESSAGE_TYPES",
    "REGISTRY",
    "SCTP_USERDATA_BYTES",
    "TYPED_ARRAY_TAGS",
    "WIRE_VERSION",
    "Bye",
    "ChunkedVector",
    "EncodedVector",
    "ErrorReply",
    "Heartbeat",
    "HeartbeatAck",
    "LayerInput",
    "Message",
    "NeedInput",
    "Partial",
    "Plan",
    "PlanReady",
    "Reassembly",
    "Resend",
    "Reset",
    "WireFormat",
    "chunk_ranges",
    "decode",
    "delivery_probability",
    "encode",
    "encode_parity",
    "encode_vector",
    "min_parity",
    "parity_dtype",
    "payload_budget",
    "recover",
    "split_ranges",
    "wire_format",
]
