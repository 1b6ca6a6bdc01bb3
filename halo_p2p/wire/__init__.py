"""The wire layer: messages, their CBOR frames, chunking and FEC. Pure: no I/O, no asyncio, no torch.

- :mod:`.messages`: the frozen message dataclasses, the :data:`Message` union and ``REGISTRY``.
- :mod:`.codec`: :func:`encode` / :func:`decode` (RFC 8949 CBOR, RFC 8746 typed arrays) and the
  per-packet payload budget :func:`max_payload_elems`.
- :mod:`.chunks`: balanced chunk ranges and :class:`Reassembly` of flat arrays.
- :mod:`.fec`: interleaved XOR parity for the downlink input.

The protocol is specified in ``docs/wire-protocol.md``.
"""

from __future__ import annotations

from halo_p2p.wire.chunks import Reassembly, chunk_ranges, split_ranges
from halo_p2p.wire.codec import SCTP_USERDATA_BYTES, TYPED_ARRAY_TAGS, decode, encode, max_payload_elems
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
    PartialParity,
    Plan,
    PlanReady,
    Resend,
    Reset,
)

__all__ = [
    "MESSAGE_TYPES",
    "REGISTRY",
    "SCTP_USERDATA_BYTES",
    "TYPED_ARRAY_TAGS",
    "WIRE_VERSION",
    "Bye",
    "ErrorReply",
    "Heartbeat",
    "HeartbeatAck",
    "LayerInput",
    "Message",
    "NeedInput",
    "Partial",
    "PartialParity",
    "Plan",
    "PlanReady",
    "Reassembly",
    "Resend",
    "Reset",
    "chunk_ranges",
    "decode",
    "delivery_probability",
    "encode",
    "encode_parity",
    "max_payload_elems",
    "min_parity",
    "parity_dtype",
    "recover",
    "split_ranges",
]
