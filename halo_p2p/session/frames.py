"""The activation frames of a split-model session, as both ends build, keep and send them.

The coordinator and the worker apply the same rules here: which channel a step travels on
(:func:`step_channel`), whether an answer carries its groups' norms (:func:`sends_norms`), whether
a vector is followed by parity (:func:`measured_lossy`); and they build their frames with the same
functions (:func:`input_frames`, :func:`answer_frames`, :func:`answer_chunk_count`; the templates,
chunk budgets and encoding underneath are :mod:`halo_p2p.wire.framing`'s), so the coordinator
knows how many chunks each answer takes before anything arrives. What was sent is kept as a
:class:`SentVector`, to serve ``NeedInput`` (coordinator) and ``Resend`` (worker), and sent paced
with :func:`send_paced`. See ``docs/wire-protocol.md`` §1, §4-§6.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from halo_p2p.errors import TransportError
from halo_p2p.net.link import Channel, Link
from halo_p2p.wire.framing import answer_chunk_count as _answer_chunk_count
from halo_p2p.wire.framing import answer_template, encode_frames, input_template
from halo_p2p.wire.messages import SyncMode
from halo_p2p.wire.quant import WireFormat
from halo_p2p.wire.vector import EncodedVector

__all__ = ["NORM_EVERY_STEPS", "PACE_FRAMES", "UNSTABLE_PLR", "Answer", "SentVector", "answer_chunk_count",
           "answer_frames", "answer_layout", "input_frames", "measured_lossy", "send_paced", "sends_norms",
           "step_channel"]

log = logging.getLogger(__name__)

PACE_FRAMES = 16
"""Unreliable frames sent between waits for the link's backlog to drain (``Link.drain``)."""
NORM_EVERY_STEPS = 4
"""A ``halo`` decode step whose number is a multiple of this sends its groups' partial norms."""
UNSTABLE_PLR = 0.01
"""A link whose heartbeats measured a loss rate above this makes its peer *unstable*: in ``halo``
mode the coordinator computes that peer's critical MLP groups itself (per-token dynamic placement)."""


def measured_lossy(link: Link) -> bool:
    """False only when ``link``'s heartbeats measured no loss (``measured_plr == 0``): the
    condition for following a decode step's vectors (``LayerInput`` and ``Partial``) with parity
    chunks. Unmeasured (``None``, e.g. in-memory links or the first seconds) counts as lossy."""
    return link.stats.measured_plr != 0


def sends_norms(mode: SyncMode | str, n_tokens: int, step: int) -> bool:
    """Whether the answers of ``step`` carry their groups' partial norms (``Partial.norms``): the
    live criticality recall is measured from them. Forming per-group partials costs about a
    quarter more compute than one summed product (GroupShard.answer), so one ``halo`` decode step
    in :data:`NORM_EVERY_STEPS` measures; both ends apply this rule (it sizes the answer's frames)."""
    return mode == SyncMode.HALO and n_tokens == 1 and step % NORM_EVERY_STEPS == 0


def step_channel(mode: SyncMode | str, n_tokens: int) -> Channel:
    """The channel a step's layer inputs and partials travel on, both ways (coordinator and worker).

    ``strict``: always the reliable channel. ``halo`` and ``strict-unreliable``: decode steps
    (``n_tokens == 1``) on the unreliable one (halo skips a late or lost answer holding only
    non-critical groups; both repair losses with FEC and Resend); a prompt's
    steps (``n_tokens > 1``) on the reliable one: every group of a prompt is critical (the KV
    cache must be exact) and each partial spans dozens of packets, so SCTP's own retransmission
    repairs a burst's losses sooner than Resend round trips (namespaces, 5 % PLR: a 37-token
    SmolLM2 prompt took 34 s over the unreliable channel, 8-19 s over the reliable one;
    docs/benchmarks.md §7).
    """
    return Channel.UNRELIABLE if mode != SyncMode.STRICT and n_tokens == 1 else Channel.RELIABLE


def answer_layout(groups: Iterable[int], critical: frozenset[int], *, split: bool) -> Answer:
    """What one worker sends back at a sync point: one sum, or a sum of its critical groups and
    a sum of the others.

    One sum per worker is the floor of frames (a summed partial is as large as one group's); a
    second row costs as many frames again and lets the coordinator use the critical sum when
    the other is lost. Measured on this stack it does not pay with uplink FEC (a one-frame sum
    sent twice is lost with probability ``q**2``, the critical row of a split answer with
    ``~2 q**2``; docs/benchmarks.md §10), so the session splits only when asked
    (``SessionOptions.split_critical``).

    Args:
        groups: the worker's groups at this point (the ones it must send).
        critical: the critical groups of the point.
        split: make two rows when both kinds are present.
    """
    held = sorted(groups)
    crit = [g for g in held if g in critical]
    rest = [g for g in held if g not in critical]
    if split and crit and rest:
        return Answer((*crit, *rest), (len(crit), len(rest)))
    return Answer(tuple(held), (len(held),))


@dataclass(frozen=True, slots=True)
class Answer:
    """The rows a worker sends at one sync point (``LayerInput.groups`` / ``segments``).

    Attributes:
        groups: group indices, row by row.
        segments: groups per row; row ``s`` sums the next ``segments[s]`` groups.
    """

    groups: tuple[int, ...]
    segments: tuple[int, ...]

    def rows(self) -> list[tuple[int, ...]]:
        """The groups of each row."""
        out, i = [], 0
        for n in self.segments:
            out.append(self.groups[i:i + n])
            i += n
        return out


@dataclass(slots=True)
class SentVector:
    """The frames of one vector as sent (an input to one worker, or a worker's answer).

    Attributes:
        channel: the channel they went on.
        frames: the encoded frames: ``n_data`` data chunks, then the parity chunks.
        n_data: data chunks.
    """

    channel: Channel
    frames: list[bytes]
    n_data: int

    def again(self, chunks: Sequence[int] = ()) -> list[bytes]:
        """The frames to send again for a request naming the data ``chunks`` still missing (every
        data chunk if it names none; indices out of range are ignored), then every parity chunk."""
        if not chunks:
            return self.frames
        return [self.frames[k] for k in chunks if 0 <= k < self.n_data] + self.frames[self.n_data:]


def input_frames(session: int, step: int, layer: int, part: int, *, start_pos: int, n_tokens: int,
                 groups: tuple[int, ...], segments: tuple[int, ...], values: np.ndarray, fmt: WireFormat,
                 channel: Channel, parity: bool, cache: dict[tuple[int, bool], EncodedVector]) -> SentVector:
    """The ``LayerInput`` frames of one sync point for one worker.

    Args:
        groups, segments: the answer the worker must send (``LayerInput.groups`` / ``segments``).
        values: the flat float32 ``(n_tokens * dim,)`` normalized input.
        parity: follow the data chunks with parity chunks (downlink FEC).
        cache: one dict per sync point, shared by its workers: the input is quantized once.
    Raises:
        WireError: ``values`` cannot be encoded in ``fmt`` (a NaN in ``q8_0``).
    """
    template = input_template(session, step, layer, part, start_pos=start_pos, n_tokens=n_tokens, groups=groups,
                              segments=segments, fmt=fmt)
    vec, frames = encode_frames(template, values, fmt, reliable=channel == Channel.RELIABLE, parity=parity,
                                cache=cache)
    return SentVector(channel, frames, vec.n_data)


def answer_frames(session: int, step: int, layer: int, part: int, *, n_groups: int, values: np.ndarray,
                  fmt: WireFormat, channel: Channel, parity: bool, norms: np.ndarray | None) -> SentVector:
    """A worker's ``Partial`` frames at one sync point.

    Args:
        n_groups: groups the answer sums (``len(LayerInput.groups)``).
        values: the flat float32 answer (its rows, each ``(n_tokens, dim)``).
        parity: follow the data chunks with parity chunks (uplink FEC).
        norms: each group's partial norm (when :func:`sends_norms`), sent as float16 on chunk 0;
            ``None``: the frames carry none (and reserve no room for them).
    """
    template = answer_template(session, step, layer, part, n_groups=n_groups, norms=norms is not None, fmt=fmt)
    vec, frames = encode_frames(template, values, fmt, reliable=channel == Channel.RELIABLE, parity=parity,
                                norms=norms.astype(np.float16) if norms is not None else None)
    return SentVector(channel, frames, vec.n_data)


def answer_chunk_count(n_elems: int, fmt: WireFormat, *, n_groups: int, with_norms: bool, channel: Channel) -> int:
    """Data chunks of the answer :func:`answer_frames` builds for ``n_elems`` values of ``n_groups``
    groups (``with_norms``: the frames carry their norms): what the coordinator expects."""
    return _answer_chunk_count(n_elems, fmt, n_norms=n_groups if with_norms else 0,
                               reliable=channel == Channel.RELIABLE)


async def send_paced(link: Link, channel: Channel, frames: list[bytes]) -> None:
    """Send ``frames``; on the unreliable channel wait every :data:`PACE_FRAMES` frames until the
    link's backlog drains, so that its backlog cap never drops a burst.

    Raises:
        LinkClosed: the link closed (a backlog that does not drain is logged, not raised).
    """
    for i, frame in enumerate(frames):
        if channel == Channel.UNRELIABLE and i and i % PACE_FRAMES == 0:
            try:
                await link.drain()
            except TransportError:
                log.debug("backlog to %s did not drain", link.remote_id)
        await link.send(channel, frame)
