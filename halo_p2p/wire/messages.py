"""The messages peers exchange: frozen, typed dataclasses, one per wire kind.

Each class has a class-level integer ``KIND`` (its tag on the wire), a ``RELIABLE`` flag naming the
data channel it travels on, and a ``version`` field (the wire major version, :data:`WIRE_VERSION`).
Field order is wire order: :mod:`halo_p2p.wire.codec` encodes a message as the CBOR array
``[version, KIND, *other fields in declaration order]`` (see ``docs/wire-protocol.md``).

Field annotations are the wire schema; the codec reads them once at import:

- ``int``: an unsigned integer below 2**32 (``U64``: below 2**64; ``Part``: 0 or 1);
- ``float``: a finite float (seconds, in ``*_s`` fields);
- ``str`` / ``Literal["a", "b"]``: a text string (one of the literals);
- a ``StrEnum`` (:class:`SyncMode`, :class:`WireDtype`): a text string, one of its values;
- ``tuple[int, ...]``: an array of unsigned 32-bit integers;
- ``dict[str, Any]``: a JSON-like map (str keys; values None, bool, int, float, str, list, dict);
- a class with ``to_dict()`` / ``from_dict()`` (:class:`~halo_p2p.plan.PlanBody`): its JSON-like map,
  parsed and validated by ``from_dict`` on decode;
- ``Activations`` / ``Payload`` / ``Norms``: a 1-D numpy array sent as an RFC 8746 typed array.

Arrays are compared bit for bit by ``==`` (dtype and bit patterns, whatever the byte order), so
``-0.0 != 0.0`` and a NaN equals the same NaN; messages are unhashable.

Adding a kind: define its class with a fresh ``KIND`` and ``RELIABLE`` (and a ``check`` method if
fields constrain each other); add it to the :data:`Message` union and to :data:`MESSAGE_TYPES`;
add its example to ``tests/test_wire_codec.py`` and its golden frame to ``tests/data/wire/``. The
codec needs no change unless a new field type appears.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import numpy as np

from halo_p2p.plan import PlanBody

__all__ = [
    "MESSAGE_TYPES",
    "REGISTRY",
    "SYNC_MODES",
    "U64",
    "WIRE_DTYPES",
    "WIRE_VERSION",
    "Activations",
    "Bye",
    "Dtypes",
    "ErrorReply",
    "GroupTensor",
    "Heartbeat",
    "HeartbeatAck",
    "LayerInput",
    "MaxValue",
    "Message",
    "NeedInput",
    "Norms",
    "Part",
    "Partial",
    "Payload",
    "Plan",
    "PlanReady",
    "Resend",
    "Reset",
    "SignalAnswer",
    "SignalOffer",
    "SignalRefused",
    "SyncMode",
    "WeightsDone",
    "WeightsWanted",
    "WireDtype",
]

WIRE_VERSION = 2
"""The wire major version this code speaks; frames of any other version are refused."""


@dataclass(frozen=True, slots=True)
class MaxValue:
    """Schema metadata: the inclusive maximum of an unsigned integer field."""

    value: int


@dataclass(frozen=True, slots=True)
class Dtypes:
    """Schema metadata: the numpy dtype names an array field may carry."""

    value: tuple[str, ...]


U64 = Annotated[int, MaxValue(2**64 - 1)]
"""An unsigned integer below 2**64 (plain ``int`` fields are below 2**32)."""
Part = Annotated[int, MaxValue(1)]
"""A sync point within a layer: 0 = attention input/output, 1 = MLP input/output."""
Activations = Annotated[np.ndarray, Dtypes(("float16", "float32"))]
"""A 1-D float16 or float32 array (weights streamed in :class:`GroupTensor`)."""
Payload = Annotated[np.ndarray, Dtypes(("float16", "float32", "uint8", "uint16", "uint32"))]
"""A 1-D chunk payload: float16/float32 activations or uint8 Q8_0 blocks; or XOR parity bit
patterns (uint8 / uint16 / uint32)."""
Norms = Annotated[np.ndarray, Dtypes(("float16",))]
"""A 1-D float16 array of per-group partial norms."""



class SyncMode(StrEnum):
    """How a session synchronizes (``Plan.mode``; on the wire, the value string)."""

    STRICT = "strict"
    """Wait for every answer; inputs and answers on the reliable channel."""
    STRICT_UNRELIABLE = "strict-unreliable"
    """Wait for every answer; decode steps on the unreliable channel with FEC, deadlines and Resend."""
    HALO = "halo"
    """Relaxed synchronization: wait only for the critical groups' answers."""


class WireDtype(StrEnum):
    """Activation format on the wire (``Plan.wire_dtype``): see :mod:`halo_p2p.wire.quant`."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"
    Q8_0 = "q8_0"


SYNC_MODES: tuple[str, ...] = tuple(m.value for m in SyncMode)
"""``Plan.mode`` values, as strings: ``("strict", "strict-unreliable", "halo")``."""
WIRE_DTYPES: tuple[str, ...] = tuple(d.value for d in WireDtype)
"""``Plan.wire_dtype`` values, as strings: ``("float16", "float32", "q8_0")``."""


def _little(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class _Base:
    """Behaviour shared by every message: bitwise ``==``, a short ``repr``, no cross-field rule."""

    KIND: ClassVar[int]
    RELIABLE: ClassVar[bool]

    version: int = WIRE_VERSION

    def check(self) -> str | None:
        """Return the first broken cross-field rule (a sentence), or None if there is none.

        Field types are checked by the codec; this checks how fields constrain each other.
        """
        return None

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                        and _little(a.dtype) == _little(b.dtype)
                        and a.astype(_little(a.dtype), copy=False).tobytes()
                        == b.astype(_little(b.dtype), copy=False).tobytes()):
                    return False
            elif type(a) is not type(b) or a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # arrays and dicts are unhashable

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            shown = f"<{v.dtype}[{v.size}]>" if isinstance(v, np.ndarray) else repr(v)
            parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


# --- activations: one frame per SCTP packet on the unreliable channel ----------------------------


def _check_chunks(chunk: int, n_data: int, n_parity: int, offset: int, data: np.ndarray) -> str | None:
    """The chunk rules shared by :class:`LayerInput` and :class:`Partial`."""
    if n_data < 1:
        return f"n_data ({n_data}) must be >= 1"
    if n_parity > n_data:
        return f"n_parity ({n_parity}) must be <= n_data ({n_data})"
    if chunk >= n_data + n_parity:
        return f"chunk {chunk} out of range for n_data {n_data} + n_parity {n_parity}"
    if chunk < n_data:
        if data.dtype.kind != "f" and data.dtype != np.uint8:
            return f"data chunk {chunk} must be float16, float32 or uint8 (q8_0 blocks), got {data.dtype}"
    else:
        if data.dtype.kind != "u":
            return f"parity chunk {chunk} must be uint8, uint16 or uint32, got {data.dtype}"
        if offset != 0:
            return f"parity chunk {chunk} must have offset 0, got {offset}"
    return None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class LayerInput(_Base):
    """Coordinator -> worker: one chunk of the normalized input of sync point ``(layer, part)``,
    and what the worker must send back.

    The input is the flattened ``(n_tokens, dim)`` array (row-major) in the session's wire
    format (``Plan.wire_dtype``), cut as :mod:`halo_p2p.wire.vector` describes: data chunks
    ``0 .. n_data-1`` cover ``vector.chunk_ranges(fmt, n_tokens * dim, n_data)``, chunk ``k``
    holding elements from ``offset``; chunks ``n_data ..`` are XOR parity (``offset`` 0).

    The answer (:class:`Partial`) is one vector of ``len(segments)`` rows of ``(n_tokens, dim)``:
    row ``s`` is the sum of the partials of the next ``segments[s]`` groups of ``groups``.

    Attributes:
        session: session id (from :class:`Plan`).
        step: forward-pass counter within the session.
        layer: transformer block index.
        part: 0 = attention input, 1 = MLP input.
        start_pos: position (tokens) of the first of the ``n_tokens`` rows in the sequence.
        n_tokens: rows of the input.
        groups: the receiver's groups to compute and send at this point, segment by segment
            (indices among the layer's attention groups for part 0, MLP groups for part 1).
        segments: group counts of the answer's rows (each >= 1; they sum to ``len(groups)``).
        chunk: index of this chunk, ``< n_data + n_parity``.
        n_data: number of data chunks (>= 1).
        n_parity: number of parity chunks (``0 <= n_parity <= n_data``).
        offset: first element (flat index) of a data chunk; 0 for a parity chunk.
        data: the chunk's payload: float16/float32 elements or uint8 Q8_0 blocks
            (:mod:`halo_p2p.wire.quant`); parity: uint8/uint16/uint32 bit patterns.
    """

    KIND: ClassVar[int] = 1
    RELIABLE: ClassVar[bool] = False

    session: int
    step: int
    layer: int
    part: Part
    start_pos: int
    n_tokens: int
    groups: tuple[int, ...]
    segments: tuple[int, ...]
    chunk: int
    n_data: int
    n_parity: int
    offset: int
    data: Payload

    def check(self) -> str | None:
        if self.n_tokens < 1:
            return f"n_tokens ({self.n_tokens}) must be >= 1"
        if not self.groups or len(set(self.groups)) != len(self.groups):
            return f"groups {self.groups[:20]} must be non-empty and distinct"
        if 0 in self.segments or sum(self.segments) != len(self.groups):
            return f"segments {self.segments[:20]} must be >= 1 each and sum to len(groups) = {len(self.groups)}"
        return _check_chunks(self.chunk, self.n_data, self.n_parity, self.offset, self.data)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Partial(_Base):
    """Worker -> coordinator: one chunk of a worker's answer at ``(layer, part)``.

    The answer is the vector the :class:`LayerInput` asked for: ``len(segments)`` rows of the
    flattened ``(n_tokens, dim)``, row ``s`` the sum of the partials of its groups, in the session's
    wire format, chunked with parity exactly as a :class:`LayerInput` (``halo_p2p.wire.vector``).

    Attributes:
        session, step, layer, part: the sync point, as in :class:`LayerInput`.
        chunk, n_data, n_parity, offset: as in :class:`LayerInput`.
        norms: the L2 norm of each group's own partial, in the input's ``groups`` order
            (float16), so the coordinator can measure which groups mattered; empty when not
            asked for (prompts, strict modes) and on chunks other than 0.
        data: the chunk's payload or parity, as in :class:`LayerInput`.
    """

    KIND: ClassVar[int] = 2
    RELIABLE: ClassVar[bool] = False

    session: int
    step: int
    layer: int
    part: Part
    chunk: int
    n_data: int
    n_parity: int
    offset: int
    norms: Norms
    data: Payload

    def check(self) -> str | None:
        return _check_chunks(self.chunk, self.n_data, self.n_parity, self.offset, self.data)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Resend(_Base):
    """Coordinator -> worker: send these data chunks of your answer again (and its parity).

    Sent when a critical group's row is still incomplete after the worker's deadline.

    Attributes:
        session, step, layer, part: the sync point, as in :class:`Partial`.
        chunks: data chunk indices; empty when no chunk arrived (the coordinator does not know
            the answer's chunk count yet): send the whole answer.
    """

    KIND: ClassVar[int] = 3
    RELIABLE: ClassVar[bool] = False

    session: int
    step: int
    layer: int
    part: Part
    chunks: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class NeedInput(_Base):
    """Worker -> coordinator: the input of this sync point never arrived or could not be rebuilt.

    Attributes:
        session, step, layer, part: the sync point, as in :class:`LayerInput`.
    """

    KIND: ClassVar[int] = 4
    RELIABLE: ClassVar[bool] = False

    session: int
    step: int
    layer: int
    part: Part


# --- control: the reliable channel ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Plan(_Base):
    """Coordinator -> worker: load these groups and start session ``session``.

    Attributes:
        session: new session id (unsigned 32-bit; chosen by the coordinator).
        model_sha256: lowercase hex SHA-256 of the model file (64 characters).
        plan: the placement, the model config and the context length (:class:`~halo_p2p.plan.PlanBody`,
            sent as its versioned map, validated on decode: a bad body is a ``DecodeError``).
        wire_dtype: activation format on the wire, ``"float16"``, ``"float32"`` or ``"q8_0"``
            (:class:`WireDtype`, :mod:`halo_p2p.wire.quant`); decoded as a :class:`WireDtype`.
        mode: ``"strict"`` (every partial, on the reliable channel), ``"strict-unreliable"``
            (every partial, on the unreliable channel with FEC and Resend: the fair strict
            baseline) or ``"halo"`` (relaxed synchronization); decoded as a :class:`SyncMode`.
    """

    KIND: ClassVar[int] = 8
    RELIABLE: ClassVar[bool] = True

    session: int
    model_sha256: str
    plan: PlanBody
    wire_dtype: WireDtype
    mode: SyncMode

    def check(self) -> str | None:
        sha = self.model_sha256
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            return f"model_sha256 must be 64 lowercase hex digits, got {sha[:80]!r}"
        return None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class PlanReady(_Base):
    """Worker -> coordinator: the groups of the plan are loaded.

    Attributes:
        session: the session of the :class:`Plan`.
        weight_bytes: bytes of weights the worker holds for this plan.
        load_s: seconds it took to load them (>= 0).
    """

    KIND: ClassVar[int] = 9
    RELIABLE: ClassVar[bool] = True

    session: int
    weight_bytes: U64
    load_s: float

    def check(self) -> str | None:
        return None if self.load_s >= 0 else f"load_s must be >= 0, got {self.load_s}"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Reset(_Base):
    """Coordinator -> worker: start a new sequence in ``session`` (a new conversation).

    The worker forgets every position of its shard's KV cache and drops the inputs and answers
    it keeps; a ``Reset`` of another session is ignored. The coordinator sends it before a
    forward pass from position 0 that is not the session's first."""

    KIND: ClassVar[int] = 10
    RELIABLE: ClassVar[bool] = True

    session: int


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Bye(_Base):
    """Either way: the sender is leaving; ``reason`` is for humans. Layout frozen in every version."""

    KIND: ClassVar[int] = 11
    RELIABLE: ClassVar[bool] = True

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ErrorReply(_Base):
    """Either way: the sender refuses a message (see ``docs/wire-protocol.md`` for the codes).

    The layout is frozen in every version, so peers of different versions can still tell why.

    Attributes:
        code: machine-readable code; the wire layer reserves ``"version_mismatch"`` and
            ``"decode_error"``.
        message: one human-readable line naming the problem.
    """

    KIND: ClassVar[int] = 12
    RELIABLE: ClassVar[bool] = True

    code: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Heartbeat(_Base):
    """Either way, on the unreliable channel: liveness and round-trip probe.

    Attributes:
        seq: sender's counter.
        sent_s: sender's monotonic clock in seconds, echoed back unchanged by the ack.
    """

    KIND: ClassVar[int] = 13
    RELIABLE: ClassVar[bool] = False

    seq: int
    sent_s: float


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class HeartbeatAck(_Base):
    """Answer to :class:`Heartbeat`, echoing its ``seq`` and ``sent_s``."""

    KIND: ClassVar[int] = 14
    RELIABLE: ClassVar[bool] = False

    seq: int
    sent_s: float


# --- signaling: SDP offer/answer over the TCP signaling endpoint (halo_p2p.net.signaling) -------


def _check_signal(nonce: str, mac: str, sent_s: float) -> str | None:
    if not 16 <= len(nonce) <= 64 or any(c not in "0123456789abcdef" for c in nonce):
        return f"nonce must be 16 to 64 lowercase hex digits, got {nonce[:80]!r}"
    if mac and (len(mac) != 64 or any(c not in "0123456789abcdef" for c in mac)):
        return f"mac must be empty or 64 lowercase hex digits, got {mac[:80]!r}"
    if sent_s < 0:
        return f"sent_s must be >= 0, got {sent_s}"
    return None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class WeightsWanted(_Base):
    """Worker -> coordinator: this peer lacks the model file; stream these groups' weights.

    Attributes:
        session: the session of the :class:`Plan`.
        groups: flat ``(layer, part, index)`` triples of the groups to send (length a multiple of 3).
    """

    KIND: ClassVar[int] = 15
    RELIABLE: ClassVar[bool] = True

    session: int
    groups: tuple[int, ...]

    def check(self) -> str | None:
        if self.groups and len(self.groups) % 3 == 0:
            return None
        return "groups must be non-empty (layer, part, index) triples"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class GroupTensor(_Base):
    """Coordinator -> worker: a slice of one weight matrix of one group (see ``groups.py``).

    Attributes:
        session: the session of the :class:`Plan`.
        layer, part, index: the group.
        name: ``wq``/``wk``/``wv``/``wo`` (attention) or ``w1``/``w3``/``w2`` (MLP):
            :func:`halo_p2p.groups.tensor_names`.
        rows, cols: the matrix's shape, :meth:`halo_p2p.groups.GroupLayout.tensor_shapes` (``wo``
            and ``w2`` are column slices: ``(dim, width)``); a worker refuses any other.
        offset: first element (row-major flat index) of ``data``.
        data: 1-D float32 (or float16) elements ``[offset, offset + len(data))``.
    """

    KIND: ClassVar[int] = 16
    RELIABLE: ClassVar[bool] = True

    session: int
    layer: int
    part: Part
    index: int
    name: Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    rows: int
    cols: int
    offset: int
    data: Activations

    def check(self) -> str | None:
        if self.offset + self.data.size > self.rows * self.cols:
            return f"elements [{self.offset}, {self.offset + self.data.size}) exceed {self.rows}x{self.cols}"
        return None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class WeightsDone(_Base):
    """Coordinator -> worker: every :class:`GroupTensor` asked for has been sent."""

    KIND: ClassVar[int] = 17
    RELIABLE: ClassVar[bool] = True

    session: int


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class SignalOffer(_Base):
    """Connecting peer -> listening peer, on the signaling TCP stream: an SDP offer.

    ``mac`` is the HMAC-SHA256 (hex) under the swarm key of ``encode(replace(msg, mac=""))``.

    Attributes:
        peer_id: the offering peer's id.
        name: the offering peer's human-readable name.
        protocol: signaling protocol version (``halo_p2p.net.signaling.SIGNALING_PROTOCOL``).
        nonce: 32 random lowercase hex digits (16 to 64 accepted), used once.
        sent_s: the sender's wall clock (seconds since the epoch) when it signed the offer.
        sdp: the SDP offer (RFC 8866), with its candidates and DTLS fingerprint.
        mac: 64 lowercase hex digits; empty only while signing.
    """

    KIND: ClassVar[int] = 21
    RELIABLE: ClassVar[bool] = True

    peer_id: str
    name: str
    protocol: int
    nonce: str
    sent_s: float
    sdp: str
    mac: str

    def check(self) -> str | None:
        return _check_signal(self.nonce, self.mac, self.sent_s)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class SignalAnswer(_Base):
    """Listening peer -> connecting peer, on the signaling TCP stream: the SDP answer.

    Signed like :class:`SignalOffer`. ``offer_nonce`` binds the answer to one offer, so an
    old answer cannot be replayed to a new offer.

    Attributes:
        peer_id: the answering peer's id.
        name: the answering peer's human-readable name.
        protocol: signaling protocol version.
        nonce: 32 random lowercase hex digits, used once.
        offer_nonce: the ``nonce`` of the offer this answers.
        sent_s: the sender's wall clock (seconds since the epoch) when it signed the answer.
        sdp: the SDP answer.
        mac: 64 lowercase hex digits; empty only while signing.
    """

    KIND: ClassVar[int] = 22
    RELIABLE: ClassVar[bool] = True

    peer_id: str
    name: str
    protocol: int
    nonce: str
    offer_nonce: str
    sent_s: float
    sdp: str
    mac: str

    def check(self) -> str | None:
        return _check_signal(self.nonce, self.mac, self.sent_s) or _check_signal(self.offer_nonce, "", 0.0)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class SignalRefused(_Base):
    """Listening peer -> connecting peer, on the signaling TCP stream: the offer is refused.

    Not signed (a refusal grants nothing). The stream closes after it.

    Attributes:
        code: ``"auth"``, ``"replay"``, ``"version"``, ``"oversize"``, ``"bad-frame"``,
            ``"bad-sdp"`` or ``"busy"``.
        reason: one human-readable line.
    """

    KIND: ClassVar[int] = 23
    RELIABLE: ClassVar[bool] = True

    code: str
    reason: str


Message = (LayerInput | Partial | Resend | NeedInput | Plan | PlanReady | Reset | Bye | ErrorReply
           | Heartbeat | HeartbeatAck | WeightsWanted | GroupTensor | WeightsDone | SignalOffer | SignalAnswer
           | SignalRefused)
"""Every message kind; dispatch with ``match`` and ``assert_never``."""

MESSAGE_TYPES: tuple[type[Message], ...] = (
    LayerInput, Partial, Resend, NeedInput, Plan, PlanReady, Reset, Bye, ErrorReply, Heartbeat,
    HeartbeatAck, WeightsWanted, GroupTensor, WeightsDone, SignalOffer, SignalAnswer, SignalRefused,
)
"""Every message class, in KIND order."""

REGISTRY: dict[int, type[Message]] = {cls.KIND: cls for cls in MESSAGE_TYPES}
"""KIND -> message class."""

if len(REGISTRY) != len(MESSAGE_TYPES):  # pragma: no cover - caught at import by every test
    raise RuntimeError("two message classes share a KIND")

