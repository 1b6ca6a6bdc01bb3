"""The simulator's transport: per-device ports, the stack's CPU, unreliable frames and reliable messages.

:class:`Transport` is the base of :class:`halo_p2p.testbed.sim.des._Sim`: it sends a burst of packets from
the coordinator to a worker or back (stack CPU, NIC egress, loss, latency, NIC ingress, stack
CPU at the receiver), as unreliable frames each lost independently or as one reliable message
with retransmission delays and in-order delivery. The protocol's reactions live in ``des``.

Pure module: no I/O.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from functools import lru_cache

import numpy as np

from halo_p2p.testbed.sim.cluster import Cluster, Port, ReliableStream
from halo_p2p.testbed.sim.cpu import StackCost
from halo_p2p.testbed.sim.framing import VectorFrames

__all__ = ["Transport", "Worker", "missing_chunks", "recoverable"]


@lru_cache(maxsize=256)
def _stripes(n_data: int, n_parity: int) -> tuple[tuple[int, int], ...]:
    """Per XOR parity chunk: (mask of the data chunks of its stripe, its own bit)."""
    return tuple((sum(1 << i for i in range(j, n_data, n_parity)), 1 << (n_data + j)) for j in range(n_parity))


def recoverable(mask: int, n_data: int, n_parity: int) -> bool:
    """Whether the chunks in ``mask`` rebuild every data chunk (``fec.recover``'s rule)."""
    full = (1 << n_data) - 1
    if mask & full == full:
        return True
    if not n_parity:
        return False
    for data, parity in _stripes(n_data, n_parity):
        miss = data & ~mask
        if miss and (miss & (miss - 1) or not mask & parity):
            return False
    return True


def missing_chunks(mask: int, n_data: int, n_parity: int) -> tuple[int, ...]:
    """Data chunks neither received nor rebuildable (``ChunkedVector.missing_chunks``); empty if
    nothing arrived (the Resend then asks for the whole answer)."""
    if not mask:
        return ()
    fixable = 0
    for data, parity in _stripes(n_data, n_parity):
        miss = data & ~mask
        if miss and not miss & (miss - 1) and mask & parity:
            fixable |= miss
    return tuple(i for i in range(n_data) if not (mask | fixable) >> i & 1)


class Worker:
    """One worker: ports, compute, loss streams, reliable streams, frames, and the worker's
    input/result state (as in ``Worker``)."""

    __slots__ = (
        "cpu",
        "down",
        "frames",
        "idx",
        "inp",
        "inputs",
        "latest",
        "link",
        "out",
        "pid",
        "results",
        "rng_down",
        "rng_up",
        "spp",
        "st",
        "stack",
        "up",
        "work_fixed",
    )

    def __init__(self, idx: int, pid: str, cluster: Cluster, seed: int, shared: Port | None) -> None:
        self.idx, self.pid, self.link = idx, pid, cluster.links[idx]
        dev = cluster.workers[idx]
        self.spp, self.work_fixed, self.stack = dev.seconds_per_param, dev.sync_overhead_s, dev.stack
        self.out, self.inp, self.cpu = Port(), Port(), Port()
        self.st = shared or (self.cpu if cluster.stack_on_compute else Port())
        self.rng_down = random.Random(f"halo-sim/{seed}/{pid}/down")
        self.rng_up = random.Random(f"halo-sim/{seed}/{pid}/up")
        self.down, self.up = ReliableStream(), ReliableStream()
        self.frames: dict[tuple[int, int], tuple[VectorFrames, VectorFrames]] = {}   # (layer, part) -> in, out
        self.latest = -1                                  # last sync point computed (index)
        self.inputs: dict[int, list] = {}                 # s -> [chunk mask, queued, check pending]
        self.results: dict[int, float] = {}               # s -> time its answer was ready


class Transport:
    """Ports, loss streams and the sending and receiving of bursts (the base of the simulation).

    Args:
        cluster: devices and links (one :class:`Worker` each).
        tokens: tokens simulated (sizes the per-token counters in ``stat``).
        drops: scripted losses, ``SimOptions.drops``.
        seed: seeds the loss streams.

    Subclasses set ``n_sync`` (sync points per token), ``ctrl`` (bytes of each control message)
    and define the handlers they pass.
    """

    ctrl: dict[str, int]

    def __init__(self, cluster: Cluster, tokens: int, drops: tuple, seed: int) -> None:
        shared = Port() if cluster.shared_stack else None
        self.per_msg = cluster.stack_per_message
        self.c_out, self.c_in, self.c_cpu = Port(), Port(), Port()
        self.c_st = shared or (self.c_cpu if cluster.stack_on_compute else Port())
        self.c_stack: StackCost = cluster.coordinator.stack
        self.workers = [Worker(i, pid, cluster, seed, shared) for i, pid in enumerate(cluster.worker_ids)]
        self.drops = Counter(drops)
        self.heap: list[tuple[float, int, object, tuple]] = []
        self.seq, self.now, self.tok, self.n_sync = 0, 0.0, 0, 1
        self.stat = {k: np.zeros(tokens) for k in ("skipped", "lost", "resends", "need", "retx", "late",
                                                   "stack", "frames")}

    def push(self, at: float, fn: object, *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, fn, args))

    def _decode(self, s: int) -> tuple[int, int, int]:
        tok, rem = divmod(s, self.n_sync)
        return tok, rem >> 1, rem & 1

    def _lost(self, rng: random.Random, plr: float, s: int, w: Worker, down: bool, i: int) -> bool:
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

    # -- CPU and transport ----------------------------------------------------------------------

    def _cpu(self, port: Port, at: float, seconds: float) -> float:
        """Stack CPU of ``seconds`` on ``port`` from ``at``; its end."""
        if not seconds:
            return at
        self.stat["stack"][self.tok] += seconds
        return port.serve(at, seconds)

    def _ends(self, w: Worker, down: bool) -> tuple:
        """(sender stack port, sender's costs, sender NIC, receiver NIC, receiver stack port,
        receiver's costs, loss stream) of one direction."""
        if down:
            return self.c_st, self.c_stack, self.c_out, w.inp, w.st, w.stack, w.rng_down
        return w.st, w.stack, w.out, self.c_in, self.c_st, self.c_stack, w.rng_up

    def _depart(self, w: Worker, down: bool, sizes: list[int], vector: bool, per_msg: bool = False) -> list[float]:
        """Stack CPU and NIC egress of a burst sent now: each packet's departure time."""
        st, cost, nic, *_ = self._ends(w, down)
        t = self._cpu(st, self.now, cost.vector_tx_s if vector else 0.0)
        out = []
        for i, n in enumerate(sizes):
            t = self._cpu(st, t, 0.0 if per_msg and i else cost.frame_tx_s)
            out.append(nic.serve(t, w.link.wire_s(n)))
        self.stat["frames"][self.tok] += len(sizes)
        return out

    def _arrive(self, w: Worker, down: bool, frames: list, per_msg: bool = False) -> list[float]:
        """NIC ingress and stack CPU of a burst's surviving packets ``(arrival, size, ...)``: when
        each is processed (the first also pays the per-burst cost)."""
        _, _, _, nic, st, cost, _ = self._ends(w, down)
        out = []
        for i, (arr, n, *_) in enumerate(frames):
            t = nic.serve(arr, w.link.wire_s(n))
            extra = cost.vector_rx_s if i == 0 else 0.0
            out.append(self._cpu(st, t, extra + (0.0 if per_msg and i else cost.frame_rx_s)))
        return out

    def _send_frames(self, w: Worker, down: bool, s: int, vf: VectorFrames, chunks: list[int], on_burst: object,
                     *, vector: bool) -> None:
        """Unreliable packets (chunk indices of ``vf``), each lost independently; the survivors
        reach ``on_burst(w, s, vf, [(arrival, size, chunk), ...])``."""
        rng, link = self._ends(w, down)[6], w.link
        sizes = [vf.sizes[k] for k in chunks]
        lat = link.one_way_s + (rng.uniform(0.0, link.jitter_s) if link.jitter_s else 0.0)
        frames = [(dep + lat, n, k) for i, (dep, n, k) in enumerate(zip(self._depart(w, down, sizes, vector), sizes,
                                                                        chunks, strict=True))
                  if not self._lost(rng, link.plr, s, w, down, i)]
        if frames:
            self.push(frames[0][0], on_burst, w, s, vf, frames)

    def _send_msg(self, w: Worker, down: bool, s: int, vf: VectorFrames, handler: tuple) -> None:
        """One reliable message: retransmission delays per lost packet, in-order delivery."""
        rng, link = self._ends(w, down)[6], w.link
        stream = w.down if down else w.up
        lat = link.one_way_s + (rng.uniform(0.0, link.jitter_s) if link.jitter_s else 0.0)
        sizes = list(vf.sizes)
        deps = self._depart(w, down, sizes, True, self.per_msg)
        msg = [len(sizes), 0.0, stream.open(handler), stream]
        burst, tok = [], self._decode(s)[0]
        for i, dep in enumerate(deps):
            extra, rto = 0.0, link.rto_s
            if self._lost(rng, link.plr, s, w, down, i):
                self.stat["retx"][tok] += 1
                if link.fast_retransmit and i + 3 < len(deps):      # third duplicate ACK, then one RTT
                    extra = deps[i + 3] - dep + 2 * link.one_way_s
                elif link.tail_probe_s is not None:                 # tail loss probe, then one RTT
                    extra = deps[-1] - dep + link.tail_probe_s + 2 * link.one_way_s
                else:
                    extra, rto = rto, min(2 * rto, link.rto_max_s)
                while self._lost(rng, link.plr, s, w, down, i):     # a lost retransmission
                    self.stat["retx"][tok] += 1
                    if link.tail_probe_s is not None:                # RACK detects it: probe again
                        extra += link.tail_probe_s + 2 * link.one_way_s
                    else:
                        extra, rto = extra + rto, min(2 * rto, link.rto_max_s)
            frame = (dep + lat + extra, sizes[i], msg)
            if extra:
                self.push(frame[0], self._msg_burst, w, down, [frame])
            else:
                burst.append(frame)
        if burst:
            self.push(burst[0][0], self._msg_burst, w, down, burst)

    def _msg_burst(self, w: Worker, down: bool, frames: list) -> None:
        for d, (_, _, msg) in zip(self._arrive(w, down, frames, self.per_msg), frames, strict=True):
            msg[0] -= 1
            msg[1] = max(msg[1], d)
            if not msg[0]:
                for handler, at in msg[3].complete(msg[2], msg[1]):
                    self.push(at, *handler)

    def _ctrl(self, w: Worker, down: bool, s: int, handler: object, *args: object) -> None:
        """One small unreliable control message (Resend down, NeedInput up)."""
        rng, link = self._ends(w, down)[6], w.link
        n = self.ctrl["resend" if down else "need"]
        dep = self._depart(w, down, [n], False)[0]
        if not (link.plr and rng.random() < link.plr):
            self.push(dep + link.one_way_s, self._ctrl_in, w, down, n, handler, args)

    def _ctrl_in(self, w: Worker, down: bool, n: int, handler: object, args: tuple) -> None:
        _, _, _, nic, st, cost, _ = self._ends(w, down)
        self.push(self._cpu(st, nic.serve(self.now, w.link.wire_s(n)), cost.frame_rx_s), handler, *args)
