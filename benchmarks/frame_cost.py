"""CPU per data-channel frame of WebRTC links: request/response rounds between processes.

A coordinator (this process) and ``--workers`` worker child processes (default 1) each open one
:class:`WebRtcLink` over 127.0.0.1 with the project's own handshake (``Handshake.offer/answer``,
SDP exchanged over the child's stdin/stdout). A *round* is one ``--size``-byte request to every
worker and every worker's echo of it (the coordinator waits for all). Phases:

* ``unreliable``: ``--exchanges`` rounds on ``Channel.UNRELIABLE`` ("halo-act");
* ``reliable``: the same on ``Channel.RELIABLE``;
* ``think``: ``--think-exchanges`` unreliable rounds where each side waits ``--think-ms``
  before it sends (a worker computes before answering, the coordinator before the next round);
* ``bulk``: ``--bulk-mb`` MiB of 256 KiB reliable messages to the first worker, then one echo.

Per phase it prints, for the coordinator and per worker (the mean of the workers): CPU
microseconds per round (``time.process_time()`` deltas, all threads; ``sys`` is the kernel part,
from ``os.times()``), SCTP packets sent per round split into packets with DATA, SACK-only
packets and SACKs bundled with DATA (counted by wrapping the DTLS transport's ``_send_data``:
one call is one UDP datagram), and the wall time of a round (median and 90th percentile; for
``bulk``: MiB/s). Heartbeats run every 2 s (not 0.5 s) so that they barely touch the counts.
Each phase starts with an uncounted warm-up of a tenth of its rounds. About 15 s with defaults.

    .venv/bin/python benchmarks/frame_cost.py                    # tuned (halo_p2p.net.webrtc as is)
    .venv/bin/python benchmarks/frame_cost.py --stock            # without the frame-cost tuning
    .venv/bin/python benchmarks/frame_cost.py --workers 3 --phases unreliable,think --json out.json

``--stock`` disables ``halo_p2p.net.webrtc._reduce_frame_cost`` in every process (the 128 KiB
congestion-window floor stays): the baseline of the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from halo_p2p.net import webrtc  # noqa: E402
from halo_p2p.net.link import Channel  # noqa: E402
from halo_p2p.net.webrtc import Handshake, WebRtcLink, pin_host_addresses  # noqa: E402

LINK_OPTIONS: dict[str, Any] = {"heartbeat_interval_s": 2.0, "dead_after_s": 20.0}
BULK_MESSAGE_BYTES = 256 << 10
ECHO_LIMIT_BYTES = 2000          # the worker echoes messages up to this size, swallows bulk ones
_DATA, _SACK = 0, 3              # SCTP chunk types (RFC 9260 §3.2)


class PacketCounter:
    """Counts the SCTP packets a link sends, by the chunk types each one carries."""

    def __init__(self, link: WebRtcLink) -> None:
        self.packets = self.with_data = self.sack_only = self.sack_bundled = 0
        dtls = link._pc.sctp.transport       # private, aiortc 1.16: RTCSctpTransport -> RTCDtlsTransport
        send = dtls._send_data

        async def counted(packet: bytes) -> None:
            self.count(packet)
            await send(packet)

        dtls._send_data = counted

    def count(self, packet: bytes) -> None:
        pos, kinds = 12, set()
        while pos + 4 <= len(packet):
            kind, _, length = struct.unpack_from("!BBH", packet, pos)
            kinds.add(kind)
            pos += max(4, (length + 3) & ~3)
        self.packets += 1
        if _DATA in kinds:
            self.with_data += 1
            self.sack_bundled += _SACK in kinds
        elif kinds == {_SACK}:
            self.sack_only += 1

    def snapshot(self) -> dict[str, int]:
        return {"packets": self.packets, "with_data": self.with_data, "sack_only": self.sack_only,
                "sack_bundled": self.sack_bundled}


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: after[k] - before[k] for k in after}


def cpu() -> dict[str, float]:
    """This process's CPU seconds: all (``process_time``) and the kernel's part (``os.times``)."""
    return {"cpu_s": time.process_time(), "sys_s": os.times().system}


def usage(counters: list[PacketCounter]) -> dict[str, Any]:
    """CPU of this process and the packets its links sent (summed)."""
    snaps = [c.snapshot() for c in counters]
    return {**cpu(), **{k: sum(s[k] for s in snaps) for k in snaps[0]}}


async def read_json(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), 60)
    if not line:
        raise RuntimeError("the worker process exited")
    return json.loads(line)  # type: ignore[no-any-return]


# -- worker (child process) ------------------------------------------------------------------------

async def worker(think_s: float) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def reply(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    hs = await Handshake.answer((await read_json(stdin))["offer"])
    reply({"answer": hs.local_sdp})
    link = await hs.open(local_id="worker", remote_id="coordinator", timeout_s=10, **LINK_OPTIONS)
    counter = PacketCounter(link)
    think = {"s": 0.0}

    async def echo() -> None:
        while True:
            channel, data = await link.recv()
            if len(data) <= ECHO_LIMIT_BYTES:
                if think["s"]:
                    await asyncio.sleep(think["s"])
                await link.send(channel, data)

    echo_task = asyncio.create_task(echo())
    start = usage([counter])
    while (cmd := await read_json(stdin)).get("cmd") != "quit":
        if cmd["cmd"] == "start":
            think["s"] = think_s if cmd["phase"] == "think" else 0.0
            start = usage([counter])
            reply({"ok": True})
        elif cmd["cmd"] == "stop":
            reply(delta(usage([counter]), start))
    echo_task.cancel()
    await link.aclose()


# -- coordinator ---------------------------------------------------------------------------------

class Worker:
    """One worker child process, its link and the packet counter of the coordinator's end."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdin is not None and child.stdout is not None
        self.child, self._stdin, self._stdout = child, child.stdin, child.stdout
        self.link: WebRtcLink
        self.counter: PacketCounter

    async def ask(self, msg: dict[str, Any], answer: bool = True) -> dict[str, Any]:
        self._stdin.write((json.dumps(msg) + "\n").encode())
        await self._stdin.drain()
        return await read_json(self._stdout) if answer else {}

    async def connect(self, index: int) -> None:
        offer = await Handshake.offer()
        await offer.accept_answer((await self.ask({"offer": offer.local_sdp}))["answer"])
        self.link = await offer.open(local_id="coordinator", remote_id=f"worker{index}", timeout_s=10,
                                     **LINK_OPTIONS)
        self.counter = PacketCounter(self.link)


async def echo_of(link: WebRtcLink, payload: bytes) -> Channel:
    while True:
        channel, got = await asyncio.wait_for(link.recv(), 5)   # a lost unreliable echo times out here
        if got == payload:
            return channel


async def rounds(workers: list[Worker], channel: Channel, n: int, size: int, think_s: float) -> list[float]:
    """``n`` rounds: one request to every worker, then every response; the wall time of each round."""
    rtts = []
    for i in range(n):
        if think_s:
            await asyncio.sleep(think_s)
        payload = i.to_bytes(4, "big") * (size // 4) + bytes(size % 4)
        sent = time.perf_counter()
        for w in workers:
            await w.link.send(channel, payload)
        if len(workers) == 1:
            got = [await echo_of(workers[0].link, payload)]
        else:
            got = await asyncio.gather(*(echo_of(w.link, payload) for w in workers))
        assert set(got) == {channel}
        rtts.append(time.perf_counter() - sent)
    return rtts


async def bulk(link: WebRtcLink, total_bytes: int, size: int) -> list[float]:
    started = time.perf_counter()
    message = bytes(BULK_MESSAGE_BYTES)
    for _ in range(max(1, total_bytes // BULK_MESSAGE_BYTES)):
        await link.send(Channel.RELIABLE, message)
    marker = b"end of bulk".ljust(size, b".")
    await link.send(Channel.RELIABLE, marker)
    await echo_of(link, marker)
    return [time.perf_counter() - started]


async def coordinator(args: argparse.Namespace) -> dict[str, Any]:
    child_args = [str(HERE), "--worker", "--think-ms", str(args.think_ms)]
    if args.stock:
        child_args.append("--stock")
    workers: list[Worker] = []
    try:
        for i in range(args.workers):
            workers.append(Worker(await asyncio.create_subprocess_exec(
                sys.executable, *child_args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                cwd=REPO)))
            await workers[-1].connect(i)
        results: dict[str, Any] = {"stock": args.stock, "size": args.size, "workers": args.workers}
        for phase in args.phases.split(","):
            n = args.think_exchanges if phase == "think" else args.exchanges
            think_s = args.think_ms / 1e3 if phase == "think" else 0.0
            channel = Channel.UNRELIABLE if phase in ("unreliable", "think") else Channel.RELIABLE
            active = workers[:1] if phase == "bulk" else workers

            async def run(count: int, phase: str = phase, channel: Channel = channel, think_s: float = think_s,
                          active: list[Worker] = active, n: int = n) -> list[float]:
                if phase == "bulk":         # count / n of --bulk-mb
                    return await bulk(active[0].link, int(args.bulk_mb * (1 << 20) * count / n), args.size)
                return await rounds(active, channel, count, args.size, think_s)

            for w in active:
                await w.ask({"cmd": "start", "phase": phase})
            await run(max(1, n // 10))                                    # warm-up
            for w in active:
                await w.ask({"cmd": "start", "phase": phase})
            counters = [w.counter for w in active]
            start = usage(counters)
            rtts = await run(n)
            mine = delta(usage(counters), start)
            theirs = [await w.ask({"cmd": "stop"}) for w in active]
            units = n if phase != "bulk" else args.bulk_mb
            results[phase] = {
                "units": units, "unit": "MiB" if phase == "bulk" else "round", "workers": len(active),
                "wall_s": sum(rtts),
                "rtt_median_us": statistics.median(rtts) * 1e6,
                "rtt_p90_us": sorted(rtts)[int(0.9 * (len(rtts) - 1))] * 1e6,
                "coordinator": mine, "worker": {k: statistics.mean(t[k] for t in theirs) for k in theirs[0]}}
        for w in workers:
            await w.ask({"cmd": "quit"}, answer=False)
            await w.link.aclose()
        for w in workers:
            await asyncio.wait_for(w.child.wait(), 15)
        return results
    finally:
        for w in workers:
            if w.child.returncode is None:
                w.child.kill()              # by pid: only the processes this benchmark started
                await w.child.wait()


def report(results: dict[str, Any]) -> None:
    print(f"{'stock aiortc' if results['stock'] else 'tuned'}: {results['workers']} worker(s), "
          f"{results['size']}-byte messages; per round (bulk: per MiB), per process")
    print(f"{'phase':<11} {'side':<12} {'CPU us':>8} {'sys us':>6} {'packets':>7} {'DATA':>6} {'SACK-only':>9} "
          f"{'SACK+DATA':>9} {'round med us':>12} {'p90 us':>7}")
    for phase, r in results.items():
        if not isinstance(r, dict):
            continue
        for side in ("coordinator", "worker"):
            s, u = r[side], r["units"]
            wall = ""
            if side == "coordinator":
                wall = (f"{r['units'] / r['wall_s']:>8.1f} MiB/s" if phase == "bulk"
                        else f"{r['rtt_median_us']:>12.0f} {r['rtt_p90_us']:>7.0f}")
            print(f"{phase:<11} {side:<12} {s['cpu_s'] / u * 1e6:>8.1f} {s['sys_s'] / u * 1e6:>6.0f} "
                  f"{s['packets'] / u:>7.2f} {s['with_data'] / u:>6.2f} {s['sack_only'] / u:>9.2f} "
                  f"{s['sack_bundled'] / u:>9.2f} {wall}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one link each")
    parser.add_argument("--exchanges", type=int, default=3000, help="rounds per phase")
    parser.add_argument("--size", type=int, default=650, help="bytes per request and per response")
    parser.add_argument("--phases", default="unreliable,reliable,think,bulk",
                        help="comma-separated: unreliable, reliable, think, bulk")
    parser.add_argument("--think-ms", type=float, default=3.0, help="pause before each send in the think phase")
    parser.add_argument("--think-exchanges", type=int, default=400, help="rounds of the think phase")
    parser.add_argument("--bulk-mb", type=float, default=32.0, help="MiB sent in the bulk phase")
    parser.add_argument("--stock", action="store_true", help="without webrtc._reduce_frame_cost (both processes)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stock:
        webrtc._reduce_frame_cost = lambda pc: None  # type: ignore[attr-defined]
    pin_host_addresses(["127.0.0.1"])
    if args.worker:
        asyncio.run(worker(args.think_ms / 1e3))
        return
    results = asyncio.run(coordinator(args))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
