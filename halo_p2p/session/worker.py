"""A worker of a split model: computes its neuron groups' partials for a coordinator.

It receives a :class:`~halo_p2p.wire.messages.Plan`, loads only its groups, then for every
:class:`~halo_p2p.wire.messages.LayerInput` it can assemble (data chunks, or data rebuilt from
XOR parity) computes its groups' partials and sends back the answer the input asks for: the
partials summed into one row per segment (normally one), as
:class:`~halo_p2p.wire.messages.Partial` chunks in the session's wire format, with XOR parity on
a link that measured loss. Inputs of sync points older than the newest one computed are stale
and dropped; a position whose input never arrived stays masked out of this worker's attention
heads (see :meth:`halo_p2p.model.shard.GroupShard.partials`). It keeps the answers of the last
few sync points to serve :class:`~halo_p2p.wire.messages.Resend`; a
:class:`~halo_p2p.wire.messages.Reset` (a new sequence) clears them and its shard's KV cache. The
frames, and the rules that size them, are those of :mod:`halo_p2p.session.frames`, shared with
the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from halo_p2p.engine.compute import HANDOFF_S, ComputeThread
from halo_p2p.engine.protocol import GroupCompute
from halo_p2p.errors import HaloError, LinkClosed, VersionMismatch, WireError
from halo_p2p.groups import GroupId, GroupLayout, tensor_names
from halo_p2p.net.link import Channel, Link
from halo_p2p.plan import PlanBody
from halo_p2p.session.frames import (
    Answer,
    SentVector,
    answer_frames,
    measured_lossy,
    send_paced,
    sends_norms,
    step_channel,
)
from halo_p2p.wire import codec
from halo_p2p.wire.chunks import Reassembly
from halo_p2p.wire.messages import (
    Bye,
    ErrorReply,
    GroupTensor,
    LayerInput,
    NeedInput,
    Plan,
    PlanReady,
    Resend,
    Reset,
    SyncMode,
    WeightsDone,
    WeightsWanted,
)
from halo_p2p.wire.quant import WireFormat, wire_format
from halo_p2p.wire.vector import ChunkedVector

__all__ = ["ModelOpener", "NeedWeights", "ShardFactory", "Worker"]

log = logging.getLogger(__name__)

ShardFactory = Callable[[list[GroupId], int], GroupCompute]
"""Builds a peer's shard from (its groups, max_seq_len); runs on the compute thread."""

ModelOpener = Callable[[str, PlanBody], tuple[GroupLayout, ShardFactory]]
"""Opens the model a :class:`Plan` names (by sha256; the :class:`~halo_p2p.plan.PlanBody` carries
the group layout and the model config): returns its layout (the worker refuses the plan unless
it is the body's) and a shard factory, or raises :class:`~halo_p2p.errors.HaloError` (the worker
replies :class:`ErrorReply`). Runs on the compute thread."""

class NeedWeights(HaloError):
    """Raised by a shard factory of a peer without the model file: these groups must be streamed.

    Attributes:
        groups: the groups whose weights are missing.
        store: ``store(group, tensors)`` keeps one streamed group (called on the compute thread).
    """

    def __init__(self, groups: list[GroupId], store: Callable[[GroupId, dict[str, np.ndarray]], None]) -> None:
        super().__init__(f"{len(groups)} group(s) must be streamed from the coordinator")
        self.groups, self.store = groups, store


_KEEP_RESULTS = 8
_INPUT_GAP_S = 0.02   # an incomplete input silent this long has lost chunks


@dataclass(slots=True)
class _Input:
    first: LayerInput              # the header every chunk of this input must repeat
    vector: ChunkedVector
    queued: bool = False

    def same(self, msg: LayerInput) -> bool:
        f = self.first
        return (msg.n_tokens, msg.start_pos, msg.groups, msg.segments) == (f.n_tokens, f.start_pos, f.groups,
                                                                            f.segments)


class Worker:
    """Serves one coordinator over ``link``.

    Args:
        peer_id: this peer's id (as named in plans).
        link: the link to the coordinator.
        open_model: resolves the model of a plan to its layout and a shard factory.
        compute: this peer's compute thread (shared by all sessions the peer serves).
        uplink_parity: on the unreliable channel, follow the answer's chunks with XOR parity
            chunks on a link whose heartbeats measured loss (uplink FEC: one lost chunk per
            parity stripe is rebuilt; a one-chunk answer is sent twice).
    """

    def __init__(self, peer_id: str, link: Link, open_model: ModelOpener, compute: ComputeThread, *,
                 uplink_parity: bool = True) -> None:
        self.peer_id, self.link = peer_id, link
        self.uplink_parity = uplink_parity
        self.open_model, self.compute = open_model, compute
        self.layout: GroupLayout | None = None
        self.shard: GroupCompute | None = None
        self.session = -1
        self.max_seq_len = 0       # the session's KV-cache length (tokens): inputs beyond it are refused
        self.mode = SyncMode.HALO
        self.fmt: WireFormat = wire_format("q8_0")
        self._inputs: dict[tuple[int, int, int], _Input] = {}
        self._results: OrderedDict[tuple[int, int, int], SentVector] = OrderedDict()   # answers kept for Resend
        self._checks: dict[tuple[int, int, int], asyncio.TimerHandle] = {}
        self._pending: tuple[Plan, NeedWeights] | None = None     # a plan waiting for streamed weights
        self._streamed: dict[GroupId, dict[str, Reassembly]] = {}
        self._wanted: set[GroupId] = set()                        # the groups of the pending plan's WeightsWanted
        self._latest: tuple[int, int, int] = (-1, -1, -1)   # newest sync point computed
        self._queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
        self.counters: Counter[str] = Counter()
        self.step_intervals_s: deque[float] = deque(maxlen=64)   # time between steps (TPOT seen here)
        self._last_step: tuple[int, float] = (-1, 0.0)

    async def run(self) -> None:
        """Serve until the link closes or the coordinator says Bye.

        Nothing a frame holds ends the session: a frame that does not decode is counted
        (``counters["malformed"]``) and dropped (answered with :class:`ErrorReply` on the reliable
        channel); a decoded message this peer cannot act on (its handling raised, e.g. an input
        beyond the KV cache) is counted (``counters["rejected"]``) and dropped.
        """
        computer = asyncio.create_task(self._compute_loop(), name=f"compute-{self.peer_id}")
        try:
            while True:
                try:
                    channel, frame = await self.link.recv()
                except LinkClosed:
                    return
                try:
                    msg = codec.decode(frame)
                except WireError as exc:
                    self.counters["malformed"] += 1
                    log.debug("%s: malformed frame: %s", self.peer_id, exc)
                    if channel == Channel.RELIABLE:    # a control message (e.g. a bad Plan body): say so
                        code = "version_mismatch" if isinstance(exc, VersionMismatch) else "decode_error"
                        await self._reply(ErrorReply(code=code, message=str(exc)[:400]))
                    continue
                if isinstance(msg, Bye):
                    return
                try:
                    if isinstance(msg, LayerInput):
                        self._on_input(msg)
                    elif isinstance(msg, Resend):
                        await self._on_resend(msg)
                    elif isinstance(msg, Plan):
                        await self._on_plan(msg)
                    elif isinstance(msg, GroupTensor):
                        await self._on_group_tensor(msg)
                    elif isinstance(msg, WeightsDone):
                        if self._pending is not None and msg.session == self._pending[0].session:
                            plan, self._pending = self._pending[0], None
                            await self._on_plan(plan)
                    elif isinstance(msg, Reset):
                        await self._on_reset(msg)
                    else:
                        self.counters["unexpected"] += 1
                except LinkClosed:
                    return
                except Exception as exc:   # a message's content must not end the session
                    self._rejected(type(msg).__name__, exc)
        finally:
            for handle in self._checks.values():
                handle.cancel()
            computer.cancel()
            await asyncio.gather(computer, return_exceptions=True)

    def _rejected(self, what: str, exc: Exception) -> None:
        """Count a message whose handling raised; the first is logged as a warning, the rest at debug."""
        self.counters["rejected"] += 1
        level = logging.WARNING if self.counters["rejected"] == 1 else logging.DEBUG
        log.log(level, "%s: dropped %s (%d so far): %s: %s", self.peer_id, what, self.counters["rejected"],
                type(exc).__name__, exc)

    async def _reply(self, msg: ErrorReply) -> None:
        with contextlib.suppress(LinkClosed):
            await self.link.send(Channel.RELIABLE, codec.encode(msg))

    async def _on_plan(self, msg: Plan) -> None:
        t0 = time.perf_counter()
        body = msg.plan
        try:
            layout, factory = await self.compute.run(self.open_model, msg.model_sha256, body)
            if layout != body.layout:
                raise HaloError(f"the plan's layout {body.layout} is not this peer's model's {layout}",
                                "check both peers hold the same model file")
            groups = body.placement.groups_of(self.peer_id)
            try:
                self.shard = await self.compute.run(factory, groups, body.max_seq_len)
            except NeedWeights as need:
                self._await_weights(msg, need)
                flat = tuple(v for g in need.groups for v in (g.layer, g.part, g.index))
                await self.link.send(Channel.RELIABLE, codec.encode(WeightsWanted(session=msg.session, groups=flat)))
                return
            self.layout = layout
        except LinkClosed:
            raise
        except Exception as exc:   # e.g. a KV cache too big to allocate: refuse the plan
            self.counters["bad_plan"] += 1
            log.warning("%s: refusing plan: %s", self.peer_id, exc)
            await self.link.send(Channel.RELIABLE, codec.encode(ErrorReply(code="bad-plan", message=str(exc))))
            return
        self.session, self.mode, self.max_seq_len = msg.session, msg.mode, body.max_seq_len
        self.fmt = wire_format(msg.wire_dtype)
        self._forget()
        self._latest = (-1, -1, -1)
        ready = PlanReady(session=msg.session, weight_bytes=self.shard.weight_bytes(),
                          load_s=time.perf_counter() - t0)
        await self.link.send(Channel.RELIABLE, codec.encode(ready))

    async def _on_reset(self, msg: Reset) -> None:
        """A new sequence: forget the inputs and answers kept, and the shard's KV cache."""
        if msg.session != self.session or self.shard is None:
            self.counters["stale"] += 1
            return
        self._forget()
        await self.compute.run(self.shard.reset)     # after any computation already queued there
        self.counters["resets"] += 1

    def _forget(self) -> None:
        self._inputs.clear()
        self._results.clear()
        for handle in self._checks.values():
            handle.cancel()
        self._checks.clear()

    def _await_weights(self, plan: Plan, need: NeedWeights) -> None:
        self._pending = (plan, need)
        self._wanted = set(need.groups)
        self._streamed = {}
        self.counters["weights_wanted"] += len(need.groups)

    async def _on_group_tensor(self, msg: GroupTensor) -> None:
        if self._pending is None or msg.session != self._pending[0].session:
            self.counters["stale"] += 1
            return
        gid = GroupId(msg.layer, msg.part, msg.index)
        shapes = self._pending[0].plan.layout.tensor_shapes(gid.part)
        if gid not in self._wanted or shapes.get(msg.name) != (msg.rows, msg.cols):
            self.counters["malformed"] += 1           # a group not asked for, or another name or shape
            return
        parts = self._streamed.setdefault(gid, {})
        try:
            piece = parts.setdefault(msg.name, Reassembly(msg.rows * msg.cols, msg.data.dtype))
            piece.add(msg.offset, msg.data)
        except WireError:
            self.counters["malformed"] += 1
            return
        names = tensor_names(gid.part)
        if all(n in parts and parts[n].complete for n in names):
            tensors = {n: parts[n].array.astype(np.float32).reshape(shapes[n]) for n in names}
            del self._streamed[gid]
            await self.compute.run(self._pending[1].store, gid, tensors)
            self.counters["groups_streamed"] += 1

    def _on_input(self, msg: LayerInput) -> None:
        key = (msg.step, msg.layer, msg.part)
        if msg.step > self._last_step[0] and msg.n_tokens == 1:
            now = time.monotonic()
            if self._last_step[0] >= 0:
                self.step_intervals_s.append(now - self._last_step[1])
            self._last_step = (msg.step, now)
        if msg.session != self.session or self.shard is None or self.layout is None:
            self.counters["stale"] += 1
            return
        if key <= self._latest:
            self.counters["redundant" if key == self._latest else "stale"] += 1
            return
        inp = self._inputs.get(key)
        try:
            if msg.start_pos + msg.n_tokens > self.max_seq_len:
                raise WireError(f"input at positions [{msg.start_pos}, {msg.start_pos + msg.n_tokens}) exceeds the "
                                f"session's {self.max_seq_len} tokens")
            if inp is None:
                vector = ChunkedVector(self.fmt, msg.n_tokens * self.layout.dim, msg.n_data, msg.n_parity)
                inp = _Input(msg, vector)
            elif not (inp.same(msg) and inp.vector.matches(msg.n_data, msg.n_parity)):
                raise WireError(f"chunk {msg.chunk} of input {key} disagrees with the earlier chunks")
            if inp.queued:
                return
            inp.vector.add(msg.chunk, msg.offset, msg.data)
        except WireError as exc:
            self.counters["malformed"] += 1
            log.debug("%s: bad input chunk for %s: %s", self.peer_id, key, exc)
            return
        self._inputs[key] = inp
        if inp.vector.complete:
            inp.queued = True
            self._queue.put_nowait(key)
        elif key not in self._checks:          # some chunks arrived, the rest may be lost
            loop = asyncio.get_running_loop()
            self._checks[key] = loop.call_later(_INPUT_GAP_S, self._check_input, key)

    def _check_input(self, key: tuple[int, int, int]) -> None:
        """An input still incomplete after a silent gap: ask the coordinator for it again."""
        self._checks.pop(key, None)
        inp = self._inputs.get(key)
        if inp is None or inp.queued or key <= self._latest:
            return
        self.counters["need_input"] += 1
        frame = codec.encode(NeedInput(session=self.session, step=key[0], layer=key[1], part=key[2]))
        task = asyncio.ensure_future(self.link.send(Channel.UNRELIABLE, frame))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _compute_loop(self) -> None:
        while True:
            key = await self._queue.get()
            try:
                await self._compute(key)
            except LinkClosed:
                return
            except Exception as exc:   # one input's failure must not stop the computing
                self._rejected(f"input {key}", exc)

    async def _compute(self, key: tuple[int, int, int]) -> None:
        """Compute and send the answer to the complete input ``key``."""
        inp = self._inputs.pop(key, None)
        if inp is None or key <= self._latest or self.shard is None or self.layout is None:
            self.counters["stale"] += 1
            return
        check = self._checks.pop(key, None)
        if check is not None:
            check.cancel()
        _, layer, part = key
        held = self.shard.groups_at(layer, part)
        head = inp.first
        if not set(head.groups) <= set(held):
            self.counters["bad_groups"] += 1
            log.warning("%s: input %s asks for groups %s; this peer holds %s", self.peer_id, key,
                        sorted(set(head.groups) - set(held)), held)
            return
        self._latest = key
        for old in [k for k in self._inputs if k <= key]:
            del self._inputs[old]
        x = inp.vector.values().reshape(head.n_tokens, self.layout.dim)
        rows = [list(r) for r in Answer(head.groups, head.segments).rows()]
        norms = sends_norms(self.mode, head.n_tokens, head.step)
        sums, group_norms = await self.compute.run(   # a decode step's share: inline once measured short
            self.shard.answer, layer, part, x, head.start_pos, rows, norms=norms,
            inline_below_s=HANDOFF_S if head.n_tokens == 1 else None, kind=f"answer/{head.n_tokens == 1}")
        channel = step_channel(self.mode, head.n_tokens)
        sent = answer_frames(self.session, head.step, head.layer, head.part, n_groups=len(head.groups),
                             values=sums.reshape(-1), fmt=self.fmt, channel=channel,
                             parity=self._parity_on(channel), norms=group_norms if norms else None)
        self._results[key] = sent
        while len(self._results) > _KEEP_RESULTS:
            self._results.popitem(last=False)
        await send_paced(self.link, channel, sent.frames)

    def _parity_on(self, channel: Channel) -> bool:
        """Whether the answer carries parity chunks: uplink FEC on the unreliable channel, unless
        the link's heartbeats measured no loss at all (``measured_plr == 0``; ``None``, not yet
        measured, counts as lossy): on a clean link parity only doubles the frames."""
        return self.uplink_parity and channel == Channel.UNRELIABLE and measured_lossy(self.link)

    async def _on_resend(self, msg: Resend) -> None:
        key = (msg.step, msg.layer, msg.part)
        if msg.session != self.session:
            return
        answer = self._results.get(key)
        if answer is None:
            waiting = key in self._inputs and not self._inputs[key].queued
            if waiting or (key > self._latest and key not in self._inputs):
                self.counters["need_input"] += 1
                await self.link.send(Channel.UNRELIABLE, codec.encode(NeedInput(
                    session=self.session, step=msg.step, layer=msg.layer, part=msg.part)))
            return
        again = answer.again(msg.chunks)
        self.counters["resent_chunks"] += len(again) - (len(answer.frames) - answer.n_data)   # data chunks
        await send_paced(self.link, answer.channel, again)
