"""Discrete-event simulation of decoding tokens over a lossy cluster: strict, strict-unreliable or halo.

It replays wire protocol 2 of :class:`~halo_p2p.session.coordinator.Coordinator` and
:class:`~halo_p2p.session.worker.Worker` packet by packet on a placement from
:mod:`halo_p2p.scheduler` (:func:`~halo_p2p.testbed.sim.cluster.place`). Per sync point the coordinator
sends each worker holding groups there ONE input vector (Q8_0 by default) and computes its own
groups; a worker computes once its input is complete and answers with ONE vector, the sum of its
groups' partials (:mod:`halo_p2p.testbed.sim.framing` sizes both from the real encoder).

Resources are FIFO :class:`~halo_p2p.testbed.sim.cluster.Port` s per device: the NIC's egress and
ingress (wire time per packet; the coordinator's ingress is where the answers converge) and the
CPU, which runs model compute (``sync_overhead_s[part] + params * seconds_per_param``) and the
network stack (:class:`~halo_p2p.testbed.sim.cpu.StackCost`: per frame sent / received, per vector, per
sync point) one job at a time (``Cluster.stack_on_compute``; else the stack has a port of its own).

* ``strict``: input and answer are reliable messages cut into packets. A lost packet arrives
  one RTO later, doubling per repeated loss (with ``fast_retransmit``: one RTT after the third
  later packet of the burst, RTO for tail losses); delivery is in order per direction
  (head-of-line blocking, :class:`~halo_p2p.testbed.sim.cluster.ReliableStream`); the coordinator waits
  for every answer.
* ``strict-unreliable`` and ``halo``: one packet per chunk, each lost independently; XOR parity
  (``wire.vector.default_parity``) on links with loss, both ways; a worker missing input chunks
  sends ``NeedInput`` 20 ms after its first chunk; the coordinator waits for every answer that
  holds a critical group (all of them in ``strict-unreliable``; in ``halo`` those of
  :class:`~halo_p2p.session.criticality.StaticRule`), sending ``Resend`` (the missing data
  chunks) at the owner's deadline or after a silent gap, backing off as ``Coordinator._wait``
  does, and for the others until each owner's deadline
  (:class:`~halo_p2p.session.sync.ResponseTimer`, fed as the coordinator feeds it, Karn's rule
  and the expiry back-off included); an answer still incomplete then is skipped whole. The
  worker answers a Resend with the chunks asked for plus the parity, or ``NeedInput`` if it has
  no input.

Simplifications: a port serves one burst (one send's packets) whole, without interleaving a burst
arriving meanwhile; jitter is drawn per burst; retransmissions take no extra wire time; the trunk
costs one classifier matrix-vector product per token; attention over the KV cache is free; an
incomplete answer counts as skipped whole (the coordinator sums the chunks that did arrive).
"""

from __future__ import annotations

import heapq
import logging
import math

import numpy as np

from halo_p2p.groups import ATTN, MLP, PARTS
from halo_p2p.plan import PlacementPlan
from halo_p2p.scheduler import Schedule
from halo_p2p.session.criticality import StaticRule
from halo_p2p.session.sync import ResponseTimer
from halo_p2p.testbed.sim.cluster import COORDINATOR_ID, Cluster, mlp_scores, place
from halo_p2p.testbed.sim.framing import VectorFrames, control_bytes, vector_frames
from halo_p2p.testbed.sim.options import SimOptions, SimResult, SyncTrace
from halo_p2p.testbed.sim.shapes import ModelShape
from halo_p2p.testbed.sim.transport import Transport, Worker, missing_chunks, recoverable

__all__ = ["SimOptions", "SimResult", "SyncTrace", "simulate"]

log = logging.getLogger(__name__)

_RECENT = 8        # sync points the coordinator keeps (coordinator._RECENT_SYNC_POINTS)
_KEEP_RESULTS = 8  # sync points whose answers a worker keeps for Resend (worker._KEEP_RESULTS)
_TIE_S = 1e-9      # an answer arriving within 1 ns of its deadline counts as in time (float ties)


class _Sp:
    """The coordinator's state of one sync point (``SyncPoint`` plus ``Coordinator._wait``'s), per worker."""

    __slots__ = ("closed", "crit", "deadline", "done", "got", "heard", "last_resend", "layer", "local_done",
                 "next_resend", "part", "pending", "resends", "retried", "s", "sent_at", "tok", "wake")

    def __init__(self, s: int, tok: int, layer: int, part: int, now: float) -> None:
        self.s, self.tok, self.layer, self.part, self.sent_at = s, tok, layer, part, now
        self.got: dict[int, int] = {}                      # worker -> mask of its answer's chunks received
        self.pending: set[int] = set()                     # workers whose answer is incomplete
        self.crit: set[int] = set()                        # workers whose answer holds a critical group
        self.deadline: dict[int, float] = {}
        self.next_resend: dict[int, float] = {}
        self.last_resend: dict[int, float] = {}
        self.heard: dict[int, float] = {}
        self.done: dict[int, float] = {}                   # worker -> completion time
        self.retried: set[int] = set()
        self.closed, self.local_done, self.wake, self.resends = False, now, math.inf, 0


class _Sim(Transport):
    """The event loop and the reactions of the coordinator and the workers (the transport: its base)."""

    def __init__(self, shape: ModelShape, cluster: Cluster, sched: Schedule, opts: SimOptions,
                 scores: np.ndarray) -> None:
        super().__init__(cluster, opts.tokens, opts.drops, opts.seed)
        plan, lay = sched.plan, sched.plan.layout
        self.opts, self.n_sync = opts, 2 * lay.n_layers
        self.reliable, self.halo = opts.mode == "strict", opts.mode == "halo"
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
                for wi, groups in self.remote[layer][part].items():
                    w = self.workers[wi]
                    kw = {"fmt": opts.wire_dtype, "reliable": self.reliable, "packet_bytes": w.link.packet_bytes,
                          "parity": opts.fec and w.link.plr > 0}
                    w.frames[(layer, part)] = (vector_frames(lay.dim, len(groups), kind="in", **kw),
                                               vector_frames(lay.dim, len(groups), kind="out", norms=self.halo, **kw))
        self.ctrl = control_bytes()
        self.group_params = [lay.group_params(part) for part in PARTS]
        self.classifier_s = shape.classifier_params * cdev.seconds_per_param
        rule = StaticRule(scores, lay.n_attn, opts.critical_fraction if self.halo else 1.0)
        # mypy: the static rule ignores the input vector
        self.crit = [[rule.critical(layer, part, None) for part in PARTS]  # type: ignore[arg-type]
                     for layer in range(lay.n_layers)]
        self.imp = {ATTN: np.repeat(scores.max(axis=1, keepdims=True), lay.n_attn, axis=1), MLP: scores}
        self.total_imp = float(self.imp[ATTN].sum() + self.imp[MLP].sum())
        init = {w.pid: opts.initial_deadline_s or sched.deadline_s.get(w.pid, 0.5) for w in self.workers}
        self.timers = [[ResponseTimer(initial_s=init[w.pid], k=opts.deadline_k, floor_s=opts.deadline_floor_s)
                        for _ in PARTS] for w in self.workers]
        self.syncs: dict[int, _Sp] = {}
        self.kept: set[int] = set()
        self.tok_start, self.tok_s = [0.0] * opts.tokens, [0.0] * opts.tokens
        self.traces: list[SyncTrace] = []

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
            fn(*args)  # type: ignore[operator]  # handlers are stored untyped in the event heap
        return True

    def _send_input(self, w: Worker, s: int, *, again: bool = False) -> None:
        vf = w.frames[self._decode(s)[1:]][0]
        if self.reliable:
            self._send_msg(w, True, s, vf, (self._w_ready, w, s))
        else:
            self._send_frames(w, True, s, vf, list(range(len(vf.sizes))), self._w_input, vector=not again)

    def _send_answer(self, w: Worker, s: int, chunks: tuple[int, ...] | None = None) -> None:
        """The answer (``chunks`` None), or the data chunks a Resend names plus the parity."""
        vf = w.frames[self._decode(s)[1:]][1]
        if self.reliable:
            self._send_msg(w, False, s, vf, (self._c_msg, w, s))
            return
        data = list(range(vf.n_data)) if not chunks else [k for k in chunks if k < vf.n_data]
        self._send_frames(w, False, s, vf, data + list(range(vf.n_data, len(vf.sizes))), self._c_answer,
                          vector=chunks is None)

    # -- worker ---------------------------------------------------------------------------------

    def _w_input(self, w: Worker, s: int, vf: VectorFrames, frames: list) -> None:
        """Input chunks reach a worker: complete (with parity), or ask again after a gap."""
        inp = w.inputs.get(s)
        if inp is None and s > w.latest:
            inp = w.inputs[s] = [0, False, False]
        ready = None
        for d, (_, _, k) in zip(self._arrive(w, True, frames), frames, strict=True):
            if inp is None or inp[1]:
                continue
            inp[0] |= 1 << k
            if recoverable(inp[0], vf.n_data, vf.n_parity):
                inp[1], ready = True, d
            elif not inp[2]:
                inp[2] = True
                self.push(d + self.opts.input_gap_s, self._w_check, w, s)
        if ready is not None:
            self.push(ready, self._w_ready, w, s)

    def _w_check(self, w: Worker, s: int) -> None:
        inp = w.inputs.get(s)
        if inp is not None:
            inp[2] = False
        if inp is not None and not inp[1] and s > w.latest:
            self._need_input(w, s)

    def _need_input(self, w: Worker, s: int) -> None:
        self.stat["need"][self._decode(s)[0]] += 1
        self._ctrl(w, False, s, self._c_need, w, s)

    def _w_ready(self, w: Worker, s: int) -> None:
        """The input is complete: wake, compute (one sync point at a time), then answer."""
        if s <= w.latest:
            return
        _, layer, part = self._decode(s)
        w.latest = s
        for old in [k for k in w.inputs if k <= s]:
            del w.inputs[old]
        woke = self._cpu(w.st, self.now, w.stack.sync_s)
        work = w.work_fixed[part] + len(self.remote[layer][part][w.idx]) * self.group_params[part] * w.spp
        self.push(w.cpu.serve(woke, work), self._w_done, w, s)

    def _w_done(self, w: Worker, s: int) -> None:
        w.results[s] = self.now
        if len(w.results) > _KEEP_RESULTS:
            del w.results[min(w.results)]
        self._send_answer(w, s)

    def _w_resend(self, w: Worker, s: int, chunks: tuple[int, ...]) -> None:
        """A Resend: the chunks again, or NeedInput if the input never became complete."""
        if s in w.results:
            self._send_answer(w, s, chunks)
            return
        inp = w.inputs.get(s)
        if (inp is not None and not inp[1]) or (inp is None and s > w.latest):
            self._need_input(w, s)

    # -- coordinator ----------------------------------------------------------------------------

    def _start(self, s: int) -> None:
        """Send sync point ``s``'s input to its workers (in peer order), compute the local groups."""
        tok, layer, part = self._decode(s)
        sp = self.syncs[s] = _Sp(s, tok, layer, part, self.now)
        self.syncs.pop(s - _RECENT, None)
        self.kept.add(s)
        crit, owners = self.crit[layer][part], self.remote[layer][part]
        if owners:
            self._cpu(self.c_st, self.now, self.c_stack.sync_s)
        for wi, groups in sorted(owners.items()):
            sp.got[wi] = 0
            sp.pending.add(wi)
            if any(g in crit for g in groups):
                sp.crit.add(wi)
            sp.deadline[wi] = sp.next_resend[wi] = self.now + self.timers[wi][part].deadline_s() + _TIE_S
            self._send_input(self.workers[wi], s)
        if self.local_s[layer][part]:
            sp.local_done = self.c_cpu.serve(self.now, self.local_s[layer][part])
        self._evaluate(sp)

    def _evaluate(self, sp: _Sp) -> None:
        """One pass of ``Coordinator._wait``: move on, send due Resends, or sleep until a deadline."""
        if not sp.pending:
            self._close(sp)
            return
        if self.reliable:
            return                                        # strict: every answer arrives in the end
        now, wake, opts = self.now, math.inf, self.opts
        missing = sorted(sp.pending & sp.crit)
        if self.halo and not missing:
            later = [sp.deadline[wi] for wi in sp.pending if now < sp.deadline[wi]]
            if not later:
                self._close(sp)
                return
            wake = min(later)
        for wi in missing:
            timer = self.timers[wi][sp.part]
            interval = max(opts.resend_interval_s, 2 * (timer.srtt or 0.0))
            due = sp.next_resend[wi]
            heard = sp.heard.get(wi)
            if heard is not None:
                due = min(due, max(heard + max(opts.silence_gap_s, interval), sp.last_resend.get(wi, 0.0) + interval))
            if now >= due:
                if wi not in sp.last_resend and heard is None:
                    timer.backoff()                       # nothing arrived by the deadline
                sp.resends += 1
                self.stat["resends"][sp.tok] += 1
                sp.retried.add(wi)
                w, vf = self.workers[wi], self.workers[wi].frames[(sp.layer, sp.part)][1]
                self._ctrl(w, True, sp.s, self._w_resend, w, sp.s, missing_chunks(sp.got[wi], vf.n_data, vf.n_parity))
                sp.last_resend[wi] = now
                sp.next_resend[wi] = due = now + interval * min(64, 2 ** (sp.resends - 1))
            wake = min(wake, due)
        if wake < sp.wake:
            sp.wake = wake
            self.push(wake, self._wake, sp, wake)

    def _wake(self, sp: _Sp, at: float) -> None:
        if not sp.closed and sp.wake == at:
            sp.wake = math.inf
            self._evaluate(sp)

    def _c_answer(self, w: Worker, s: int, vf: VectorFrames, frames: list) -> None:
        """Answer packets reach the coordinator: one event when the answer is complete (else at
        the burst's last packet)."""
        sp = self.syncs.get(s)
        mask = 0 if sp is None else sp.got.get(w.idx, 0)
        at = 0.0
        for d, (_, _, k) in zip(self._arrive(w, False, frames), frames, strict=True):
            mask |= 1 << k
            at = d
            if recoverable(mask, vf.n_data, vf.n_parity):
                break
        self.push(at, self._c_got, w, s, vf, mask)

    def _c_got(self, w: Worker, s: int, vf: VectorFrames, mask: int) -> None:
        sp = self.syncs.get(s)
        new = mask & ~sp.got[w.idx] if sp is not None else mask
        if sp is None or sp.closed:
            self.stat["late"][self._decode(s)[0]] += new.bit_count()
        if sp is None or not new:
            return
        sp.got[w.idx] |= mask
        sp.heard[w.idx] = self.now
        if w.idx in sp.pending and recoverable(sp.got[w.idx], vf.n_data, vf.n_parity):
            self._done(sp, w)
        elif not sp.closed:
            self._evaluate(sp)

    def _c_msg(self, w: Worker, s: int) -> None:
        """A reliable answer delivered (strict)."""
        sp = self.syncs.get(s)
        if sp is not None and w.idx in sp.pending:
            self._done(sp, w)

    def _done(self, sp: _Sp, w: Worker) -> None:
        sp.done[w.idx] = self.now
        sp.pending.discard(w.idx)
        if w.idx not in sp.retried:                         # Karn: no sample after a retry
            self.timers[w.idx][sp.part].observe(self.now - sp.sent_at)
        if not sp.closed:
            self._evaluate(sp)

    def _c_need(self, w: Worker, s: int) -> None:
        sp = self.syncs.get(s)
        if sp is not None:
            sp.retried.add(w.idx)
        if s in self.kept:
            self._send_input(w, s, again=True)

    def _close(self, sp: _Sp) -> None:
        """Stop waiting: count what is skipped; then the next sync point, or the classifier."""
        sp.closed = True
        imp = self.imp[sp.part][sp.layer]
        owners = self.remote[sp.layer][sp.part]
        for wi in sp.pending:
            groups = owners[wi]
            self.stat["skipped"][sp.tok] += len(groups)
            self.stat["lost"][sp.tok] += float(imp[groups].sum()) / self.total_imp
        self.kept = {k for k in self.kept if k >= sp.s}
        if self.opts.trace:
            done = {g: sp.done[wi] for wi, gs in owners.items() if wi in sp.done for g in gs}
            self.traces.append(SyncTrace(sp.tok, sp.layer, sp.part, sp.sent_at, self.now, done))
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
                work = [w.work_fixed[part] + len(gs) * self.group_params[part] * w.spp
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
        scores: static MLP scores ``(n_layers, n_mlp)``; default :func:`~halo_p2p.testbed.sim.cluster.mlp_scores`.

    Returns:
        Per-token times and counts; the same for the same arguments (seeded).
    """
    opts = options or SimOptions()
    layout = shape.layout()
    scores = mlp_scores(layout, opts.seed) if scores is None else np.asarray(scores, dtype=np.float64)
    sched = place(shape, cluster, mode=opts.mode, scores=scores, critical_fraction=opts.critical_fraction,
                  bytes_per_param=opts.bytes_per_param, wire_dtype=opts.wire_dtype, fec=opts.fec,
                  deadline_k=opts.deadline_k, deadline_floor_s=opts.deadline_floor_s, stack_aware=opts.stack_aware,
                  plan=plan)
    sim = _Sim(shape, cluster, sched, opts, scores)
    diverged = not sim.run()
    n = sim.tok + 1 if diverged else opts.tokens
    st = {k: float(v[:n].mean()) for k, v in sim.stat.items()}
    log.debug("simulated %d %s tokens of %s on %d devices", n, opts.mode, shape.name, cluster.n_devices)
    return SimResult(opts.mode, tuple(sim.tok_s[:n]), sim.compute_s(), st["skipped"], st["lost"], st["resends"],
                     st["need"], st["retx"], st["late"], sched, sched.expected_lost_importance / sim.total_imp,
                     diverged, tuple(sim.traces), st["stack"], st["frames"])
