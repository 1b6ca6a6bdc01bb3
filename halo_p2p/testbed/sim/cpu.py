"""CPU cost of halo-p2p's network stack per frame, per vector and per sync point, with its sources.

halo-p2p's transport is pure Python: aiortc's SCTP over pyOpenSSL DTLS, plus the project's own
CBOR codec, Q8_0 quantization and chunk bookkeeping. On a Raspberry Pi this CPU is of the same
order as the model's compute per sync point, so the simulator charges it to the devices
(:class:`StackCost`, :attr:`halo_p2p.testbed.sim.cluster.Device.stack`).

Measured on this machine (2-vCPU Intel Xeon at 2.6 GHz, CPython 3.11.7, aiortc 1.16, with
``halo_p2p.net.sctp_tuning``'s delayed SACKs) by ``benchmarks/projection.py --measure-cpu``, five
runs on the shared machine (load 1-4), which vary by 30-40 %:

* **Link** (two processes, one :class:`~halo_p2p.net.webrtc.WebRtcLink` over 127.0.0.1, bursts of
  ``k_down`` 1100-byte frames answered by ``k_up`` frames, least squares over six
  ``(k_down, k_up)`` pairs): 59-112 us of CPU per frame sent (median 75) and 76-157 us per frame
  received (median 105; SACK packets included). ``benchmarks/frame_cost.py`` agrees: 204-234 us
  per request/response exchange and side, i.e. per frame sent plus frame received. With a 3 ms
  pause before each send (a sync point's compute) each side also spends 380-620 us per round
  trip, against 35-130 us without: the cost of waking an idle event loop (timers, cold caches),
  which every sync point pays once per device.
* **Protocol** (in-process, the session's own functions: ``encode_frames``, ``codec.decode``,
  ``ChunkedVector.add``, ``SyncPoint.add``/``close``, for 1-, 2- and 4-frame Q8_0 vectors): per
  frame 36-62 us to quantize and encode, 24-45 us to decode and file; per vector about 35 us to
  send (templates, ``answer_chunks``) and 4-17 us to receive, plus one wake of
  ``Coordinator._wait`` per burst received (``asyncio.wait_for`` on an event: 79 us).

:data:`X86_STACK` adds these up. A Raspberry Pi 4B core is :data:`RPI4_SCALE` times slower
(see its docstring for the source); :data:`RPI4_STACK` and :data:`RPI5_STACK` are the x86 costs
scaled. :data:`NATIVE_STACK` is a kernel/native stack for comparison (the old projection's
assumption).

Pure module: constants and arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from halo_p2p.errors import ConfigError

__all__ = ["FREE_STACK", "NATIVE_STACK", "RPI4_SCALE", "RPI4_STACK", "RPI5_SCALE", "RPI5_STACK", "X86_STACK",
           "StackCost"]


@dataclass(frozen=True, slots=True)
class StackCost:
    """CPU seconds one device's network stack spends (all of it on the device's CPU).

    Attributes:
        frame_tx_s: per frame (SCTP packet) sent: encode, SCTP, DTLS encrypt, UDP send.
        frame_rx_s: per frame received: UDP receive, DTLS decrypt, SCTP (and its SACKs), decode,
            chunk bookkeeping.
        vector_tx_s: per vector sent (a layer input to one worker, or one answer): templates,
            ``payload_budget``, quantization set-up.
        vector_rx_s: per burst of frames received (one vector, or one resent part of it):
            bookkeeping and one wake of the waiting coroutine.
        sync_s: per sync point at which the device takes part: waking its idle event loop.
    """

    frame_tx_s: float = 0.0
    frame_rx_s: float = 0.0
    vector_tx_s: float = 0.0
    vector_rx_s: float = 0.0
    sync_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"StackCost.{f.name} = {v!r} is out of range", "use seconds >= 0")

    def scaled(self, factor: float) -> StackCost:
        """Every cost times ``factor`` (a slower or faster core)."""
        return StackCost(*(getattr(self, f.name) * factor for f in fields(self)))


X86_STACK = StackCost(frame_tx_s=120e-6, frame_rx_s=140e-6, vector_tx_s=35e-6, vector_rx_s=90e-6, sync_s=400e-6)
"""halo-p2p's stack on this machine's Xeon core (see the module docstring): per frame sent
75 us (link) + 45 us (codec), received 105 us + 35 us; 35 us per vector sent, 90 us per burst
received (10 us of bookkeeping and a wake of the waiting coroutine), 400 us per sync point."""

RPI4_SCALE = 4.0
"""How many times slower a Raspberry Pi 4B core (Cortex-A72, 1.5 GHz) runs this stack than
this machine's core. The Computer Language Benchmarks Game n-body (C, gcc) takes 1.743 s for 5
million steps on a Pi 4B at 1.5 GHz (performance governor; C. Mehta, "Performance Analysis of
Languages on Raspberry Pi", chaitanyamehta.github.io) and 0.45 s here (gcc 12 -O2): 3.9x. The
Python version of the same benchmark gives 158.3 s there (CPython version not stated) against
19.6 s here (3.11.7), 8.1x, but n-body got 3x faster from CPython 3.8 to 3.11 (jott.live,
"Python 3.11 is much faster than 3.8"), so the Python ratio is 2.7x to 8.1x depending on the
Pi's version. 4.0 is the native ratio, inside the Python range."""

RPI5_SCALE = RPI4_SCALE * 1477.83 / 2737.49
"""A Raspberry Pi 5 core (Cortex-A76, 2.4 GHz) against this machine's: :data:`RPI4_SCALE` times
the Pi 4 / Pi 5 single-thread sysbench ratio (1477.83 vs 2737.49 events/s, sysbench 1.0.20 cpu;
leoncode.co.uk, "Raspberry Pi CPU Benchmarks"): 2.16."""

RPI4_STACK = X86_STACK.scaled(RPI4_SCALE)
"""halo-p2p's stack on a Raspberry Pi 4B: 480 us per frame sent, 560 us received, 1.6 ms per sync point."""

RPI5_STACK = X86_STACK.scaled(RPI5_SCALE)
"""halo-p2p's stack on a Raspberry Pi 5."""

FREE_STACK = StackCost()
"""A network stack that costs no CPU (the default of :class:`~halo_p2p.testbed.sim.cluster.Device`)."""

NATIVE_STACK = StackCost(frame_tx_s=5e-6, frame_rx_s=5e-6)
"""A native (kernel UDP/TCP) stack on a Raspberry Pi 4B: a Pi 4B moves 949 Mbit/s of 1500-byte
frames on one link, at most 12.3 us per frame for both ends (tomcore.io, "Raspberry PI 4B
Network Performance"); no per-vector or per-sync-point cost."""
