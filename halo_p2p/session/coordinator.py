"""The coordinator of a split model: an :class:`~halo_p2p.engine.protocol.Engine` over peers.

Per forward pass and per sync point (layer, part) — see :mod:`halo_p2p.groups` — it sends the
normalized input to every worker holding groups there (chunked, with XOR parity in ``halo``
mode), computes its own groups meanwhile, collects the workers' per-group partials and sums
what arrived into the residual stream:

* ``strict``: inputs and partials travel on the reliable channel and it waits for every partial
  (classic tensor parallelism with an all-reduce per sync point; a lost packet costs an RTO).
* ``halo``: they travel on the unreliable channel; it waits for the critical groups (asking
  their owner to resend after the owner's deadline) and for the others only until each owner's
  deadline, derived from its measured response times (:class:`~halo_p2p.session.sync.ResponseTimer`);
  missing partials count as zero. Prompts (more than one token) treat every group as critical.

Reference: HALO (Zheng et al., INFOCOM 2026, arXiv 2601.11676), relaxed synchronization.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from halo_p2p.engine.compute import ComputeThread
from halo_p2p.engine.protocol import GroupCompute, GroupWeights, TrunkCompute
from halo_p2p.errors import LinkClosed, PeerLost, TransportError, WireError
from halo_p2p.groups import MLP, PARTS, GroupId
from halo_p2p.model.config import ModelConfig
from halo_p2p.net.link import Channel, Link
from halo_p2p.plan import PlacementPlan
from halo_p2p.session.criticality import AllCritical, CriticalityPolicy
from halo_p2p.session.sync import ResponseTimer, StepRecord, SyncPoint, measured_lossy, step_channel
from halo_p2p.wire import codec, fec
from halo_p2p.wire.chunks import split_ranges
from halo_p2p.wire.messages import (
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

__all__ = ["RELIABLE_CHUNK_BYTES", "Coordinator", "SessionOptions"]

log = logging.getLogger(__name__)

_RECENT_SYNC_POINTS = 8
_SILENCE_GAP_S = 0.02  # a burst of chunks silent this long has lost its rest
UNSTABLE_PLR = 0.01     # a link measured lossier than this makes its peer "unstable" (dynamic placement)
RELIABLE_CHUNK_BYTES = 64 * 1024
"""Payload of one activation message on the reliable channel (it has no per-packet loss, and
WebRTC messages may be up to 256 KiB); the unreliable channel keeps one SCTP packet per frame."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """Settings of one split-model session.

    Attributes:
        mode: ``"strict"`` or ``"halo"``.
        wire_dtype: activation dtype on the wire (``"float16"`` or ``"float32"``).
        n_parity: XOR parity chunks per layer input in ``halo`` mode (0 = none).
        max_seq_len: KV-cache length of every peer (tokens).
        initial_deadline_s: per-peer deadline before response times are measured.
        deadline_k: deviations of slack in the deadline (RFC 6298's 4).
        deadline_floor_s: smallest per-peer deadline (seconds).
        resend_interval_s: smallest interval between Resend requests for one sync point.
        stall_timeout_s: give up on a sync point after this long without progress.
        setup_timeout_s: how long workers may take to load their groups.
    """

    mode: str = "halo"
    wire_dtype: str = "float16"
    n_parity: int = 1
    max_seq_len: int = 2048
    initial_deadline_s: float = 0.5
    deadline_k: float = 4.0
    deadline_floor_s: float = 0.002
    resend_interval_s: float = 0.005
    stall_timeout_s: float = 30.0
    setup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "halo"):
            raise ValueError(f"sync mode {self.mode!r} is not strict or halo")
        if self.wire_dtype not in ("float16", "float32"):
            raise ValueError(f"wire dtype {self.wire_dtype!r} is not float16 or float32")


class Coordinator:
    """Runs the trunk and its own groups, and synchronizes with the workers of ``plan``.

    Args:
        trunk: embeddings, norms and classifier.
        local: the coordinator's own groups (``None`` if it holds none).
        compute: the coordinator's compute thread.
        links: worker peer id -> link to it.
        plan: the placement plan (its coordinator is this peer).
        options: sync mode and timing.
        criticality: which groups must not be skipped (``halo`` mode).
        model_sha256: identifies the model to the workers.
        session: session id.
        weights: group weight slices to stream to workers that lack the model file (optional).
        initial_deadlines: per-worker deadline (seconds) until response times are measured, e.g.
            the scheduler's estimate (default ``options.initial_deadline_s``).
        takeover: computes MLP groups on demand (``partials(layer, groups, hn)``): in ``halo``
            mode, a decode step's critical MLP groups owned by an ``unstable`` peer are computed
            here instead of waited for (per-token dynamic placement).
        unstable: peers whose links are lossy (e.g. measured PLR above 1 %).
    """

    def __init__(self, *, trunk: TrunkCompute, local: GroupCompute | None, compute: ComputeThread,
                 links: Mapping[str, Link], plan: PlacementPlan, options: SessionOptions,
                 criticality: CriticalityPolicy | None = None, model_sha256: str = "0" * 64,
                 session: int = 1, weights: GroupWeights | None = None,
                 initial_deadlines: Mapping[str, float] | None = None, takeover: Any = None,
                 unstable: frozenset[str] = frozenset()) -> None:
        self.trunk, self.local, self.compute = trunk, local, compute
        self.links = dict(links)
        self.plan, self.options, self.session = plan, options, session
        self.model_sha256 = model_sha256
        self.weights = weights
        self.takeover, self.unstable = takeover, set(unstable)
        layout = plan.layout
        self.criticality = criticality or AllCritical({p: layout.n_groups(p) for p in PARTS})
        missing = set(plan.workers()) - set(self.links)
        if missing:
            raise TransportError(f"no link to plan worker(s) {sorted(missing)}", "connect every worker first")
        self._n_parity = options.n_parity if options.mode == "halo" else 0
        first = dict(initial_deadlines or {})
        self._timers = {(p, part): ResponseTimer(initial_s=first.get(p, options.initial_deadline_s),
                                                 k=options.deadline_k, floor_s=options.deadline_floor_s)
                        for p in self.links for part in PARTS}
        self._recent: OrderedDict[tuple[int, int, int], SyncPoint] = OrderedDict()
        self._inputs: dict[tuple[str, int, int, int], tuple[Channel, list[bytes]]] = {}
        self._changed = asyncio.Event()
        self._ready: dict[str, asyncio.Future[PlanReady]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.step = 0
        self.dead: set[str] = set()              # workers whose link closed during the session
        self.records: list[StepRecord] = []
        self.counters: Counter[str] = Counter()   # dropped/malformed/late/stale messages, for status

    @property
    def config(self) -> ModelConfig:
        return self.trunk.config

    @property
    def max_seq_len(self) -> int:
        return self.options.max_seq_len

    async def start(self) -> None:
        """Send the plan to the workers and wait until they loaded their groups.

        Raises:
            PeerLost: a worker refused the plan (e.g. it does not hold the model) or vanished.
            TransportError: workers did not answer within ``setup_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        for peer, link in self.links.items():
            self._tasks.append(asyncio.create_task(self._receive(peer, link), name=f"recv-{peer}"))
        body = {"placement": self.plan.to_dict(), "max_seq_len": self.options.max_seq_len,
                "n_parity": self._n_parity, "config": dataclasses.asdict(self.trunk.config)}
        msg = Plan(session=self.session, model_sha256=self.model_sha256, plan=body,
                   wire_dtype=self.options.wire_dtype, mode=self.options.mode)  # type: ignore[arg-type]
        for peer in self.plan.workers():
            self._ready[peer] = loop.create_future()
            await self.links[peer].send(Channel.RELIABLE, codec.encode(msg))
        try:
            async with asyncio.timeout(self.options.setup_timeout_s):
                for peer, fut in self._ready.items():
                    ready = await fut    # PeerLost if it refused the plan or its link closed
                    log.info("worker %s ready: %.1f MB of weights in %.2f s", peer,
                             ready.weight_bytes / 1e6, ready.load_s)
        except TimeoutError:
            raise TransportError("workers did not load their groups in time",
                                 "check the workers are running and hold the model") from None

    async def reset(self) -> None:
        """Tell workers to forget their KV caches (a new conversation)."""
        for peer in self.plan.workers():
            await self._send(peer, Channel.RELIABLE, codec.encode(Reset(session=self.session)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- forward --------------------------------------------------------------------------------

    async def forward(self, token_ids: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """Logits for ``token_ids`` at ``[start_pos, start_pos+T)`` computed across the peers.

        Returns:
            float32 ``(T, vocab)`` or ``(1, vocab)``.
        Raises:
            TransportError: a sync point made no progress for ``stall_timeout_s``.
        """
        self.step += 1
        for peer, link in self.links.items():          # heartbeats measure the links' loss
            plr = link.stats.measured_plr
            if plr is not None:
                (self.unstable.add if plr > UNSTABLE_PLR else self.unstable.discard)(peer)
        ids = np.asarray(token_ids, dtype=np.int64)
        record = StepRecord(self.step, start_pos, len(ids))
        x = await self.compute.run(self.trunk.embed, ids)
        for layer in range(self.plan.layout.n_layers):
            for part in PARTS:
                xn = await self.compute.run(self.trunk.normed, layer, part, x)
                remote = await self._sync(layer, part, xn, start_pos)
                x += remote
                record.syncs.append(self._recent[(self.step, layer, part)].record)
        self.records.append(record)
        return await self.compute.run(self.trunk.logits, x, all_logits=all_logits)

    async def _sync(self, layer: int, part: int, xn: np.ndarray, start_pos: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        n_tokens, dim = xn.shape
        owners = {g: p for g, p in self.plan.owners_at(layer, part).items() if p != self.plan.coordinator}
        if n_tokens > 1 or self.options.mode == "strict":
            critical = frozenset(owners)
        else:
            critical = self.criticality.critical(layer, part, xn)
        moved: list[int] = []
        if self.takeover is not None and part == MLP and n_tokens == 1 and self.options.mode == "halo":
            moved = sorted(g for g in critical if owners.get(g) in self.unstable)
            for g in moved:
                del owners[g]                      # computed here this token, not waited for
        sp = SyncPoint(self.step, layer, part, n_tokens=n_tokens, dim=dim, owners=owners, critical=critical,
                       dtype=self.options.wire_dtype, sent_at_s=loop.time())
        sp.record.taken_over = len(moved)
        sp.moved = frozenset(moved)               # their workers' partials are superseded, not malformed
        self._remember(sp)
        wire = xn.astype(self.options.wire_dtype).reshape(-1)
        for peer in sorted(set(owners.values())):
            await self._send_input(peer, sp, wire, start_pos, n_tokens)
        local = None
        if self.local is not None and self.local.groups_at(layer, part):
            local = asyncio.ensure_future(self.compute.run(self.local.partials, layer, part, xn, start_pos))
        extra = asyncio.ensure_future(self.compute.run(self.takeover.partials, layer, moved, xn)) if moved else None
        try:
            await self._wait(sp)
        finally:
            remote = sp.close(loop.time())
        own = await local if local is not None else None
        if own is not None:
            remote += own.sum(axis=0)
        ext = await extra if extra is not None else None
        if ext is not None:
            remote += ext.sum(axis=0)
        if self.options.mode == "halo" and n_tokens == 1 and 0 < len(critical) < self.plan.layout.n_groups(part):
            sp.record.recall = self._recall(sp, critical, own, ext, moved)
        for key in [k for k in self._inputs if k[1:] < sp.key]:
            del self._inputs[key]
        return remote

    def _recall(self, sp: SyncPoint, critical: frozenset[int], own: np.ndarray | None, ext: np.ndarray | None,
                moved: list[int]) -> float | None:
        """Share of the truly top-k groups (by partial norm, k = the critical count) that the
        criticality policy marked critical: the predictor's live recall. None unless every
        group's partial is known (nothing skipped)."""
        norms = np.full(self.plan.layout.n_groups(sp.part), np.nan)
        if own is not None and self.local is not None:
            norms[self.local.groups_at(sp.layer, sp.part)] = np.linalg.norm(own.reshape(len(own), -1), axis=1)
        if ext is not None:
            norms[moved] = np.linalg.norm(ext.reshape(len(ext), -1), axis=1)
        for g, r in sp.parts.items():
            if r.complete:
                norms[g] = np.linalg.norm(r.array.astype(np.float32))
        if np.isnan(norms).any():
            return None
        k = len(critical)
        return len(critical & set(np.argsort(norms)[-k:].tolist())) / k

    async def _send_input(self, peer: str, sp: SyncPoint, wire: np.ndarray, start_pos: int, n_tokens: int) -> None:
        channel = self._channel_for(n_tokens)
        max_elems = (codec.max_payload_elems(wire.dtype, message_type=LayerInput) if channel == Channel.UNRELIABLE
                     else RELIABLE_CHUNK_BYTES // wire.dtype.itemsize)
        n_data = max(1, math.ceil(wire.size / max_elems))
        chunks = [wire[a:b] for a, b in split_ranges(wire.size, n_data)]
        # one parity chunk per 4 data chunks at least: a wide model's input spans several chunks
        lossy = channel == Channel.UNRELIABLE and measured_lossy(self.links[peer])   # downlink FEC
        n_parity = min(n_data, max(self._n_parity, math.ceil(n_data / 4))) if lossy else 0
        offsets = [a for a, _ in split_ranges(wire.size, n_data)]
        frames = []
        for k, data in enumerate([*chunks, *fec.encode_parity(chunks, n_parity)]):
            frames.append(codec.encode(LayerInput(
                session=self.session, step=sp.step, layer=sp.layer, part=sp.part, start_pos=start_pos,  # type: ignore[arg-type]
                n_tokens=n_tokens, chunk=k, n_data=n_data, n_parity=n_parity,
                offset=offsets[k] if k < n_data else 0, data=data)))
        self._inputs[(peer, *sp.key)] = (channel, frames)
        await self._send_all(peer, channel, frames)

    async def _send_all(self, peer: str, channel: Channel, frames: list[bytes]) -> None:
        """Send frames, pausing every 16 unreliable ones until the link's backlog drains."""
        for i, frame in enumerate(frames):
            if channel == Channel.UNRELIABLE and i and i % 16 == 0 and peer not in self.dead:
                try:
                    await self.links[peer].drain()
                except TransportError:
                    log.debug("backlog to %s did not drain", peer)
            await self._send(peer, channel, frame)

    def _channel_for(self, n_tokens: int) -> Channel:
        return step_channel(self.options.mode, n_tokens)

    async def _wait(self, sp: SyncPoint) -> None:
        loop = asyncio.get_running_loop()
        deadlines = {p: sp.sent_at_s + self._timers[(p, sp.part)].deadline_s() for p in set(sp.owners.values())}
        # first Resend (decode steps only: prompts travel the reliable channel, step_channel): at
        # the peer's deadline, or once its burst of chunks has gone silent for a gap (the rest is lost)
        next_resend = dict(deadlines)
        last_resend: dict[str, float] = {}
        last_progress = loop.time()
        while not sp.all_complete:
            now = loop.time()
            lost = sp.pending_peers() & self.dead
            if lost and self.options.mode == "strict":
                raise PeerLost(sorted(lost))
            missing_critical = {p: g for p, g in sp.missing_critical().items() if p not in self.dead}
            if self.options.mode == "halo" and not missing_critical:
                pending = sp.pending_peers() - self.dead
                if all(now >= deadlines[p] for p in pending):
                    return
                wake = min(deadlines[p] for p in pending if now < deadlines[p])
            else:
                wake = now + self.options.stall_timeout_s
                if self._channel_for(sp.n_tokens) == Channel.UNRELIABLE:   # reliable ones just arrive
                    for peer in missing_critical:
                        srtt = self._timers[(peer, sp.part)].srtt or 0.0
                        interval = max(self.options.resend_interval_s, 2 * srtt)
                        due = next_resend[peer]
                        heard = sp.last_heard_s.get(peer)
                        if heard is not None:
                            silent = heard + max(_SILENCE_GAP_S, interval)
                            due = min(due, max(silent, last_resend.get(peer, 0.0) + interval))
                        if now >= due:
                            if peer not in last_resend and sp.last_heard_s.get(peer) is None:
                                self._timers[(peer, sp.part)].backoff()   # nothing arrived by the deadline
                            # the round trip is paid for the critical groups: ask for the rest too
                            await self._send_resend(peer, sp, sp.missing_of(peer))
                            tries = sp.record.resends
                            last_resend[peer] = now
                            next_resend[peer] = now + interval * min(64, 2 ** (tries - 1))   # back off
                            due = next_resend[peer]
                        wake = min(wake, due)
            if now - last_progress > self.options.stall_timeout_s:
                stuck = sorted(sp.pending_peers())
                raise TransportError(f"no partials from {', '.join(stuck)} for {self.options.stall_timeout_s:.0f} s "
                                     f"at layer {sp.layer}", "check the peer is alive; it will be re-planned")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, wake - loop.time()))
                last_progress = loop.time()
            except TimeoutError:
                pass

    async def _send_resend(self, peer: str, sp: SyncPoint, groups: list[int]) -> None:
        sp.record.resends += 1
        sp.retried.add(peer)
        msg = Resend(session=self.session, step=sp.step, layer=sp.layer, part=sp.part, groups=tuple(groups))  # type: ignore[arg-type]
        await self._send(peer, Channel.UNRELIABLE, codec.encode(msg))

    async def _send(self, peer: str, channel: Channel, frame: bytes) -> None:
        """Send to a worker; a closed link marks it dead instead of failing the token."""
        if peer in self.dead:
            return
        try:
            await self.links[peer].send(channel, frame)
        except LinkClosed:
            log.warning("link to %s closed: its groups count as missing", peer)
            self.dead.add(peer)
            self._changed.set()

    def _remember(self, sp: SyncPoint) -> None:
        self._recent[sp.key] = sp
        while len(self._recent) > _RECENT_SYNC_POINTS:
            self._recent.popitem(last=False)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive(self, peer: str, link: Link) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, frame = await link.recv()
            except LinkClosed:
                log.warning("link to %s closed: its groups count as missing", peer)
                self.dead.add(peer)
                self._changed.set()
                fut = self._ready.get(peer)
                if fut is not None and not fut.done():
                    fut.set_exception(PeerLost([peer]))
                return
            try:
                msg = codec.decode(frame)
            except WireError as exc:
                self.counters["malformed"] += 1
                log.debug("malformed frame from %s: %s", peer, exc)
                continue
            if isinstance(msg, Partial | PartialParity):
                self._on_partial(peer, msg, loop.time())
            elif isinstance(msg, NeedInput):
                sp = self._recent.get((msg.step, msg.layer, msg.part))
                if sp is not None:
                    sp.retried.add(peer)
                channel, frames = self._inputs.get((peer, msg.step, msg.layer, msg.part), (Channel.UNRELIABLE, []))
                await self._send_all(peer, channel, frames)
            elif isinstance(msg, WeightsWanted):
                if msg.session == self.session:
                    self._tasks.append(asyncio.create_task(self._stream_weights(peer, msg.groups)))
            elif isinstance(msg, PlanReady):
                fut = self._ready.get(peer)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, ErrorReply):
                self.counters["error_replies"] += 1
                log.warning("peer %s: %s: %s", peer, msg.code, msg.message)
                fut = self._ready.get(peer)
                if fut is not None and not fut.done():
                    fut.set_exception(PeerLost([peer]))
            else:
                self.counters["unexpected"] += 1

    async def _stream_weights(self, peer: str, flat: tuple[int, ...]) -> None:
        """Send the weight slices of the groups ``peer`` asked for, then :class:`WeightsDone`."""
        if self.weights is None:
            await self._send(peer, Channel.RELIABLE, codec.encode(ErrorReply(
                code="no-weights", message="this coordinator cannot stream weights")))
            return
        sent = 0
        per_chunk = RELIABLE_CHUNK_BYTES // 4
        for i in range(0, len(flat), 3):
            gid = GroupId(flat[i], flat[i + 1], flat[i + 2])
            if not self.plan.layout.contains(gid) or self.plan.owner.get(gid) != peer:
                self.counters["bad_weight_requests"] += 1
                continue
            tensors = await self.compute.run(self.weights.group, gid)
            for name, array in tensors.items():
                rows, cols = array.shape
                flat_values = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
                for a in range(0, flat_values.size, per_chunk):
                    await self._send(peer, Channel.RELIABLE, codec.encode(GroupTensor(
                        session=self.session, layer=gid.layer, part=gid.part, index=gid.index, name=name,  # type: ignore[arg-type]
                        rows=rows, cols=cols, offset=a, data=flat_values[a:a + per_chunk])))
                    sent += flat_values[a:a + per_chunk].nbytes
        await self._send(peer, Channel.RELIABLE, codec.encode(WeightsDone(session=self.session)))
        log.info("streamed %.1f MB of group weights to %s", sent / 1e6, peer)

    def _on_partial(self, peer: str, msg: Partial | PartialParity, now: float) -> None:
        if msg.session != self.session:
            self.counters["stale"] += 1
            return
        sp = self._recent.get((msg.step, msg.layer, msg.part))
        if sp is None:
            self.counters["stale"] += 1
            return
        was_done = peer in sp.done_at_s
        try:
            new = sp.add(peer, msg, now) if isinstance(msg, Partial) else sp.add_parity(peer, msg, now)
        except WireError as exc:
            self.counters["superseded" if msg.group in sp.moved else "malformed"] += 1
            log.debug("dropping %s from %s: %s", type(msg).__name__, peer, exc)
            return
        if sp.closed:
            self.counters["late"] += 1
        if not was_done and peer in sp.done_at_s and sp.n_tokens == 1 and peer not in sp.retried:
            self._timers[(peer, sp.part)].observe(sp.done_at_s[peer] - sp.sent_at_s)
        if new:
            self._changed.set()
