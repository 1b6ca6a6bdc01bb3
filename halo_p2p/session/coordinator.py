"""The coordinator of a split model: an :class:`~halo_p2p.engine.protocol.Engine` over peers.

Per forward pass and per sync point (layer, part) — see :mod:`halo_p2p.groups` — it sends the
normalized input to every worker holding groups there, in the session's wire format (Q8_0
blocks by default; XOR parity on links that measured loss), naming the rows the worker must
answer with (:func:`~halo_p2p.session.frames.answer_layout`: normally one sum of all its
groups), computes its own groups meanwhile, collects the answers and sums what arrived into the
residual stream (a gather-and-sum all-reduce at the coordinator). How long it waits, and when it
asks again (``Resend``), is decided by :func:`~halo_p2p.session.sync.decide`, a pure function of
the sync point's state; ``_wait`` only carries its decisions out:

* ``strict``: inputs and answers travel on the reliable channel and it waits for every answer
  (classic tensor parallelism; a lost packet costs an SCTP retransmission, RTO >= 1 s).
* ``strict-unreliable``: decode steps travel on the unreliable channel with FEC and the
  deadlines and Resends of ``halo``, but every group is critical: the best strict synchronization
  can do on this transport, the baseline that isolates what skipping groups buys. As in
  ``strict``, a worker whose link closed while its answer is pending raises ``PeerLost`` at once.
* ``halo``: as ``strict-unreliable``, but only the critical groups must arrive: an answer holding
  none is waited for only until its owner's deadline, derived from measured response times
  (:class:`~halo_p2p.session.records.ResponseTimer`); what is missing counts as zero. Prompts (more
  than one token) treat every group as critical and travel the reliable channel.

Reference: HALO (Zheng et al., INFOCOM 2026, arXiv 2601.11676), relaxed synchronization.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from halo_p2p.engine.compute import HANDOFF_S, ComputeThread
from halo_p2p.engine.protocol import GroupCompute, GroupWeights, TrunkCompute
from halo_p2p.errors import ConfigError, LinkClosed, PeerLost, TransportError, WireError
from halo_p2p.groups import MLP, PARTS, GroupId, tensor_names
from halo_p2p.model.config import ModelConfig
from halo_p2p.net.link import Channel, Link
from halo_p2p.plan import PlacementPlan, PlanBody
from halo_p2p.session.criticality import AllCritical, CriticalityPolicy
from halo_p2p.session.frames import (
    UNSTABLE_PLR,
    Answer,
    SentVector,
    answer_chunk_count,
    answer_layout,
    input_frames,
    measured_lossy,
    send_paced,
    sends_norms,
    step_channel,
)
from halo_p2p.session.liveness import heard_s, silent_since
from halo_p2p.session.sync import Action, ResponseTimer, StepRecord, SyncPoint, SyncRecord, WaitRules, decide
from halo_p2p.wire import codec
from halo_p2p.wire.framing import RELIABLE_CHUNK_BYTES
from halo_p2p.wire.messages import (
    ErrorReply,
    GroupTensor,
    NeedInput,
    Partial,
    Plan,
    PlanReady,
    Resend,
    Reset,
    SyncMode,
    WeightsDone,
    WeightsWanted,
    WireDtype,
)
from halo_p2p.wire.quant import wire_format
from halo_p2p.wire.vector import EncodedVector

__all__ = ["UNSTABLE_PLR", "Coordinator", "SessionOptions"]

log = logging.getLogger(__name__)

_RECENT_SYNC_POINTS = 8


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """Settings of one split-model session.

    Attributes:
        mode: :class:`~halo_p2p.wire.messages.SyncMode` (``"strict"``, ``"strict-unreliable"`` or
            ``"halo"``, see the module docstring); a plain string is converted.
        wire_dtype: activation format on the wire (:class:`~halo_p2p.wire.messages.WireDtype`):
            ``"q8_0"`` (default: 8-bit blocks, 1.06 bytes per value), ``"float16"`` or
            ``"float32"`` (lossless); a plain string is converted.
        fec: XOR parity on the unreliable channel for links whose heartbeats measured loss.
        split_critical: in ``halo`` decode steps, ask a worker holding critical and other groups
            for two sums instead of one (:func:`~halo_p2p.session.frames.answer_layout`).
        max_seq_len: KV-cache length of every peer (tokens).
        initial_deadline_s: per-peer deadline before response times are measured.
        deadline_k: deviations of slack in the deadline (RFC 6298's 4).
        deadline_floor_s: smallest per-peer deadline (seconds).
        resend_interval_s: smallest interval between Resend requests for one sync point.
        stall_timeout_s: give up on a sync point after this long without progress.
        setup_timeout_s: how long workers may take to load their groups.
        peer_silence_s: in a decode step, a worker that owes an answer and was heard from
            neither by answers nor by its link's heartbeats for this long is lost
            (:mod:`~halo_p2p.session.liveness`), long before its link would declare it dead
            (3 s); the engine re-plans without it.

    Raises:
        ConfigError: an unknown mode or wire dtype, ``max_seq_len`` < 1, a negative time or
            ``deadline_k``, or a timeout that is not positive.
    """

    mode: SyncMode = SyncMode.HALO
    wire_dtype: WireDtype = WireDtype.Q8_0
    fec: bool = True
    split_critical: bool = False
    max_seq_len: int = 2048
    initial_deadline_s: float = 0.5
    deadline_k: float = 4.0
    deadline_floor_s: float = 0.002
    resend_interval_s: float = 0.005
    stall_timeout_s: float = 30.0
    setup_timeout_s: float = 120.0
    peer_silence_s: float = 1.0

    def __post_init__(self) -> None:
        for name, what, kind in (("mode", "sync mode", SyncMode), ("wire_dtype", "wire dtype", WireDtype)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except (ValueError, TypeError):
                raise ConfigError(f"{what} {value!r} is unknown", f"use one of {', '.join(kind)}") from None
        if self.max_seq_len < 1:
            raise ConfigError(f"max_seq_len {self.max_seq_len} is below one token", "use a context of >= 1 token")
        for name in ("initial_deadline_s", "deadline_k", "deadline_floor_s", "resend_interval_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} = {getattr(self, name)} is negative", f"set {name} >= 0")
        for name in ("stall_timeout_s", "setup_timeout_s", "peer_silence_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must be positive", f"set {name} > 0")


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
        self._part_timers = {part: {p: self._timers[p, part] for p in self.links} for part in PARTS}
        # both strict modes need every group: a pending worker whose link closed is PeerLost at once (the
        # engine re-plans without it), not a stall; halo counts its groups missing instead
        self._rules = WaitRules(halo=options.mode is SyncMode.HALO, strict=options.mode is not SyncMode.HALO,
                                stall_timeout_s=options.stall_timeout_s, resend_interval_s=options.resend_interval_s)
        self._owners = {(layer, part): {g: p for g, p in plan.owners_at(layer, part).items() if p != plan.coordinator}
                        for layer in range(layout.n_layers) for part in PARTS}   # remote groups per sync point
        self._recent: OrderedDict[tuple[int, int, int], SyncPoint] = OrderedDict()
        self._inputs: dict[tuple[str, int, int, int], SentVector] = {}   # (peer, step, layer, part) -> its input
        self._changed: asyncio.Future[bool] | None = None    # settled by an arrival while _wait sleeps
        self._ready: dict[str, asyncio.Future[PlanReady]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.step = 0
        self.dead: set[str] = set()              # workers whose link closed (or who fell silent) during the session
        self.silent: dict[str, float] = {}       # workers lost by silence -> how long they had been silent (s)
        self._checked_s = -math.inf              # loop time of the last silence check (see _find_silent)
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
        body = PlanBody(placement=self.plan, config=self.trunk.config, max_seq_len=self.options.max_seq_len)
        msg = Plan(session=self.session, model_sha256=self.model_sha256, plan=body,
                   wire_dtype=self.options.wire_dtype, mode=self.options.mode)
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
        """Start a new sequence: the workers (:class:`~halo_p2p.wire.messages.Reset`) and this
        peer's own groups forget their KV caches. :meth:`forward` calls it before a pass from
        position 0 that is not the session's first, so no position of an earlier sequence is
        ever attended (a worker that misses a later input masks that position, and nothing of
        the old sequence is left valid behind it)."""
        frame = codec.encode(Reset(session=self.session))
        for peer in self.plan.workers():
            await self._send(peer, Channel.RELIABLE, frame)
        if self.local is not None:
            await self.compute.run(self.local.reset)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- forward --------------------------------------------------------------------------------

    async def forward(self, token_ids: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """Logits for ``token_ids`` at ``[start_pos, start_pos+T)`` computed across the peers.

        A pass from ``start_pos`` 0 after earlier passes starts a new sequence (:meth:`reset`).

        Returns:
            float32 ``(T, vocab)`` or ``(1, vocab)``.
        Raises:
            TransportError: a sync point made no progress for ``stall_timeout_s``.
            PeerLost: ``strict`` or ``strict-unreliable`` mode, the link of a worker whose answer
                is pending closed.
        """
        if start_pos == 0 and self.step > 0:
            await self.reset()
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
                remote, synced = await self._sync(layer, part, xn, start_pos)
                x += remote
                record.syncs.append(synced)
        self.records.append(record)
        return await self.compute.run(self.trunk.logits, x, all_logits=all_logits)

    async def _sync(self, layer: int, part: int, xn: np.ndarray, start_pos: int) -> tuple[np.ndarray, SyncRecord]:
        """One sync point: send the inputs, compute this peer's share, wait, sum what arrived."""
        loop = asyncio.get_running_loop()
        n_tokens, dim = xn.shape
        mode = self.options.mode
        owners = self._owners[layer, part]
        decode_halo = mode is SyncMode.HALO and n_tokens == 1
        norms = sends_norms(mode, n_tokens, self.step)
        critical = self.criticality.critical(layer, part, xn) if decode_halo else frozenset(owners)
        moved: list[int] = []      # computed here this token, not waited for
        if self.takeover is not None and part == MLP and decode_halo:
            moved = sorted(g for g in critical if owners.get(g) in self.unstable)
        channel = step_channel(mode, n_tokens)
        by_peer: dict[str, list[int]] = {}
        for g, p in owners.items():
            if not moved or g not in moved:
                by_peer.setdefault(p, []).append(g)
        split = decode_halo and self.options.split_critical and channel == Channel.UNRELIABLE
        answers = {p: answer_layout(gs, critical, split=split and self._lossy(p)) for p, gs in by_peer.items()}
        chunks = {p: answer_chunk_count(len(a.segments) * n_tokens * dim, self.fmt, n_groups=len(a.groups),
                                        with_norms=norms, channel=channel) for p, a in answers.items()}
        sp = SyncPoint(self.step, layer, part, n_tokens=n_tokens, dim=dim, answers=answers, chunks=chunks,
                       critical=critical, fmt=self.fmt, sent_at_s=loop.time(), moved=frozenset(moved))
        self._remember(sp)
        flat = xn.reshape(-1)
        encoded: dict[tuple[int, bool], EncodedVector] = {}     # the input, quantized once for every worker
        for peer in sorted(answers):
            await self._send_input(peer, sp, answers[peer], flat, start_pos, channel, encoded)
        local = None
        held = self.local.groups_at(layer, part) if self.local is not None else []
        if held:
            local = asyncio.ensure_future(self.compute.run(  # a decode step's share: inline once measured short
                # mypy: held is non-empty only when this peer has a local shard
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
        if norms and 0 < len(critical) < self.plan.layout.n_groups(part):   # the policy's live recall
            known = dict(zip(held, own_norms, strict=True)) if own_norms is not None else {}
            if ext is not None:
                known.update(zip(moved, np.linalg.norm(ext.reshape(len(ext), -1), axis=1), strict=True))
            sp.measure_recall(critical, known, self.plan.layout.n_groups(part))
        for key in [k for k in self._inputs if k[1:] < sp.key]:
            del self._inputs[key]
        return remote, sp.record

    def _lossy(self, peer: str) -> bool:
        return self.options.fec and measured_lossy(self.links[peer])

    async def _send_input(self, peer: str, sp: SyncPoint, answer: Answer, flat: np.ndarray, start_pos: int,
                          channel: Channel, encoded: dict[tuple[int, bool], EncodedVector]) -> None:
        sent = input_frames(self.session, sp.step, sp.layer, sp.part, start_pos=start_pos, n_tokens=sp.n_tokens,
                            groups=answer.groups, segments=answer.segments, values=flat, fmt=self.fmt,
                            channel=channel, parity=channel == Channel.UNRELIABLE and self._lossy(peer),  # downlink FEC
                            cache=encoded)
        self._inputs[(peer, *sp.key)] = sent
        await self._send_all(peer, channel, sent.frames)

    async def _send_all(self, peer: str, channel: Channel, frames: list[bytes]) -> None:
        """Send frames paced (:func:`~halo_p2p.session.frames.send_paced`); a closed link marks the peer dead."""
        if peer in self.dead:
            return
        try:
            await send_paced(self.links[peer], channel, frames)
        except LinkClosed:
            self._mark_dead(peer)

    async def _send(self, peer: str, channel: Channel, frame: bytes) -> None:
        """Send to a worker; a closed link marks it dead instead of failing the token."""
        await self._send_all(peer, channel, [frame])

    async def _wait(self, sp: SyncPoint, channel: Channel) -> None:
        """Wait at ``sp`` as :func:`~halo_p2p.session.sync.decide` says, until it says done.

        Raises:
            PeerLost: ``strict`` or ``strict-unreliable``, a worker with a pending answer is gone.
            TransportError: nothing arrived for ``stall_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        sp.arm(self._part_timers[sp.part])
        unreliable = channel == Channel.UNRELIABLE
        progress = loop.time()
        check_s = self.options.peer_silence_s / 4      # how often pending workers' silence is checked
        while True:
            now = loop.time()
            self._find_silent(sp, now)
            decision = decide(sp, now, self._rules, unreliable=unreliable, dead=self.dead, progress_s=progress)
            action = decision.action
            if action is Action.DONE:
                return
            if action is Action.LOST:
                raise PeerLost(list(decision.peers))
            if action is Action.STALL:
                raise TransportError(f"no partials from {', '.join(decision.peers)} for "
                                     f"{self.options.stall_timeout_s:.0f} s at layer {sp.layer}",
                                     "check the peer is alive; it will be re-planned")
            for order in decision.resend:
                sp.resent(order, now)
                await self._send(order.peer, Channel.UNRELIABLE, codec.encode(Resend(
                    session=self.session, step=sp.step, layer=sp.layer, part=sp.part, chunks=order.chunks)))
            if await self._sleep(min(decision.until_s, now + check_s)):
                progress = loop.time()

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

    def _mark_dead(self, peer: str) -> None:
        if peer not in self.dead:
            log.warning("link to %s closed: its groups count as missing", peer)
        self.dead.add(peer)
        self._notify()

    # -- lost-peer detection (session/liveness.py) ------------------------------------------------

    def _find_silent(self, sp: SyncPoint, now: float) -> None:
        """Mark the workers pending at ``sp`` that fell silent (:func:`~halo_p2p.session.liveness.silent_since`)
        as lost. Checked only while this loop has been checking at least every half silence: after our own
        event loop stalled (or sat idle between tokens), the links' stamps are not the peers' fault."""
        silence = self.options.peer_silence_s
        steady = now - self._checked_s <= silence / 2
        self._checked_s = now
        if not steady or sp.n_tokens != 1:
            return
        mono = time.monotonic()
        for peer in sp.pending_peers():
            if peer in self.dead:
                continue
            heard = heard_s(self.links[peer], now_s=now, mono_s=mono)
            since = silent_since(link_heard_s=heard, asked_s=sp.sent_at_s,
                                 answered_s=self._answered_s(peer) if heard is None else None)
            if now - since > silence:
                self._mark_silent(peer, now - since)

    def _answered_s(self, peer: str) -> float | None:
        """When the last chunk of any recent answer of ``peer`` arrived (late ones included)."""
        return max((sp.last_heard_s[peer] for sp in self._recent.values() if peer in sp.last_heard_s), default=None)

    def _mark_silent(self, peer: str, silent_s: float) -> None:
        log.warning("worker %s silent for %.2f s: lost (its groups count as missing; re-planning without it)",
                    peer, silent_s)
        self.silent[peer] = silent_s
        self.counters["silent_peers"] += 1
        self.dead.add(peer)
        self._notify()

    def _remember(self, sp: SyncPoint) -> None:
        self._recent[sp.key] = sp
        while len(self._recent) > _RECENT_SYNC_POINTS:
            self._recent.popitem(last=False)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive(self, peer: str, link: Link) -> None:
        """Read ``peer``'s frames until its link closes.

        Nothing a frame holds ends this loop: a frame that does not decode is counted
        (``counters["malformed"]``) and dropped; a decoded message whose handling raised is counted
        (``counters["rejected"]``) and dropped.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, frame = await link.recv()
            except LinkClosed:
                self._mark_dead(peer)
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
            try:
                if isinstance(msg, Partial):
                    self._on_partial(peer, msg, loop.time())
                elif isinstance(msg, NeedInput):
                    sp = self._recent.get((msg.step, msg.layer, msg.part))
                    if sp is not None:
                        sp.input_repeated(peer)
                    sent = self._inputs.get((peer, msg.step, msg.layer, msg.part))
                    if sent is not None:
                        await self._send_all(peer, sent.channel, sent.again())
                elif isinstance(msg, WeightsWanted):
                    if msg.session == self.session:
                        self._tasks.append(asyncio.create_task(self._stream_weights(peer, msg.groups)))
                elif isinstance(msg, PlanReady):
                    fut = self._ready.get(peer)
                    if msg.session != self.session:
                        self.counters["stale"] += 1
                    elif fut is not None and not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg, ErrorReply):
                    self.counters["error_replies"] += 1
                    log.warning("peer %s: %s: %s", peer, msg.code, msg.message)
                    fut = self._ready.get(peer)
                    if fut is not None and not fut.done():
                        fut.set_exception(PeerLost([peer]))
                else:
                    self.counters["unexpected"] += 1
            except Exception as exc:   # a message's content must not end the session
                self._rejected(peer, type(msg).__name__, exc)

    def _rejected(self, peer: str, what: str, exc: Exception) -> None:
        """Count a message whose handling raised; the first is logged as a warning, the rest at debug."""
        self.counters["rejected"] += 1
        level = logging.WARNING if self.counters["rejected"] == 1 else logging.DEBUG
        log.log(level, "dropped %s from %s (%d so far): %s: %s", what, peer, self.counters["rejected"],
                type(exc).__name__, exc)

    async def _stream_weights(self, peer: str, flat: tuple[int, ...]) -> None:
        """Send the weight slices of the groups ``peer`` asked for, then :class:`WeightsDone`; a
        failure is counted (``counters["rejected"]``), never left in the task."""
        try:
            await self._send_weights(peer, flat)
        except Exception as exc:   # the request came in a frame
            self._rejected(peer, "WeightsWanted", exc)

    async def _send_weights(self, peer: str, flat: tuple[int, ...]) -> None:
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
            for name in tensor_names(gid.part):
                rows, cols = tensors[name].shape
                flat_values = np.ascontiguousarray(tensors[name], dtype=np.float32).reshape(-1)
                for a in range(0, flat_values.size, per_chunk):
                    await self._send(peer, Channel.RELIABLE, codec.encode(GroupTensor(
                        # mypy: name comes from groups.tensor_names, a Literal at runtime
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
        was_done = sp.answered(peer)
        try:
            new = sp.add(peer, msg, now)
        except WireError as exc:
            self.counters["malformed"] += 1
            log.debug("dropping %s from %s: %s", type(msg).__name__, peer, exc)
            return
        if sp.closed:
            self.counters["late"] += 1
        if not was_done:
            sample = sp.response_sample_s(peer)        # a clean response time (Karn's rule)
            if sample is not None:
                self._timers[peer, sp.part].observe(sample)
        if new:
            self._notify()
