"""Signaling under abuse: key holders connecting while strangers hold sockets and flood the port.

Three processes on 127.0.0.1: a ``SignalingServer`` with its default limits (child), a stranger
(child) and the key holders (this process). The stranger connects from ``--addresses`` loopback
addresses of its own (127.0.0.2 and up, other devices; ``--same-address``: 127.0.0.1, the key
holders' address) and keeps, for ``--seconds``:

* ``--idle`` idle sockets open, re-opening each one as soon as the server drops it;
* ``--keyless`` workers sending well-formed offers signed with another key, one per connection;
* ``--garbage`` workers sending frames that are not CBOR, one per connection.

Meanwhile a key holder connects every ``--every-s`` seconds (``connect(timeout_s=--timeout-s)``,
the whole setup: signed offer, answer, ICE, DTLS, SCTP, both channels open) and closes the link.
Printed: hostile connections per second (opened by the stranger), the key holders' success rate
and connect latency, the server's refusals by cause and the lines its log got about them (per
cause and interval, not per refusal), and the server's CPU time.

    .venv/bin/python benchmarks/signaling_abuse.py                       # 10 s, 40 idle + 4 keyless + 2 garbage
    .venv/bin/python benchmarks/signaling_abuse.py --seconds 5 --addresses 40 --idle 80
    .venv/bin/python benchmarks/signaling_abuse.py --same-address --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from halo_p2p.errors import HaloError  # noqa: E402
from halo_p2p.net.signaling import SIGNALING_PROTOCOL, SignalingServer, connect, sign_message  # noqa: E402
from halo_p2p.net.webrtc import pin_host_addresses  # noqa: E402
from halo_p2p.wire.codec import encode  # noqa: E402
from halo_p2p.wire.messages import SignalOffer  # noqa: E402

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
HOST = "127.0.0.1"


class _CountingHandler(logging.Handler):
    """Counts the server's log lines about refusals (not ``listening`` or ``link ... open``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().startswith("refused")


async def serve() -> None:
    """Child: a SignalingServer with default limits; stats as JSON on stdout when stdin closes."""
    pin_host_addresses([HOST])
    counting = _CountingHandler()
    logging.getLogger("halo_p2p.net.signaling").addHandler(counting)
    logging.getLogger("halo_p2p.net.signaling").setLevel(logging.INFO)

    async def on_link(link: Any, peer_id: str) -> None:
        asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(link.aclose()))

    server = SignalingServer("srv", "server", KEY, host=HOST, on_link=on_link)
    print(await server.start(), flush=True)
    cpu0 = time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    cpu_s = time.process_time() - cpu0
    stats = dict(server.stats)
    lines_during_run = counting.lines
    await server.aclose()
    print(json.dumps({"stats": stats, "log_lines": lines_during_run, "log_lines_with_final_summary": counting.lines,
                      "cpu_s": cpu_s}), flush=True)


def _keyless_frame() -> bytes:
    offer = sign_message(SignalOffer(peer_id="stranger", name="x", protocol=SIGNALING_PROTOCOL,
                                     nonce=secrets.token_hex(16), sent_s=time.time(), sdp="v=0\r\n", mac=""),
                         OTHER_KEY)
    body = encode(offer)
    return len(body).to_bytes(4, "big") + body


async def stranger(port: int, args: argparse.Namespace) -> None:
    """Child: the hostile connections for ``--seconds``; counts as JSON on stdout."""
    sources = [HOST] if args.same_address else [f"127.0.{2 + i // 250}.{2 + i % 250}" for i in range(args.addresses)]
    opened: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    stop_at = time.monotonic() + args.seconds

    async def loop(kind: str, source: str) -> None:
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            except OSError:
                failed[kind] += 1
                await asyncio.sleep(0.01)
                continue
            opened[kind] += 1
            try:
                if kind == "keyless":
                    writer.write(_keyless_frame())
                elif kind == "garbage":
                    writer.write(b"\x00\x00\x00\x20" + b"\xff" + secrets.token_bytes(31))
                await writer.drain()
                await reader.read()                 # until the server drops it
            except OSError:
                pass
            finally:
                writer.close()

    tasks = [loop(kind, sources[i % len(sources)])
             for kind, n in (("idle", args.idle), ("keyless", args.keyless), ("garbage", args.garbage))
             for i in range(n)]
    started = time.monotonic()
    running = [asyncio.create_task(t) for t in tasks]
    await asyncio.wait(running, timeout=args.seconds + 2)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    print(json.dumps({"opened": opened, "failed": failed, "seconds": time.monotonic() - started}), flush=True)


async def _child(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, str(HERE), *argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, cwd=REPO,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pin_host_addresses([HOST])
    server = await _child("--role", "server")
    assert server.stdout is not None and server.stdin is not None
    port = int(await asyncio.wait_for(server.stdout.readline(), 30))
    hostile = await _child("--role", "stranger", "--port", str(port), *_stranger_argv(args))
    assert hostile.stdout is not None
    await asyncio.sleep(args.warmup_s)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    end = time.monotonic() + args.seconds - args.warmup_s - 0.5
    i = 0
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            link = await connect(HOST, port, peer_id=f"holder{i}", name="holder", swarm_key=KEY,
                                 timeout_s=args.timeout_s)
        except HaloError as exc:
            failures[str(exc).split(":")[0][:80]] += 1
        else:
            latencies.append(time.perf_counter() - started)
            await link.aclose()
        i += 1
        await asyncio.sleep(max(0.0, args.every_s - (time.perf_counter() - started)))
    hostile_report = json.loads(await asyncio.wait_for(hostile.stdout.readline(), args.seconds + 30))
    await hostile.wait()
    server.stdin.close()
    server_report = json.loads(await asyncio.wait_for(server.stdout.readline(), 30))
    await server.wait()
    seconds = hostile_report["seconds"]
    return {
        "args": vars(args),
        "hostile_per_s": {k: v / seconds for k, v in hostile_report["opened"].items()},
        "hostile_total_per_s": sum(hostile_report["opened"].values()) / seconds,
        "hostile_failed_to_connect": hostile_report["failed"],
        "holders": {"attempts": i, "ok": len(latencies), "success_rate": len(latencies) / max(i, 1),
                    "latency_ms_median": 1e3 * statistics.median(latencies) if latencies else None,
                    "latency_ms_p95": 1e3 * _quantile(latencies, 0.95) if latencies else None,
                    "latency_ms_max": 1e3 * max(latencies) if latencies else None, "failures": failures},
        "server": server_report,
    }


def _quantile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stranger_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--seconds", str(args.seconds), "--idle", str(args.idle), "--keyless", str(args.keyless),
            "--garbage", str(args.garbage), "--addresses", str(args.addresses)]
    return [*argv, "--same-address"] if args.same_address else argv


def report(result: dict[str, Any]) -> None:
    a, h, s = result["args"], result["holders"], result["server"]
    where = "127.0.0.1 (the key holders' address)" if a["same_address"] else f"{a['addresses']} address(es)"
    print(f"stranger from {where}: {a['idle']} idle sockets held, {a['keyless']} keyless and "
          f"{a['garbage']} garbage workers, {a['seconds']:g} s")
    per_s = ", ".join(f"{k} {v:.0f}/s" for k, v in sorted(result["hostile_per_s"].items()))
    print(f"hostile connections: {result['hostile_total_per_s']:.0f}/s sustained ({per_s})")
    if h["ok"]:
        print(f"key holders: {h['ok']}/{h['attempts']} connected ({100 * h['success_rate']:.0f} %), latency "
              f"median {h['latency_ms_median']:.0f} ms, p95 {h['latency_ms_p95']:.0f} ms, "
              f"max {h['latency_ms_max']:.0f} ms (timeout {a['timeout_s']:g} s)")
    else:
        print(f"key holders: 0/{h['attempts']} connected")
    for reason, n in h["failures"].items():
        print(f"  failed x{n}: {reason}")
    refused = {k.removeprefix("refused_"): v for k, v in s["stats"].items() if k.startswith("refused_")}
    by_count = sorted(refused.items(), key=lambda kv: -kv[1])
    print("server refusals by cause: " + ", ".join(f"{k} {v}" for k, v in by_count))
    others = {k: v for k, v in s["stats"].items() if not k.startswith("refused_")}
    print(f"server: {others}; {s['log_lines']} log lines about {sum(refused.values())} refusals during the run "
          f"({s['log_lines_with_final_summary']} with the summaries at shutdown); CPU {s['cpu_s']:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="how long the stranger keeps at it")
    p.add_argument("--idle", type=int, default=40, help="idle sockets the stranger holds")
    p.add_argument("--keyless", type=int, default=4, help="concurrent workers sending keyless offers")
    p.add_argument("--garbage", type=int, default=2, help="concurrent workers sending non-CBOR frames")
    p.add_argument("--addresses", type=int, default=1, help="loopback addresses the stranger uses (127.0.0.2+)")
    p.add_argument("--same-address", action="store_true", help="the stranger uses 127.0.0.1 too")
    p.add_argument("--every-s", type=float, default=0.25, help="a key holder connects this often")
    p.add_argument("--timeout-s", type=float, default=1.0, help="connect timeout of a key holder")
    p.add_argument("--warmup-s", type=float, default=1.0, help="stranger alone before the first key holder")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--role", choices=["server", "stranger"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "server":
        asyncio.run(serve())
        return
    if args.role == "stranger":
        asyncio.run(stranger(args.port, args))
        return
    result = asyncio.run(run(args))
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
