"""Discrete-event simulation of decoding tokens over a lossy cluster, strict or halo.

It replays :class:`~halo_p2p.session.coordinator.Coordinator` and
:class:`~halo_p2p.session.worker.Worker` packet by packet on a placement from
:mod:`halo_p2p.scheduler` (:func:`~halo_p2p.sim.cluster.place`). Per sync point the coordinator
sends the normalized input to each worker holding groups there and computes its own groups; a
worker computes once its input is complete and returns one partial per group. Resources are FIFO
:class:`~halo_p2p.sim.cluster.Port` s: each device's egress and ingress port (``max(frame CPU,
wire time)`` per packet; the coordinator's ingress is where the partials converge) and its
compute (``sync_overhead_s[part] + params * seconds_per_param``, one sync point at a time).

* ``strict``: inputs and partials are reliable messages (one per group) cut into packets. A lost
  packet arrives one RTO later, doubling per repeated loss (with ``fast_retransmit``: one RTT
  after the third later packet of the burst, RTO for tail losses); delivery is in order per
  direction (head-of-line blocking, :class:`~halo_p2p.sim.cluster.ReliableStream`); the
  coordinator waits for every partial.
* ``halo``: one packet per chunk, each lost independently; XOR parity on the input
  (``max(n_parity, ceil(n_data / 4))`` chunks, as the coordinator sends it); a worker missing
  input chunks sends ``NeedInput`` 20 ms after its first chunk; the coordinator waits for the
  critical groups (:class:`~halo_p2p.session.criticality.StaticRule`), sending ``Resend`` at the
  owner's deadline or after a silent gap, and for the others until each owner's deadline
  (:class:`~halo_p2p.session.sync.ResponseTimer`, fed as the coordinator feeds it, Karn's rule
  included); the worker answers a Resend with the partials, or ``NeedInput`` if it has no input.

Simplifications: a port serves one burst (one send's packets) whole, without interleaving a burst
arriving meanwhile; jitter is drawn per burst; retransmissions take no extra wire time; the trunk
costs one classifier matrix-vector product per token; attention over the KV cache is free.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

from halo_p2p.errors import ConfigError
from halo_p2p.groups import ATTN, MLP, PARTS
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler import Schedule
from halo_p2p.session.criticality import StaticRule
from halo_p2p.session.sync import ResponseTimer
from halo_p2p.sim.cluster import (
    COORDINATOR_ID,
    Q40_BYTES_PER_PARAM,
    Cluster,
    Port,
    ReliableStream,
    mlp_scores,
    packet_sizes,
    place,
)
from halo_p2p.sim.shapes import ModelShape

__all__ = ["SimOptions", "SimResult", "SyncTrace", "simulate"]

log = logging.getLogger(__name__)

_RECENT = 8        # sync points the coordinator keeps (coordinator._RECENT_SYNC_POINTS)
_KEEP_RESULTS = 8  # sync points whose partials a worker keeps for Resend (worker._KEEP_RESULTS)
_TIE_S = 1e-9      # a partial arriving within 1 ns of its deadline counts as in time (float ties)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimOptions:
    """Settings of one simulation (defaults: ``SessionOptions`` and the coordinator's constants).

    Attributes:
        mode: ``"strict"`` or ``"halo"``.
        tokens: decoded tokens simulated; TPOT is their mean.
        seed: seeds packet loss, jitter and the synthetic MLP scores.
        critical_fraction: share of each layer's MLP groups halo waits for (top by score;
            attention groups always), as :class:`StaticRule` and the scheduler assume.
        n_parity: XOR parity chunks per layer input (halo).
        bytes_per_param: resident bytes per weight for the scheduler's memory budgets (Q40).
        deadline_k, deadline_floor_s: :class:`ResponseTimer` slack (deviations) and floor (s).
        initial_deadline_s: deadline before three responses are measured (s; ``SessionOptions``'
            0.5); ``None``: the scheduler's per-worker ``deadline_s`` (as ``docs/scheduler.md``
            proposes to seed ``ResponseTimer``).
        resend_interval_s, silence_gap_s: the coordinator's Resend pacing and silent gap (s).
        input_gap_s: a worker's wait for missing input chunks before ``NeedInput`` (s).
        drops: packets to lose, ``(token, layer, part, worker id, "in" | "out", index)``: the
            input to that worker or the partials it returns, index = position of the packet in
            that send; a key listed twice also loses the first retransmission (hand-computed
            scenarios; on top of the links' PLR).
        trace: keep a :class:`SyncTrace` per sync point.
        max_token_s: stop when one token has taken this long (simulated seconds): a resend storm
            or a saturated port makes the run diverge; the result is then marked ``diverged``.
    """

    mode: str = "halo"
    tokens: int = 64
    seed: int = 0
    critical_fraction: float = 0.5
    n_parity: int = 1
    bytes_per_param: float = Q40_BYTES_PER_PARAM
    deadline_k: float = 4.0
    deadline_floor_s: float = 0.002
    initial_deadline_s: float | None = 0.5
    resend_interval_s: float = 0.005
    silence_gap_s: float = 0.02
    input_gap_s: float = 0.02
    drops: tuple[tuple[int, int, int, str, str, int], ...] = ()
    trace: bool = False
    max_token_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "halo") or self.tokens < 1 or not 0 <= self.critical_fraction <= 1 \
                or not self.max_token_s > 0:
            raise ConfigError(f"bad simulation options: mode {self.mode!r}, {self.tokens} tokens, critical "
                              f"fraction {self.critical_fraction}",
                              "use strict|halo, tokens >= 1, a fraction in [0, 1]")


@dataclass(frozen=True, slots=True)
class SyncTrace:
    """One sync point: when its input went out, when the coordinator moved on, and when each remote
    group's partial became complete (seconds; absent: never)."""

    token: int
    layer: int
    part: int
    sent_at_s: float
    closed_at_s: float
    group_done_s: dict[int, float]


@dataclass(frozen=True, slots=True)
class SimResult:
    """What a simulation measured (counts are means per token).

    Attributes:
        mode: ``"strict"`` or ``"halo"``.
        token_s: seconds of each token, in order.
        compute_s: loss-free compute on the critical path of a token (slowest holder of each sync
            point, plus the classifier), seconds.
        skipped_groups: remote groups not fully summed.
        lost_importance: share of a token's total group importance that was skipped.
        resends, need_inputs: Resend / NeedInput messages (halo).
        retransmissions: packet retransmissions (strict).
        late_chunks: partial packets that arrived after the coordinator moved on.
        schedule: the placement, with the scheduler's own prediction.
        predicted_lost_importance: the scheduler's expected lost importance as a share of a
            token's total.
        diverged: a token exceeded ``max_token_s``: ``token_s`` holds the tokens done and the
            unfinished one's elapsed time (a lower bound).
        traces: one per sync point, if asked for.
    """

    mode: str
    token_s: tuple[float, ...]
    compute_s: float
    skipped_groups: float
    lost_importance: float
    resends: float
    need_inputs: float
    retransmissions: float
    late_chunks: float
    schedule: Schedule
    predicted_lost_importance: float = 0.0
    diverged: bool = False
    traces: tuple[SyncTrace, ...] = ()

    @property
    def tpot_s(self) -> float:
        """Mean seconds per output token."""
        return float(np.mean(self.token_s))

    def as_dict(self) -> dict[str, float | str | bool]:
        """JSON-ready summary (milliseconds where a time)."""
        return {"mode": self.mode, "tpot_ms": 1e3 * self.tpot_s, "compute_ms": 1e3 * self.compute_s,
                "tpot_p95_ms": 1e3 * float(np.percentile(self.token_s, 95)), "skipped_groups": self.skipped_groups,
                "lost_importance": self.lost_importance, "resends": self.resends, "need_inputs": self.need_inputs,
                "retransmissions": self.retransmissions, "late_chunks": self.late_chunks,
                "scheduler_tpot_ms": 1e3 * self.schedule.expected_tpot_s,
                "scheduler_lost_importance": self.predicted_lost_importance, "diverged": self.diverged}


class _Worker:
    """One worker: ports, compute, loss streams, reliable streams, per-packet service times, and
    the worker's input/result state (as in ``Worker``)."""

    __slots__ = ("cpu", "down", "idx", "inp", "inputs", "latest", "link", "out", "pid", "results", "rng_down",
                 "rng_up", "svc", "up", "work_fixed", "work_spp")

    def __init__(self, idx: int, pid: str, cluster: Cluster, seed: int, shared: Port | None,
                 sizes: dict[str, list[int]], reliable: bool) -> None:
        self.idx, self.pid, self.link = idx, pid, cluster.links[idx]
        dev, cdev = cluster.workers[idx], cluster.coordinator
        self.work_spp, self.work_fixed = dev.seconds_per_param, dev.sync_overhead_s
        self.out, self.inp, self.cpu = shared or Port(), shared or Port(), Port()
        self.rng_down = random.Random(f"halo-sim/{seed}/{pid}/down")
        self.rng_up = random.Random(f"halo-sim/{seed}/{pid}/up")
        self.down, self.up = ReliableStream(), ReliableStream()
        wire, per_msg = self.link.wire_s, cluster.stack_per_message and reliable

        def svc(tx: float, rx: float, ns: list[int]) -> list[tuple[float, float]]:
            """(sender, receiver) service per packet; CPU once per message if ``per_msg``."""
            return [(max(0.0 if per_msg and i else tx, wire(n)), max(0.0 if per_msg and i else rx, wire(n)))
                    for i, n in enumerate(ns)]

        # "in" goes down (a layer input), "out" (one group's partial) and "ctrl" (NeedInput) up
        self.svc = {kind: svc(cdev.frame_cpu_s, dev.frame_cpu_s, ns) if kind == "in"
                    else svc(dev.frame_cpu_s, cdev.frame_cpu_s, ns) for kind, ns in sizes.items()}
        self.svc["resend"] = svc(cdev.frame_cpu_s, dev.frame_cpu_s, sizes["ctrl"])
        self.latest = -1                                  # last sync point computed (index)
        self.inputs: dict[int, list] = {}                 # s -> [chunk mask, queued, check pending]
        self.results: dict[int, float] = {}               # s -> time its partials were ready


class _Sp:
    """The coordinator's state of one sync point (``SyncPoint`` plus ``Coordinator._wait``'s)."""

    __slots__ = ("closed", "crit", "deadline", "done", "got", "heard", "last_resend", "layer", "left", "left_total",
                 "local_done", "next_resend", "owner", "part", "retried", "s", "sent_at", "tok", "wake")

    def __init__(self, s: int, tok: int, layer: int, part: int, now: float) -> None:
        self.s, self.tok, self.layer, self.part, self.sent_at = s, tok, layer, part, now
        self.owner: dict[int, int] = {}                    # group -> worker
        self.got: dict[int, int] = {}                      # group -> mask of packets received
        self.left: dict[int, int] = {}                     # worker -> groups incomplete
        self.crit: dict[int, set[int]] = {}                # worker -> critical groups incomplete
        self.deadline: dict[int, float] = {}
        self.next_resend: dict[int, float] = {}
        self.last_resend: dict[int, float] = {}
        self.heard: dict[int, float] = {}
        self.done: dict[int, float] = {}                   # group -> completion time
        self.retried: set[int] = set()
        self.left_total, self.closed, self.local_done, self.wake = 0, False, now, math.inf


class _Sim:
    """The event loop and the reactions of the coordinator and the workers."""

    def __init__(self, shape: ModelShape, cluster: Cluster, sched: Schedule, opts: SimOptions,
                 scores: np.ndarray) -> None:
        plan, lay = sched.plan, sched.plan.layout
        self.opts, self.halo, self.n_sync = opts, opts.mode == "halo", 2 * lay.n_layers
        sizes, n_data, n_par = packet_sizes(lay.dim, reliable=not self.halo, n_parity=opts.n_parity)
        self.n_out = len(sizes["out"])
        self.full = (1 << self.n_out) - 1 if self.halo else 1
        self.stripes = [(sum(1 << i for i in range(j, n_data, n_par)), 1 << (n_data + j)) for j in range(n_par)]
        shared = Port() if cluster.shared_stack else None
        self.c_out, self.c_in, self.c_cpu = shared or Port(), shared or Port(), Port()
        self.workers = [_Worker(i, pid, cluster, opts.seed, shared, sizes, not self.halo)
                        for i, pid in enumerate(cluster.worker_ids)]
        self.trunk_s = cluster.trunk_s
        index = {w.pid: w.idx for w in self.workers}
        cdev = cluster.coordinator
        self.remote: list[list[dict[int, list[int]]]] = [[{}, {}] for _ in range(lay.n_layers)]
        self.local_s = [[0.0, 0.0] for _ in range(lay.n_layers)]
        for layer in range(lay.n_layers):
            for part in PARTS:
                n_local = 0
                for g, pid in plan.owners_at(layer, part).items():
                    if pid == COORDINATOR_ID:
                        n_local += 1
                    else:
                        self.remote[layer][part].setdefault(index[pid], []).append(g)
                if n_local:
                    self.local_s[layer][part] = cdev.sync_overhead_s[part] + n_local * lay.group_params(part) \
                        * cdev.seconds_per_param
        self.group_params = [lay.group_params(part) for part in PARTS]
        self.classifier_s = shape.classifier_params * cdev.seconds_per_param
        rule = StaticRule(scores, lay.n_attn, opts.critical_fraction)
        self.crit = [[rule.critical(layer, part, None) for part in PARTS]  # type: ignore[arg-type]
                     for layer in range(lay.n_layers)]
        self.imp = {ATTN: np.repeat(scores.max(axis=1, keepdims=True), lay.n_attn, axis=1), MLP: scores}
        self.total_imp = float(self.imp[ATTN].sum() + self.imp[MLP].sum())
        init = {w.pid: opts.initial_deadline_s or sched.deadline_s.get(w.pid, 0.5) for w in self.workers}
        self.timers = [[ResponseTimer(initial_s=init[w.pid], k=opts.deadline_k, floor_s=opts.deadline_floor_s)
                        for _ in PARTS] for w in self.workers]
        self.drops = Counter(opts.drops)
        self.heap: list[tuple[float, int, object, tuple]] = []
        self.seq, self.now, self.tok = 0, 0.0, 0
        self.syncs: dict[int, _Sp] = {}
        self.kept: set[int] = set()
        self.tok_start, self.tok_s = [0.0] * opts.tokens, [0.0] * opts.tokens
        self.stat = {k: np.zeros(opts.tokens) for k in ("skipped", "lost", "resends", "need", "retx", "late")}
        self.traces: list[SyncTrace] = []

    def push(self, at: float, fn: object, *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, fn, args))

    def run(self) -> bool:
        """Process events until the last token ends; False if a token exceeded ``max_token_s``."""
        self.push(0.0, self._start, 0)
        heap, limit, starts = self.heap, self.opts.max_token_s, self.tok_start
        while heap:
            at, _, fn, args = heapq.heappop(heap)
            if at - starts[self.tok] > limit:
                self.tok_s[self.tok] = at - starts[self.tok]
                log.warning("token %d exceeded %.0f s: stopping (diverged)", self.tok, limit)
                return False
            self.now = at
            fn(*args)  # type: ignore[operator]
        return True

    def _decode(self, s: int) -> tuple[int, int, int]:
        tok, rem = divmod(s, self.n_sync)
        return tok, rem >> 1, rem & 1

    def _lost(self, rng: random.Random, plr: float, s: int, w: _Worker, down: bool, i: int) -> bool:
        if plr and rng.random() < plr:
            return True
        if self.drops:
            key = (*self._decode(s), w.pid, "in" if down else "out", i)
            if self.drops[key]:
                self.drops[key] -= 1
                if not self.drops[key]:
                    del self.drops[key]
                return True
        return False

    # -- transport ----------------------------------------------------------------------------

    def _send_frames(self, w: _Worker, down: bool, s: int, svc: list, tags: list, on_burst: object) -> None:
        """Unreliable packets, each lost independently; the survivors reach ``on_burst`` as a burst."""
        port, rng, link = (self.c_out, w.rng_down, w.link) if down else (w.out, w.rng_up, w.link)
        lat = link.one_way_s + (rng.uniform(0.0, link.jitter_s) if link.jitter_s else 0.0)
        t, free, frames = self.now, port.free_at, []
        for i, ((tx, rx), tag) in enumerate(zip(svc, tags, strict=True)):
            free = (t if t > free else free) + tx
            if not self._lost(rng, link.plr, s, w, down, i):
                frames.append((free + lat, rx, tag))
        port.free_at = free
        if frames:
            self.push(frames[0][0], on_burst, w, s, frames)

    def _send_msgs(self, w: _Worker, down: bool, s: int, msgs: list[tuple[list, tuple]]) -> None:
        """Reliable messages: retransmission delays per lost packet, in-order delivery."""
        port, rng, link = (self.c_out, w.rng_down, w.link) if down else (w.out, w.rng_up, w.link)
        stream = w.down if down else w.up
        lat = link.one_way_s + (rng.uniform(0.0, link.jitter_s) if link.jitter_s else 0.0)
        t, free, sent = self.now, port.free_at, []
        for svc, handler in msgs:
            msg = [len(svc), 0.0, stream.open(handler), stream]
            for tx, rx in svc:
                free = (t if t > free else free) + tx
                sent.append((free, rx, msg))
        port.free_at = free
        burst, tok = [], self._decode(s)[0]
        for i, (dep, rx, msg) in enumerate(sent):
            extra, rto = 0.0, link.rto_s
            if self._lost(rng, link.plr, s, w, down, i):
                self.stat["retx"][tok] += 1
                if link.fast_retransmit and i + 3 < len(sent):      # third duplicate ACK, then one RTT
                    extra = sent[i + 3][0] - dep + 2 * link.one_way_s
                elif link.tail_probe_s is not None:                 # tail loss probe, then one RTT
                    extra = sent[-1][0] - dep + link.tail_probe_s + 2 * link.one_way_s
                else:
                    extra, rto = rto, min(2 * rto, link.rto_max_s)
                while self._lost(rng, link.plr, s, w, down, i):     # a lost retransmission
                    self.stat["retx"][tok] += 1
                    if link.tail_probe_s is not None:                # RACK detects it: probe again
                        extra += link.tail_probe_s + 2 * link.one_way_s
                    else:
                        extra, rto = extra + rto, min(2 * rto, link.rto_max_s)
            frame = (dep + lat + extra, rx, msg)
            if extra:
                self.push(frame[0], self._msg_burst, w, down, [frame])
            else:
                burst.append(frame)
        if burst:
            self.push(burst[0][0], self._msg_burst, w, down, burst)

    def _msg_burst(self, w: _Worker, down: bool, frames: list) -> None:
        port = w.inp if down else self.c_in
        for arr, rx, msg in frames:
            d = port.serve(arr, rx)
            msg[0] -= 1
            msg[1] = max(msg[1], d)
            if not msg[0]:
                for handler, at in msg[3].complete(msg[2], msg[1]):
                    self.push(at, *handler)  # type: ignore[misc]

    def _ctrl(self, w: _Worker, down: bool, handler: object, *args: object) -> None:
        """One small unreliable control message (Resend down, NeedInput up)."""
        port, rng = (self.c_out, w.rng_down) if down else (w.out, w.rng_up)
        tx, rx = w.svc["resend" if down else "ctrl"][0]
        e = port.serve(self.now, tx)
        if not (w.link.plr and rng.random() < w.link.plr):
            self.push(e + w.link.one_way_s, self._ctrl_in, w, down, rx, handler, args)

    def _ctrl_in(self, w: _Worker, down: bool, rx: float, handler: object, args: tuple) -> None:
        self.push((w.inp if down else self.c_in).serve(self.now, rx), handler, *args)

    def _send_input(self, w: _Worker, s: int) -> None:
        svc = w.svc["in"]
        if self.halo:
            self._send_frames(w, True, s, svc, list(range(len(svc))), self._w_input)
        else:
            self._send_msgs(w, True, s, [(svc, (self._w_ready, w, s))])

    def _send_partials(self, w: _Worker, s: int, groups: list[int]) -> None:
        svc = w.svc["out"]
        if self.halo:
            self._send_frames(w, False, s, svc * len(groups), [(g, c) for g in groups for c in range(self.n_out)],
                              self._c_partials)
        else:
            self._send_msgs(w, False, s, [(svc, (self._c_group, w, s, g, 1)) for g in groups])

    # -- worker -------------------------------------------------------------------------------

    def _recoverable(self, mask: int) -> bool:
        """Whether the input chunks in ``mask`` rebuild the input (``fec.recover``'s rule)."""
        for data, parity in self.stripes:
            miss = data & ~mask
            if miss and (miss & (miss - 1) or not mask & parity):
                return False
        return True

    def _w_input(self, w: _Worker, s: int, frames: list) -> None:
        """Input chunks reach a worker (halo): complete with parity, or ask again after a gap."""
        inp = w.inputs.get(s)
        if inp is None and s > w.latest:
            inp = w.inputs[s] = [0, False, False]
        ready, port = None, w.inp
        for arr, rx, k in frames:
            d = port.serve(arr, rx)
            if inp is None or inp[1]:
                continue
            inp[0] |= 1 << k
            if self._recoverable(inp[0]):
                inp[1], ready = True, d
            elif not inp[2]:
                inp[2] = True
                self.push(d + self.opts.input_gap_s, self._w_check, w, s)
        if ready is not None:
            self.push(ready, self._w_ready, w, s)

    def _w_check(self, w: _Worker, s: int) -> None:
        inp = w.inputs.get(s)
        if inp is not None:
            inp[2] = False
        if inp is not None and not inp[1] and s > w.latest:
            self._need_input(w, s)

    def _need_input(self, w: _Worker, s: int) -> None:
        self.stat["need"][self._decode(s)[0]] += 1
        self._ctrl(w, False, self._c_need, w, s)

    def _w_ready(self, w: _Worker, s: int) -> None:
        """The input is complete: compute (one sync point at a time), then send the partials."""
        if s <= w.latest:
            return
        _, layer, part = self._decode(s)
        w.latest = s
        for old in [k for k in w.inputs if k <= s]:
            del w.inputs[old]
        work = w.work_fixed[part] + len(self.remote[layer][part][w.idx]) * self.group_params[part] * w.work_spp
        self.push(w.cpu.serve(self.now, work), self._w_done, w, s)

    def _w_done(self, w: _Worker, s: int) -> None:
        _, layer, part = self._decode(s)
        w.results[s] = self.now
        if len(w.results) > _KEEP_RESULTS:
            del w.results[min(w.results)]
        self._send_partials(w, s, self.remote[layer][part][w.idx])

    def _w_resend(self, w: _Worker, s: int, groups: list[int]) -> None:
        """A Resend: the groups' partials again, or NeedInput if the input never became complete."""
        if s in w.results:
            self._send_partials(w, s, groups)
            return
        inp = w.inputs.get(s)
        if (inp is not None and not inp[1]) or (inp is None and s > w.latest):
            self._need_input(w, s)

    # -- coordinator --------------------------------------------------------------------------

    def _start(self, s: int) -> None:
        """Send sync point ``s``'s input to its workers (in peer order), compute the local groups."""
        tok, layer, part = self._decode(s)
        sp = self.syncs[s] = _Sp(s, tok, layer, part, self.now)
        self.syncs.pop(s - _RECENT, None)
        self.kept.add(s)
        crit = self.crit[layer][part]
        for wi, groups in sorted(self.remote[layer][part].items()):
            for g in groups:
                sp.owner[g], sp.got[g] = wi, 0
            sp.crit[wi] = {g for g in groups if not self.halo or g in crit}
            sp.left[wi] = len(groups)
            sp.left_total += len(groups)
            sp.deadline[wi] = sp.next_resend[wi] = self.now + self.timers[wi][part].deadline_s() + _TIE_S
            self._send_input(self.workers[wi], s)
        if self.local_s[layer][part]:
            sp.local_done = self.c_cpu.serve(self.now, self.local_s[layer][part])
        self._evaluate(sp)

    def _evaluate(self, sp: _Sp) -> None:
        """One pass of ``Coordinator._wait``: move on, send due Resends, or sleep until a deadline."""
        if not sp.left_total:
            self._close(sp)
            return
        if not self.halo:
            return                                        # strict: every partial arrives in the end
        now, wake, opts = self.now, math.inf, self.opts
        missing = [(wi, gs) for wi, gs in sp.crit.items() if gs]
        if not missing:
            later = [sp.deadline[wi] for wi, n in sp.left.items() if n and now < sp.deadline[wi]]
            if not later:
                self._close(sp)
                return
            wake = min(later)
        for wi, groups in missing:
            srtt = self.timers[wi][sp.part].srtt or 0.0
            interval = max(opts.resend_interval_s, 2 * srtt)
            due = sp.next_resend[wi]
            if wi in sp.heard:
                silent = sp.heard[wi] + max(opts.silence_gap_s, interval)
                due = min(due, max(silent, sp.last_resend.get(wi, -math.inf) + interval))
            if now >= due:
                self.stat["resends"][sp.tok] += 1
                sp.retried.add(wi)
                w = self.workers[wi]
                self._ctrl(w, True, self._w_resend, w, sp.s, sorted(groups))
                sp.last_resend[wi], sp.next_resend[wi] = now, now + interval
                due = now + interval
            wake = min(wake, due)
        if wake < sp.wake:
            sp.wake = wake
            self.push(wake, self._wake, sp, wake)

    def _wake(self, sp: _Sp, at: float) -> None:
        if not sp.closed and sp.wake == at:
            sp.wake = math.inf
            self._evaluate(sp)

    def _c_partials(self, w: _Worker, s: int, frames: list) -> None:
        """Partial packets reach the coordinator (halo): one event per group, at its last packet."""
        port, groups = self.c_in, {}
        for arr, rx, (g, c) in frames:
            d = port.serve(arr, rx)
            groups[g] = (groups.get(g, (0, 0.0))[0] | 1 << c, d)
        for g, (mask, d) in groups.items():
            self.push(d, self._c_group, w, s, g, mask)

    def _c_group(self, w: _Worker, s: int, g: int, mask: int) -> None:
        sp = self.syncs.get(s)
        new = mask & ~sp.got[g] if sp is not None else mask
        if sp is None or sp.closed:
            self.stat["late"][self._decode(s)[0]] += new.bit_count()
        if sp is None or not new:
            return
        sp.got[g] |= mask
        sp.heard[w.idx] = self.now
        if sp.got[g] == self.full:
            sp.done[g] = self.now
            sp.crit[w.idx].discard(g)
            sp.left[w.idx] -= 1
            sp.left_total -= 1
            if not sp.left[w.idx] and self.halo and w.idx not in sp.retried:   # Karn: no sample after a retry
                self.timers[w.idx][sp.part].observe(self.now - sp.sent_at)
        if not sp.closed:
            self._evaluate(sp)

    def _c_need(self, w: _Worker, s: int) -> None:
        sp = self.syncs.get(s)
        if sp is not None:
            sp.retried.add(w.idx)
        if s in self.kept:
            self._send_input(w, s)

    def _close(self, sp: _Sp) -> None:
        """Stop waiting: count what is skipped; then the next sync point, or the classifier."""
        sp.closed = True
        imp = self.imp[sp.part][sp.layer]
        for g, got in sp.got.items():
            if got != self.full:
                self.stat["skipped"][sp.tok] += 1
                self.stat["lost"][sp.tok] += imp[g] / self.total_imp
        self.kept = {k for k in self.kept if k >= sp.s}
        if self.opts.trace:
            self.traces.append(SyncTrace(sp.tok, sp.layer, sp.part, sp.sent_at, self.now, dict(sp.done)))
        nxt = max(self.now, sp.local_done)
        if sp.s % self.n_sync < self.n_sync - 1:
            self.push(self.c_cpu.serve(nxt, self.trunk_s) if self.trunk_s else nxt, self._start, sp.s + 1)
            return
        end = self.c_cpu.serve(nxt, self.classifier_s)
        self.tok_s[sp.tok] = end - self.tok_start[sp.tok]
        if sp.tok + 1 < self.opts.tokens:
            self.tok, self.tok_start[sp.tok + 1] = sp.tok + 1, end
            self.push(self.c_cpu.serve(end, self.trunk_s) if self.trunk_s else end, self._start, sp.s + 1)

    def compute_s(self) -> float:
        """Loss-free compute on the critical path of one token (seconds)."""
        total = self.classifier_s
        for layer, parts in enumerate(self.remote):
            for part, owners in enumerate(parts):
                work = [w.work_fixed[part] + len(gs) * self.group_params[part] * w.work_spp
                        for w, gs in ((self.workers[wi], gs) for wi, gs in owners.items())]
                total += max(self.local_s[layer][part], *work, 0.0)
        return total


def simulate(shape: ModelShape, cluster: Cluster, options: SimOptions | None = None, *,
             plan: PlacementPlan | None = None, scores: np.ndarray | None = None) -> SimResult:
    """Decode ``options.tokens`` tokens of ``shape`` on ``cluster`` and measure them.

    Args:
        shape: the model.
        cluster: devices and links.
        options: mode, seed and protocol settings.
        plan: a fixed placement (e.g. ``PlacementPlan.split``, as the in-process emulation uses),
            scored by the scheduler's cost model; default: the scheduler's placement.
        scores: static MLP scores ``(n_layers, n_mlp)``; default :func:`~halo_p2p.sim.cluster.mlp_scores`.

    Returns:
        Per-token times and counts; the same for the same arguments (seeded).
    """
    opts = options or SimOptions()
    layout = shape.layout()
    scores = mlp_scores(layout, opts.seed) if scores is None else np.asarray(scores, dtype=np.float64)
    sched = place(shape, cluster, mode=opts.mode, scores=scores, critical_fraction=opts.critical_fraction,
                  bytes_per_param=opts.bytes_per_param, n_parity=opts.n_parity, deadline_k=opts.deadline_k,
                  deadline_floor_s=opts.deadline_floor_s, plan=plan)
    sim = _Sim(shape, cluster, sched, opts, scores)
    diverged = not sim.run()
    n = sim.tok + 1 if diverged else opts.tokens
    st = {k: v[:n] for k, v in sim.stat.items()}
    log.debug("simulated %d %s tokens of %s on %d devices", n, opts.mode, shape.name, cluster.n_devices)
    return SimResult(opts.mode, tuple(sim.tok_s[:n]), sim.compute_s(), float(st["skipped"].mean()),
                     float(st["lost"].mean()), float(st["resends"].mean()), float(st["need"].mean()),
                     float(st["retx"].sum() / n), float(st["late"].mean()), sched,
                     sched.expected_lost_importance / sim.total_imp, diverged, tuple(sim.traces))
