"""The coordinator of a split model: an :class:`~halo_p2p.engine.protocol.Engine` over peers.

Per forward pass and per sync point (layer, part) — see :mod:`halo_p2p.groups` — it sends the
normalized input to every worker holding groups there, in the session's wire format (Q8_0
blocks by default; XOR parity on links that measured loss), naming the rows the worker must
answer with (:func:`~halo_p2p.session.sync.answer_layout`: normally one sum of all its
groups), computes its own groups meanwhile, collects the answers and sums what arrived into the
residual stream (a gather-and-sum all-reduce at the coordinator):

* ``strict``: inputs and answers travel on the reliable channel and it waits for every answer
  (classic tensor parallelism; a lost packet costs an SCTP retransmission, RTO >= 1 s).
* ``strict-unreliable``: decode steps travel on the unreliable channel with FEC and the
  deadlines and Resends of ``halo``, but every group is critical: the best strict synchronization
  can do on this transport, the baseline that isolates what skipping groups buys.
* ``halo``: as ``strict-unreliable``, but only the critical groups must arrive: an answer holding
  none is waited for only until its owner's deadline, derived from measured response times
  (:class:`~halo_p2p.session.sync.ResponseTimer`); what is missing counts as zero. Prompts (more
  than one token) treat every group as critical and travel the reliable channel.

Reference: HALO (Zheng et al., INFOCOM 2026, arXiv 2601.11676), relaxed synchronization.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from halo_p2p.engine.compute import HANDOFF_S, ComputeThread
from halo_p2p.engine.protocol import GroupCompute, GroupWeights, TrunkCompute
from halo_p2p.errors import ConfigError, LinkClosed, PeerLost, TransportError, WireError
from halo_p2p.groups import MLP, PARTS, GroupId
from halo_p2p.model.config import ModelConfig
from halo_p2p.net.link import Channel, Link
from halo_p2p.plan import PlacementPlan
from halo_p2p.session.criticality import AllCritical, CriticalityPolicy
from halo_p2p.session.frames import send_paced
from halo_p2p.session.sync import (
    Answer,
    ResponseTimer,
    StepRecord,
    SyncPoint,
    answer_layout,
    measured_lossy,
    sends_norms,
    step_channel,
)
from halo_p2p.wire import codec
from halo_p2p.wire.framing import (
    RELIABLE_CHUNK_BYTES,
    answer_chunks,
    answer_template,
    encode_frames,
    input_template,
)
from halo_p2p.wire.messages import (
    SYNC_MODES,
    WIRE_DTYPES,
    ErrorReply,
    GroupTensor,
    NeedInput,
    Partial,
    Plan,
    PlanReady,
    Resend,
    Reset,
    WeightsDone,
    WeightsWanted,
)
from halo_p2p.wire.quant import wire_format
from halo_p2p.wire.vector import EncodedVector

__all__ = ["Coordinator", "SessionOptions"]

log = logging.getLogger(__name__)

_RECENT_SYNC_POINTS = 8
_SILENCE_GAP_S = 0.02  # a burst of chunks silent this long has lost its rest
UNSTABLE_PLR = 0.01     # a link measured lossier than this makes its peer "unstable" (dynamic placement)
def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """Settings of one split-model session.

    Attributes:
        mode: ``"strict"``, ``"strict-unreliable"`` or ``"halo"`` (see the module docstring).
        wire_dtype: activation format on the wire: ``"q8_0"`` (default: 8-bit blocks, 1.06 bytes
            per value), ``"float16"`` or ``"float32"`` (lossless).
        fec: XOR parity on the unreliable channel for links whose heartbeats measured loss.
        split_critical: in ``halo`` decode steps, ask a worker holding critical and other groups
            for two sums instead of one (:func:`~halo_p2p.session.sync.answer_layout`).
        max_seq_len: KV-cache length of every peer (tokens).
        initial_deadline_s: per-peer deadline before response times are measured.
        deadline_k: deviations of slack in the deadline (RFC 6298's 4).
        deadline_floor_s: smallest per-peer deadline (seconds).
        resend_interval_s: smallest interval between Resend requests for one sync point.
        stall_timeout_s: give up on a sync point after this long without progress.
        setup_timeout_s: how long workers may take to load their groups.
    """

    mode: str = "halo"
    wire_dtype: str = "q8_0"
    fec: bool = True
    split_critical: bool = False
    max_seq_len: int = 2048
    initial_deadline_s: float = 0.5
    deadline_k: float = 4.0
    deadline_floor_s: float = 0.002
    resend_interval_s: float = 0.005
    stall_timeout_s: float = 30.0
    setup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.mode not in SYNC_MODES:
            raise ConfigError(f"sync mode {self.mode!r} is unknown", f"use one of {', '.join(SYNC_MODES)}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire dtype {self.wire_dtype!r} is unknown", f"use one of {', '.join(WIRE_DTYPES)}")


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
        self.fmt = wire_format(options.wire_dtype)
        first = dict(initial_deadlines or {})
        self._timers = {(p, part): ResponseTimer(initial_s=first.get(p, options.initial_deadline_s),
                                                 k=options.deadline_k, floor_s=options.deadline_floor_s)
                        for p in self.links for part in PARTS}
        self._owners = {(layer, part): {g: p for g, p in plan.owners_at(layer, part).items() if p != plan.coordinator}
                        for layer in range(layout.n_layers) for part in PARTS}   # remote groups per sync point
        self._recent: OrderedDict[tuple[int, int, int], SyncPoint] = OrderedDict()
        self._inputs: dict[tuple[str, int, int, int], tuple[Channel, list[bytes]]] = {}
        self._changed: asyncio.Future[bool] | None = None    # settled by an arrival while _wait sleeps
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
                "config": dataclasses.asdict(self.trunk.config)}
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
                # a decode step's RMSNorm (dim values, numpy, ~5 µs) runs here: a hand-off to the compute
                # thread (a wakeup and a GIL switch, ~0.7 ms of wall time on 2 shared cores) costs more
                xn = (self.trunk.normed_row(layer, part, x) if len(ids) == 1
                      else await self.compute.run(self.trunk.normed, layer, part, x))
                remote = await self._sync(layer, part, xn, start_pos)
                x += remote
                record.syncs.append(self._recent[(self.step, layer, part)].record)
        self.records.append(record)
        return await self.compute.run(self.trunk.logits, x, all_logits=all_logits)

    async def _sync(self, layer: int, part: int, xn: np.ndarray, start_pos: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        n_tokens, dim = xn.shape
        mode = self.options.mode
        owners = dict(self._owners[layer, part])
        decode_halo = mode == "halo" and n_tokens == 1
        norms = sends_norms(mode, n_tokens, self.step)
        critical = self.criticality.critical(layer, part, xn) if decode_halo else frozenset(owners)
        moved: list[int] = []
        if self.takeover is not None and part == MLP and decode_halo:
            moved = sorted(g for g in critical if owners.get(g) in self.unstable)
            for g in moved:
                del owners[g]                      # computed here this token, not waited for
        channel = step_channel(mode, n_tokens)
        by_peer: dict[str, list[int]] = {}
        for g, p in owners.items():
            by_peer.setdefault(p, []).append(g)
        answers = {p: answer_layout(gs, critical, split=decode_halo and self.options.split_critical
                                    and channel == Channel.UNRELIABLE and self._lossy(p))
                   for p, gs in by_peer.items()}
        chunks = {p: answer_chunks(answer_template(self.session, self.step, layer, part, n_groups=len(a.groups),
                                                   norms=norms, fmt=self.fmt),
                                   len(a.segments) * n_tokens * dim, self.fmt, reliable=channel == Channel.RELIABLE)
                  for p, a in answers.items()}
        sp = SyncPoint(self.step, layer, part, n_tokens=n_tokens, dim=dim, answers=answers, chunks=chunks,
                       critical=critical, fmt=self.fmt, sent_at_s=loop.time())
        sp.record.taken_over = len(moved)
        sp.moved = frozenset(moved)               # their workers' partials are superseded, not malformed
        self._remember(sp)
        flat, encoded = xn.reshape(-1), {}
        for peer in sorted(answers):
            await self._send_input(peer, sp, answers[peer], flat, start_pos, channel, encoded)
        local = None
        held = self.local.groups_at(layer, part) if self.local is not None else []
        if held:
            local = asyncio.ensure_future(self.compute.run(  # a decode step's share: inline once measured short
                self.local.answer, layer, part, xn, start_pos, [held], norms=norms,  # type: ignore[union-attr]
                inline_below_s=HANDOFF_S if n_tokens == 1 else None, kind=f"answer/{n_tokens == 1}"))
        extra = asyncio.ensure_future(self.compute.run(self.takeover.partials, layer, moved, xn)) if moved else None
        try:
            await self._wait(sp, channel)
        finally:
            remote = sp.close(loop.time())
        own_norms = None
        if local is not None:
            own, own_norms = await local
            remote += own[0]
        ext = await extra if extra is not None else None
        if ext is not None:
            remote += ext.sum(axis=0)
        if norms and 0 < len(critical) < self.plan.layout.n_groups(part):
            sp.record.recall = self._recall(sp, critical, dict(zip(held, own_norms, strict=True))
                                            if own_norms is not None else {}, ext, moved)
        for key in [k for k in self._inputs if k[1:] < sp.key]:
            del self._inputs[key]
        return remote

    def _lossy(self, peer: str) -> bool:
        return self.options.fec and measured_lossy(self.links[peer])

    def _recall(self, sp: SyncPoint, critical: frozenset[int], own: dict[int, float], ext: np.ndarray | None,
                moved: list[int]) -> float | None:
        """Share of the truly top-k groups (by partial norm, k = the critical count) that the
        criticality policy marked critical: the predictor's live recall, measured on the steps
        whose answers carry norms (:func:`~halo_p2p.session.sync.sends_norms`). None unless every
        group's norm is known."""
        norms = np.full(self.plan.layout.n_groups(sp.part), np.nan)
        for g, n in own.items():
            norms[g] = n
        if ext is not None:
            norms[moved] = np.linalg.norm(ext.reshape(len(ext), -1), axis=1)
        for g, n in sp.norms().items():
            norms[g] = n
        if np.isnan(norms).any():
            return None
        k = len(critical)
        return len(critical & set(np.argsort(norms)[-k:].tolist())) / k

    async def _send_input(self, peer: str, sp: SyncPoint, answer: Answer, flat: np.ndarray, start_pos: int,
                          channel: Channel, encoded: dict[tuple[int, bool], EncodedVector]) -> None:
        template = input_template(self.session, sp.step, sp.layer, sp.part, start_pos=start_pos, n_tokens=sp.n_tokens,
                                  groups=answer.groups, segments=answer.segments, fmt=self.fmt)
        lossy = channel == Channel.UNRELIABLE and self._lossy(peer)          # downlink FEC
        _, frames = encode_frames(template, flat, self.fmt, reliable=channel == Channel.RELIABLE, parity=lossy,
                                  cache=encoded)
        self._inputs[(peer, *sp.key)] = (channel, frames)
        await self._send_all(peer, channel, frames)

    async def _send_all(self, peer: str, channel: Channel, frames: list[bytes]) -> None:
        """Send frames paced (:func:`~halo_p2p.session.frames.send_paced`); a closed link marks the peer dead."""
        if peer in self.dead:
            return
        try:
            await send_paced(self.links[peer], channel, frames)
        except LinkClosed:
            self._mark_dead(peer)

    async def _wait(self, sp: SyncPoint, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        halo = self.options.mode == "halo"
        deadlines = {p: sp.sent_at_s + self._timers[(p, sp.part)].deadline_s() for p in sp.peers}
        # first Resend (unreliable steps): at the peer's deadline, or once its burst of chunks has
        # gone silent for a gap (the rest is lost)
        next_resend = dict(deadlines)
        last_resend: dict[str, float] = {}
        last_progress = loop.time()
        while not sp.all_complete:
            now = loop.time()
            lost = sp.pending_peers() & self.dead
            if lost and self.options.mode == "strict":
                raise PeerLost(sorted(lost))
            missing_critical = {p: g for p, g in sp.missing_critical().items() if p not in self.dead}
            if halo and not missing_critical:
                pending = sp.pending_peers() - self.dead
                if all(now >= deadlines[p] for p in pending):
                    return
                wake = min(deadlines[p] for p in pending if now < deadlines[p])
            else:
                wake = now + self.options.stall_timeout_s
                if channel == Channel.UNRELIABLE:   # reliable answers just arrive
                    for peer in missing_critical:
                        srtt = self._timers[(peer, sp.part)].srtt or 0.0
                        interval = max(self.options.resend_interval_s, 2 * srtt)
                        due = next_resend[peer]
                        heard = sp.last_heard_s.get(peer)
                        if heard is not None:
                            silent = heard + max(_SILENCE_GAP_S, interval)
                            due = min(due, max(silent, last_resend.get(peer, 0.0) + interval))
                        if now >= due:
                            if peer not in last_resend and heard is None:
                                self._timers[(peer, sp.part)].backoff()   # nothing arrived by the deadline
                            await self._send_resend(peer, sp)
                            last_resend[peer] = now
                            next_resend[peer] = now + interval * min(64, 2 ** (sp.record.resends - 1))   # back off
                            due = next_resend[peer]
                        wake = min(wake, due)
            if now - last_progress > self.options.stall_timeout_s:
                stuck = sorted(sp.pending_peers())
                raise TransportError(f"no partials from {', '.join(stuck)} for {self.options.stall_timeout_s:.0f} s "
                                     f"at layer {sp.layer}", "check the peer is alive; it will be re-planned")
            if await self._sleep(wake):
                last_progress = loop.time()

    async def _sleep(self, until: float) -> bool:
        """Wait until loop time ``until`` or an arrival (:meth:`_notify`); True if something arrived.

        One future and one timer per wait (``asyncio.wait_for`` would also make a task each time).
        """
        loop = asyncio.get_running_loop()
        if until <= loop.time():
            await asyncio.sleep(0)
            return False
        fut = self._changed = loop.create_future()
        timer = loop.call_at(until, _settle, fut, False)
        try:
            return await fut
        finally:
            self._changed = None
            timer.cancel()

    def _notify(self) -> None:
        if self._changed is not None:
            _settle(self._changed, True)

    async def _send_resend(self, peer: str, sp: SyncPoint) -> None:
        sp.record.resends += 1
        sp.retried.add(peer)
        msg = Resend(session=self.session, step=sp.step, layer=sp.layer, part=sp.part,  # type: ignore[arg-type]
                     chunks=sp.missing_chunks(peer))
        await self._send(peer, Channel.UNRELIABLE, codec.encode(msg))

    async def _send(self, peer: str, channel: Channel, frame: bytes) -> None:
        """Send to a worker; a closed link marks it dead instead of failing the token."""
        await self._send_all(peer, channel, [frame])

    def _mark_dead(self, peer: str) -> None:
        if peer not in self.dead:
            log.warning("link to %s closed: its groups count as missing", peer)
        self.dead.add(peer)
        self._notify()

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
                self._notify()
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
            if isinstance(msg, Partial):
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

    def _on_partial(self, peer: str, msg: Partial, now: float) -> None:
        if msg.session != self.session:
            self.counters["stale"] += 1
            return
        sp = self._recent.get((msg.step, msg.layer, msg.part))
        if sp is None:
            self.counters["stale"] += 1
            return
        was_done = peer in sp.done_at_s
        try:
            new = sp.add(peer, msg, now)
        except WireError as exc:
            self.counters["malformed"] += 1
            log.debug("dropping %s from %s: %s", type(msg).__name__, peer, exc)
            return
        if sp.closed:
            self.counters["late"] += 1
        if not was_done and peer in sp.done_at_s and sp.n_tokens == 1 and peer not in sp.retried:
            self._timers[(peer, sp.part)].observe(sp.done_at_s[peer] - sp.sent_at_s)
        if new:
            self._notify()
