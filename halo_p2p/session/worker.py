"""A worker of a split model: computes its neuron groups' partials for a coordinator.

It receives a :class:`~halo_p2p.wire.messages.Plan`, loads only its groups, then for every
:class:`~halo_p2p.wire.messages.LayerInput` it can assemble (data chunks, or data rebuilt from
XOR parity) computes its groups' partials in order and sends them back as
:class:`~halo_p2p.wire.messages.Partial` chunks. Inputs of sync points older than the newest one
computed are stale and dropped; a position whose input never arrived stays masked out of this
worker's attention heads (see :meth:`halo_p2p.model.shard.GroupShard.partials`). It keeps the
partials of the last few sync points to answer :class:`~halo_p2p.wire.messages.Resend`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from halo_p2p.engine.compute import ComputeThread
from halo_p2p.engine.protocol import GroupCompute
from halo_p2p.errors import HaloError, LinkClosed, WireError
from halo_p2p.groups import GroupId, GroupLayout
from halo_p2p.model.config import ModelConfig
from halo_p2p.net.link import Channel, Link
from halo_p2p.plan import PlacementPlan
from halo_p2p.session.coordinator import RELIABLE_CHUNK_BYTES
from halo_p2p.session.sync import measured_lossy, step_channel
from halo_p2p.wire import codec, fec
from halo_p2p.wire.chunks import Reassembly, chunk_ranges, split_ranges
from halo_p2p.wire.messages import (
    Bye,
    ErrorReply,
    GroupTensor,
    LayerInput,
    NeedInput,
    Partial,
    PartialParity,
    Plan,
    PlanReady,
    Resend,
    Reset,
    WeightsDone,
    WeightsWanted,
)

__all__ = ["ModelOpener", "NeedWeights", "ShardFactory", "Worker"]

log = logging.getLogger(__name__)

ShardFactory = Callable[[list[GroupId], int], GroupCompute]
"""Builds a peer's shard from (its groups, max_seq_len); runs on the compute thread."""

ModelOpener = Callable[[str, Mapping[str, Any]], tuple[GroupLayout, ShardFactory]]
"""Opens the model a :class:`Plan` names (by sha256; the plan body carries the group layout):
returns its layout and a shard factory, or raises :class:`~halo_p2p.errors.HaloError` (the
worker replies :class:`ErrorReply`). Runs on the compute thread."""

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
    n_tokens: int
    start_pos: int
    n_data: int
    n_parity: int
    dtype: np.dtype
    chunks: dict[int, np.ndarray] = field(default_factory=dict)
    queued: bool = False


class Worker:
    """Serves one coordinator over ``link``.

    Args:
        peer_id: this peer's id (as named in plans).
        link: the link to the coordinator.
        open_model: resolves the model of a plan to its layout and a shard factory.
        compute: this peer's compute thread (shared by all sessions the peer serves).
        uplink_parity: on the unreliable channel, follow each group's partial with a
            :class:`~halo_p2p.wire.messages.PartialParity` frame (uplink FEC: any one lost chunk
            of the group is rebuilt; costs one frame per group).
    """

    def __init__(self, peer_id: str, link: Link, open_model: ModelOpener, compute: ComputeThread, *,
                 uplink_parity: bool = True) -> None:
        self.peer_id, self.link = peer_id, link
        self.uplink_parity = uplink_parity
        self.open_model, self.compute = open_model, compute
        self.layout: GroupLayout | None = None
        self.shard: GroupCompute | None = None
        self.session = -1
        self.mode = "halo"
        self.wire_dtype = np.dtype(np.float16)
        self._inputs: dict[tuple[int, int, int], _Input] = {}
        self._results: OrderedDict[tuple[int, int, int], list[list[bytes]]] = OrderedDict()
        self._channels: dict[tuple[int, int, int], Channel] = {}
        self._checks: dict[tuple[int, int, int], asyncio.TimerHandle] = {}
        self._pending: tuple[Plan, NeedWeights] | None = None     # a plan waiting for streamed weights
        self._streamed: dict[GroupId, dict[str, Reassembly]] = {}
        self._latest: tuple[int, int, int] = (-1, -1, -1)   # newest sync point computed
        self._queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
        self.counters: Counter[str] = Counter()
        self.step_intervals_s: deque[float] = deque(maxlen=64)   # time between steps (TPOT seen here)
        self._last_step: tuple[int, float] = (-1, 0.0)

    async def run(self) -> None:
        """Serve until the link closes or the coordinator says Bye."""
        computer = asyncio.create_task(self._compute_loop(), name=f"compute-{self.peer_id}")
        try:
            while True:
                try:
                    _, frame = await self.link.recv()
                except LinkClosed:
                    return
                try:
                    msg = codec.decode(frame)
                except WireError as exc:
                    self.counters["malformed"] += 1
                    log.debug("%s: malformed frame: %s", self.peer_id, exc)
                    continue
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
                    self._inputs.clear()
                    self._results.clear()
                elif isinstance(msg, Bye):
                    return
                else:
                    self.counters["unexpected"] += 1
        finally:
            for handle in self._checks.values():
                handle.cancel()
            computer.cancel()
            await asyncio.gather(computer, return_exceptions=True)

    async def _on_plan(self, msg: Plan) -> None:
        t0 = time.perf_counter()
        try:
            body = msg.plan
            layout, factory = await self.compute.run(self.open_model, msg.model_sha256, body)
            plan = PlacementPlan.from_dict(body["placement"], layout)
            max_seq_len = int(body["max_seq_len"])
            groups = plan.groups_of(self.peer_id)
            try:
                self.shard = await self.compute.run(factory, groups, max_seq_len)
            except NeedWeights as need:
                self._await_weights(msg, need)
                flat = tuple(v for g in need.groups for v in (g.layer, g.part, g.index))
                await self.link.send(Channel.RELIABLE, codec.encode(WeightsWanted(session=msg.session, groups=flat)))
                return
            self.layout = layout
        except (HaloError, KeyError, TypeError, ValueError) as exc:
            self.counters["bad_plan"] += 1
            log.warning("%s: refusing plan: %s", self.peer_id, exc)
            await self.link.send(Channel.RELIABLE, codec.encode(ErrorReply(code="bad-plan", message=str(exc))))
            return
        self.session, self.mode = msg.session, msg.mode
        self.wire_dtype = np.dtype(msg.wire_dtype)
        self._inputs.clear()
        self._results.clear()
        self._latest = (-1, -1, -1)
        ready = PlanReady(session=msg.session, weight_bytes=self.shard.weight_bytes(),
                          load_s=time.perf_counter() - t0)
        await self.link.send(Channel.RELIABLE, codec.encode(ready))

    def _await_weights(self, plan: Plan, need: NeedWeights) -> None:
        self._pending = (plan, need)
        self._streamed = {}
        self.counters["weights_wanted"] += len(need.groups)

    async def _on_group_tensor(self, msg: GroupTensor) -> None:
        if self._pending is None or msg.session != self._pending[0].session:
            self.counters["stale"] += 1
            return
        gid = GroupId(msg.layer, msg.part, msg.index)
        parts = self._streamed.setdefault(gid, {})
        try:
            piece = parts.setdefault(msg.name, Reassembly(msg.rows * msg.cols, msg.data.dtype))
            piece.add(msg.offset, msg.data)
        except WireError:
            self.counters["malformed"] += 1
            return
        names = ("wq", "wk", "wv", "wo") if gid.part == 0 else ("w1", "w3", "w2")
        if all(n in parts and parts[n].complete for n in names):
            shapes = self._shapes(gid)
            tensors = {n: parts[n].array.astype(np.float32).reshape(shapes[n]) for n in names}
            del self._streamed[gid]
            await self.compute.run(self._pending[1].store, gid, tensors)
            self.counters["groups_streamed"] += 1

    def _shapes(self, gid: GroupId) -> dict[str, tuple[int, int]]:
        c = ModelConfig(**self._pending[0].plan["config"])  # type: ignore[index]
        width = c.q_per_kv * c.head_dim
        g = int(self._pending[0].plan["placement"]["mlp_group_size"])  # type: ignore[index]
        return {"wq": (width, c.dim), "wk": (c.head_dim, c.dim), "wv": (c.head_dim, c.dim), "wo": (c.dim, width),
                "w1": (g, c.dim), "w3": (g, c.dim), "w2": (c.dim, g)}

    def _on_input(self, msg: LayerInput) -> None:
        key = (msg.step, msg.layer, msg.part)
        if msg.step > self._last_step[0] and msg.n_tokens == 1:
            now = time.monotonic()
            if self._last_step[0] >= 0:
                self.step_intervals_s.append(now - self._last_step[1])
            self._last_step = (msg.step, now)
        if msg.session != self.session or self.shard is None:
            self.counters["stale"] += 1
            return
        if key <= self._latest:
            self.counters["redundant" if key == self._latest else "stale"] += 1
            return
        inp = self._inputs.get(key)
        if inp is None:
            dtype = msg.data.dtype if msg.chunk < msg.n_data else (
                np.dtype(np.float16) if msg.data.dtype == np.uint16 else np.dtype(np.float32))
            inp = self._inputs[key] = _Input(msg.n_tokens, msg.start_pos, msg.n_data, msg.n_parity, dtype)
        if inp.queued:
            return
        inp.chunks[msg.chunk] = msg.data
        if self._assemble(key, inp) is not None:
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
        frame = codec.encode(NeedInput(session=self.session, step=key[0], layer=key[1], part=key[2]))  # type: ignore[arg-type]
        task = asyncio.ensure_future(self.link.send(Channel.UNRELIABLE, frame))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _assemble(self, key: tuple[int, int, int], inp: _Input) -> np.ndarray | None:
        assert self.layout is not None
        total = inp.n_tokens * self.layout.dim
        lengths = [b - a for a, b in split_ranges(total, inp.n_data)]
        try:
            data = fec.recover(inp.chunks, inp.n_data, inp.n_parity, lengths, inp.dtype)
        except (WireError, ValueError) as exc:
            self.counters["malformed"] += 1
            log.debug("%s: bad input chunks for %s: %s", self.peer_id, key, exc)
            inp.chunks.clear()
            return None
        if data is None:
            return None
        return np.concatenate(data).reshape(inp.n_tokens, self.layout.dim)

    async def _compute_loop(self) -> None:
        while True:
            key = await self._queue.get()
            inp = self._inputs.pop(key, None)
            if inp is None or key <= self._latest or self.shard is None:
                self.counters["stale"] += 1
                continue
            x = self._assemble(key, inp)
            if x is None:
                continue
            step, layer, part = key
            self._latest = key
            for old in [k for k in self._inputs if k <= key]:
                del self._inputs[old]
            partials = await self.compute.run(self.shard.partials, layer, part, x, inp.start_pos)
            channel = step_channel(self.mode, inp.n_tokens)
            parity = self._parity_on(channel)
            frames = self._frames(step, layer, part, partials, channel, parity)
            self._results[key] = frames
            while len(self._results) > _KEEP_RESULTS:
                old, _ = self._results.popitem(last=False)
                self._channels.pop(old, None)
            self._channels[key] = channel
            # every group's data first, then its parity frames (the last of each group's frames,
            # needed only if something was lost)
            k = int(parity)
            await self._send_all(channel, [f for fs in frames for f in fs[:len(fs) - k]] +
                                 [f for fs in frames for f in fs[len(fs) - k:]])

    async def _send_all(self, channel: Channel, frames: list[bytes]) -> None:
        """Send frames, pausing every 16 unreliable ones until the link's backlog drains."""
        for i, frame in enumerate(frames):
            if channel == Channel.UNRELIABLE and i and i % 16 == 0:
                await self.link.drain()
            await self.link.send(channel, frame)

    def _frames(self, step: int, layer: int, part: int, partials: np.ndarray, channel: Channel,
                parity: bool) -> list[list[bytes]]:
        groups = self.shard.groups_at(layer, part) if self.shard else []
        wire = partials.astype(self.wire_dtype).reshape(len(groups), -1)
        max_elems = (codec.max_payload_elems(self.wire_dtype, message_type=Partial) if channel == Channel.UNRELIABLE
                     else RELIABLE_CHUNK_BYTES // self.wire_dtype.itemsize)
        ranges = chunk_ranges(wire.shape[1], max_elems) if wire.size else []
        out = []
        for g, row in zip(groups, wire, strict=True):
            where = {"session": self.session, "step": step, "layer": layer, "part": part, "group": g}
            frames = [codec.encode(Partial(**where, offset=a, data=row[a:b])) for a, b in ranges]  # type: ignore[arg-type]
            if parity:
                bits = fec.encode_parity([row[a:b] for a, b in ranges], 1)[0]
                frames.append(codec.encode(PartialParity(**where, n_data=len(ranges), data=bits)))  # type: ignore[arg-type]
            out.append(frames)
        return out

    def _parity_on(self, channel: Channel) -> bool:
        """Whether each group's frames end with a PartialParity: uplink FEC on the unreliable
        channel, unless the link's heartbeats measured no loss at all (``measured_plr == 0``;
        ``None``, not yet measured, counts as lossy): on a clean link a parity frame per group
        only doubles the frames of one-packet partials."""
        return self.uplink_parity and channel == Channel.UNRELIABLE and measured_lossy(self.link)

    async def _on_resend(self, msg: Resend) -> None:
        key = (msg.step, msg.layer, msg.part)
        if msg.session != self.session:
            return
        frames = self._results.get(key)
        if frames is None:
            waiting = key in self._inputs and not self._inputs[key].queued
            if waiting or (key > self._latest and key not in self._inputs):
                self.counters["need_input"] += 1
                await self.link.send(Channel.UNRELIABLE, codec.encode(NeedInput(
                    session=self.session, step=msg.step, layer=msg.layer, part=msg.part)))  # type: ignore[arg-type]
            return
        groups = self.shard.groups_at(msg.layer, msg.part) if self.shard else []
        self.counters["resent_groups"] += len(msg.groups)
        channel = self._channels.get(key, Channel.UNRELIABLE)
        await self._send_all(channel, [f for g in msg.groups if g in groups for f in frames[groups.index(g)]])
