"""An emulated layer-2 LAN of N devices in network namespaces, with per-device loss and delay.

Topology (``P`` is the prefix)::

    P-p0: lan0 10.77.0.10 ──veth──────────────── p0 ┐
    P-p1: lan0 10.77.0.11 ──veth (+nft loss)──── p1 ├─ br0 in P-hub (a switch: no address)
    P-p2: lan0 10.77.0.12 ──TAP═shim═TAP──────── p2 ┘

Device ``i`` lives in namespace ``P-p<i>`` with ``lo`` up and ``lan0`` at ``10.77.0.<i+10>/24``
(multicast on, plus a ``224.0.0.0/4`` route so that multicast sends and IGMP joins without an
explicit interface work, as mDNS needs). Its link to the bridge is chosen per device
(:class:`DeviceLink`): a userspace shim (:mod:`halo_p2p.testbed.shim`) when it has delay or jitter,
since the kernel has no netem; otherwise a veth, with nftables on the hub bridge dropping a
``plr`` fraction of the UDP coming from the device's port and of the UDP going to it (loss per
direction, silent for the sender). ICMP, ARP, IGMP and TCP are never dropped. The bridge floods
multicast (snooping off, STP off).

Everything created is removed by :meth:`NetnsLan.aclose` (also on errors), and
:func:`cleanup_stale` removes the leftovers of a crashed run. Every command has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halo_p2p.errors import ConfigError, NetnsError
from halo_p2p.net.link import LinkConditions
from halo_p2p.testbed.shim import (
    NFT_TABLE,
    DirectionCounters,
    ShimSpec,
    TapEnd,
    nft_hub_ruleset,
    parse_nft_counters,
)

__all__ = ["IFACE", "SUBNET", "DeviceLink", "LinkCounters", "NetnsLan", "available", "cleanup_stale"]

log = logging.getLogger(__name__)

SUBNET = "10.77.0"
"""Devices get ``SUBNET.<i+10>/24``."""
IFACE = "lan0"
"""Name of every device's LAN interface."""
_BRIDGE = "br0"
_CMD_TIMEOUT_S = 10.0
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_MODES = ("auto", "veth", "shim")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True, slots=True)
class DeviceLink:
    """The link of one emulated device to the LAN (each direction impaired alike).

    Attributes:
        plr: UDP packet-loss rate per direction, in ``[0, 1]``.
        delay_s: one-way delay in seconds, ``>= 0``.
        jitter_s: extra one-way delay from ``U(0, jitter_s)`` per frame, in seconds (reorders).
        seed: seed of the shim's loss and jitter draws (nft loss is not seeded).
        mode: ``"auto"`` (shim if delay or jitter, else veth with nft loss if ``plr > 0``; the
            shim also when nft is missing), ``"veth"`` or ``"shim"`` (forced, e.g. to measure it).

    Raises:
        ConfigError: a value out of range or an unknown mode.
    """

    plr: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    seed: int = 0
    mode: str = "auto"

    def __post_init__(self) -> None:
        LinkConditions(plr=self.plr, delay_s=self.delay_s, jitter_s=self.jitter_s)
        if self.mode not in _MODES:
            raise ConfigError(f"DeviceLink.mode = {self.mode!r} is unknown", f"use one of {', '.join(_MODES)}")
        if self.mode == "veth" and (self.delay_s or self.jitter_s):
            raise ConfigError("a veth link cannot delay (the kernel has no netem)", 'use mode "auto" or "shim"')

    @classmethod
    def from_conditions(cls, conditions: LinkConditions, seed: int = 0, mode: str = "auto") -> DeviceLink:
        """The link for ``conditions`` (for instance a ``PeerProfile``'s ``link``)."""
        return cls(conditions.plr, conditions.delay_s, conditions.jitter_s, seed, mode)

    def kind(self, nft: bool) -> str:
        """``"shim"``, ``"veth+nft"`` or ``"veth"``, given whether nft is installed."""
        if self.mode == "shim" or self.delay_s > 0 or self.jitter_s > 0:
            return "shim"
        if self.plr > 0:
            if nft:
                return "veth+nft"
            if self.mode == "veth":
                raise NetnsError("a veth link with loss needs nft, which is not installed",
                                 'apt-get install nftables, or use mode "shim"')
            return "shim"
        return "veth"


@dataclass(frozen=True, slots=True)
class LinkCounters:
    """Counters of one device's link: ``up`` = device to LAN, ``down`` = LAN to device (``None`` for a veth)."""

    kind: str
    up: DirectionCounters | None
    down: DirectionCounters | None


def _fail(argv: Sequence[str], detail: str, fix: str | None = None) -> NetnsError:
    return NetnsError(f"`{' '.join(argv)}` failed: {' '.join(detail.split()) or 'no output'}",
                      fix or "run as root on Linux; cleanup_stale(prefix) removes leftovers of a crashed run")


def _run(argv: Sequence[str], *, stdin: str | None = None, timeout_s: float = _CMD_TIMEOUT_S,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (blocking) with a timeout.

    Raises:
        NetnsError: it timed out, cannot start, or (with ``check``) exited non-zero; names it and its stderr.
    """
    try:
        r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _fail(argv, str(e)) from None
    if check and r.returncode != 0:
        raise _fail(argv, f"exit {r.returncode}: {r.stderr or r.stdout}")
    return r


async def _arun(argv: Sequence[str], *, stdin: str | None = None, timeout_s: float = _CMD_TIMEOUT_S) -> str:
    """:func:`_run` in a thread (so the loop keeps running); returns stdout."""
    return (await asyncio.to_thread(_run, argv, stdin=stdin, timeout_s=timeout_s)).stdout


def available() -> tuple[bool, str]:
    """Whether emulated LANs can be created here: Linux, root, iproute2, ``/dev/net/tun``, a namespace probe.

    Returns:
        ``(True, "ok")`` or ``(False, reason with the fix)``.
    """
    if not sys.platform.startswith("linux"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces need root (run as root, e.g. in CI or a container with CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return False, "the `ip` command is missing (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing (the TUN/TAP driver; in a container, pass --device /dev/net/tun)"
    probe = f"haloprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "del", probe])
    except NetnsError as e:
        return False, f"cannot create a network namespace: {e.problem}"
    return True, "ok"


def _kill_pids(pids: Sequence[int], grace_s: float = 2.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still running (or not yet reaped) after ``grace_s`` seconds."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ConfigError(f"emulated LAN prefix {prefix!r} is invalid",
                          "use 1-8 lowercase letters or digits, starting with a letter (interface names are short)")


def cleanup_stale(prefix: str) -> list[str]:
    """Remove what a crashed run with ``prefix`` left: shims, processes in its namespaces, namespaces, TAPs.

    Returns:
        What was removed (``"shim pid N"``, ``"netns NAME"``, ``"link NAME"``).

    Raises:
        ConfigError: invalid prefix.
        NetnsError: a command failed.
    """
    _check_prefix(prefix)
    removed: list[str] = []
    shims = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"halo_p2p.testbed.shim" in args and any(a == b"--prefix" and b == prefix.encode()
                                                 for a, b in itertools.pairwise(args)):
            shims.append(int(cmdline.parent.name))
    _kill_pids(shims)
    removed += [f"shim pid {p}" for p in shims]
    ns_re = re.compile(rf"^{prefix}-(hub|p\d+)$")
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split(" ", 1)[0]
        if ns_re.match(name):
            pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split()]
            _kill_pids(pids)
            _run(["ip", "netns", "del", name])
            removed.append(f"netns {name}")
    tap_re = re.compile(rf"^{prefix}t\d+[dh]$")
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0] if line.count(":") >= 2 else ""
        if tap_re.match(name):
            _run(["ip", "link", "del", name], check=False)
            removed.append(f"link {name}")
    if removed:
        log.info("cleaned up stale emulated LAN %s: %s", prefix, ", ".join(removed))
    return removed


class _Shim:
    """A running shim process, its command pipe and its stderr."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []
        self.lock = asyncio.Lock()
        self.reader = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def stats(self, timeout_s: float) -> dict[str, Any]:
        async with self.lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(b"stats\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        return json.loads(line)["stats"]

    async def stop(self, timeout_s: float) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        try:
            await asyncio.wait_for(self.reader, timeout_s)
        except TimeoutError:
            self.reader.cancel()


class NetnsLan:
    """An emulated LAN (async context manager); see the module docstring for the topology.

    Args:
        prefix: 1-8 lowercase letters or digits; namespaces are ``PREFIX-hub`` and ``PREFIX-p<i>``.
        devices: one :class:`DeviceLink` per device (at most 245).
        verify: ping device 0 from every other device on entry (needs ``ping``; skipped without it).
        timeout_s: bound of each wait on entry (a shim starting, the connectivity check), in seconds.
        replace_stale: remove leftovers with the same prefix first instead of failing.
    """

    def __init__(self, prefix: str, devices: Sequence[DeviceLink], *, verify: bool = True,
                 timeout_s: float = 20.0, replace_stale: bool = False) -> None:
        _check_prefix(prefix)
        if not 1 <= len(devices) <= 245:
            raise ConfigError(f"{len(devices)} devices requested", "use 1 to 245 devices")
        self.prefix = prefix
        self.devices = list(devices)
        self.hub_ns = f"{prefix}-hub"
        self.shim_summaries: dict[int, str] = {}
        """The shims' final stderr summary lines (JSON) by device, filled by :meth:`aclose`."""
        self._verify, self._timeout_s, self._replace = verify, timeout_s, replace_stale
        self._kinds: list[str] = []
        self._created: list[str] = []
        self._shims: dict[int, _Shim] = {}
        self._procs: list[asyncio.subprocess.Process] = []

    def ns(self, i: int) -> str:
        """Namespace of device ``i``."""
        self._index(i)
        return f"{self.prefix}-p{i}"

    def address(self, i: int) -> str:
        """IPv4 address of device ``i`` (without the ``/24``)."""
        self._index(i)
        return f"{SUBNET}.{i + 10}"

    def kind(self, i: int) -> str:
        """How device ``i`` is linked: ``"veth"``, ``"veth+nft"`` or ``"shim"`` (known once entered)."""
        return self._kinds[self._index(i)]

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in device ``i``'s namespace (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    async def spawn(self, i: int, argv: Sequence[str], **kw: Any) -> asyncio.subprocess.Process:
        """Start ``argv`` in device ``i``'s namespace; the environment passes through.

        The process is terminated by :meth:`aclose` if still running. ``kw`` goes to
        :func:`asyncio.create_subprocess_exec` (``stdout=``, ``env=``, ...).

        Raises:
            NetnsError: the command cannot be started.
        """
        argv = self.exec_argv(i, argv)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, **kw)
        except OSError as e:
            raise _fail(argv, str(e)) from None
        self._procs.append(proc)
        return proc

    async def counters(self) -> dict[int, LinkCounters]:
        """Live loss counters per device: the shim's (all frames) or nft's (UDP only); ``None`` for veth.

        Raises:
            NetnsError: a shim did not answer or ``nft`` failed.
        """
        hub: dict[str, dict[str, DirectionCounters]] = {}
        if "veth+nft" in self._kinds:
            hub = parse_nft_counters(await _arun(["ip", "netns", "exec", self.hub_ns, "nft", "-j", "list", "table",
                                                  "bridge", NFT_TABLE]))
        out: dict[int, LinkCounters] = {}
        for i, kind in enumerate(self._kinds):
            if kind == "shim":
                try:
                    s = await self._shims[i].stats(self._timeout_s)
                except (TimeoutError, OSError, ValueError, KeyError) as e:
                    raise NetnsError(f"the shim of device {i} did not report its counters: {e!r}") from None
                out[i] = LinkCounters(kind, DirectionCounters(**s["up"]), DirectionCounters(**s["down"]))
            elif kind == "veth+nft":
                port = hub.get(f"p{i}", {})
                out[i] = LinkCounters(kind, port.get("up"), port.get("down"))
            else:
                out[i] = LinkCounters(kind, None, None)
        return out

    async def __aenter__(self) -> NetnsLan:
        ok, reason = available()
        if not ok:
            raise NetnsError(f"cannot emulate a LAN here: {reason}")
        stale = [n for n in (await _arun(["ip", "netns", "list"])).split()
                 if n == self.hub_ns or re.fullmatch(rf"{self.prefix}-p\d+", n)]
        if stale and not self._replace:
            raise NetnsError(f"namespaces of prefix {self.prefix!r} already exist: {', '.join(stale)}",
                             f"use another prefix, or call cleanup_stale({self.prefix!r}) if no run uses it")
        if stale:
            await asyncio.to_thread(cleanup_stale, self.prefix)
        nft = shutil.which("nft") is not None
        self._kinds = [d.kind(nft) for d in self.devices]
        try:
            await self._create()
        except BaseException:
            await self.aclose()
            raise
        log.info("emulated LAN %s up: %s", self.prefix, ", ".join(f"{i}={k}" for i, k in enumerate(self._kinds)))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            await self.aclose()
        except NetnsError:
            if exc_type is None:
                raise
            log.exception("cleanup of emulated LAN %s failed while handling an error", self.prefix)

    async def _ns_add(self, name: str) -> None:
        await _arun(["ip", "netns", "add", name])
        self._created.append(name)
        await _arun(["ip", "-n", name, "link", "set", "lo", "up"])

    async def _create(self) -> None:
        hub = self.hub_ns
        await self._ns_add(hub)
        await _arun(["ip", "-n", hub, "link", "add", _BRIDGE, "type", "bridge", "stp_state", "0",
                     "forward_delay", "0", "mcast_snooping", "0"])
        await _arun(["ip", "-n", hub, "link", "set", _BRIDGE, "up"])
        lossy: dict[str, float] = {}
        for i, (dev, kind) in enumerate(zip(self.devices, self._kinds, strict=True)):
            ns, port = self.ns(i), f"p{i}"
            await self._ns_add(ns)
            if kind == "shim":
                await self._start_shim(i, dev)
            else:
                await _arun(["ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", IFACE,
                             "netns", ns])
            if kind == "veth+nft":
                lossy[port] = dev.plr
            await _arun(["ip", "-n", hub, "link", "set", port, "master", _BRIDGE, "up"])
            await _arun(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", IFACE])
            await _arun(["ip", "-n", ns, "link", "set", IFACE, "multicast", "on", "up"])
            await _arun(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", IFACE])
        if lossy:
            await _arun(["ip", "netns", "exec", hub, "nft", "-f", "-"], stdin=nft_hub_ruleset(lossy))
        if self._verify:
            await self._check_connectivity()

    async def _start_shim(self, i: int, dev: DeviceLink) -> None:
        spec = ShimSpec(prefix=self.prefix, plr=dev.plr, delay_s=dev.delay_s, jitter_s=dev.jitter_s, seed=dev.seed,
                        device=TapEnd(tap=f"{self.prefix}t{i}d", netns=self.ns(i), name=IFACE),
                        hub=TapEnd(tap=f"{self.prefix}t{i}h", netns=self.hub_ns, name=f"p{i}"))
        argv = [sys.executable, "-m", "halo_p2p.testbed.shim", "--spec", spec.to_json(), "--prefix", self.prefix]
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": _PKG_ROOT + (os.pathsep + path if path else "")}
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, env=env)
        shim = self._shims[i] = _Shim(proc)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self._timeout_s)
        except TimeoutError:
            line = b""
        if b'"ready"' not in line:
            await shim.stop(2.0)
            raise _fail(argv[:3], f"the shim of device {i} did not start: {' | '.join(shim.stderr)}")

    async def _check_connectivity(self) -> None:
        if shutil.which("ping") is None:
            log.warning("ping is not installed (apt-get install iputils-ping): connectivity of %s not checked",
                        self.prefix)
            return
        wait = max(1, math.ceil(4 * (max(d.delay_s + d.jitter_s for d in self.devices)) + 1))

        async def probe(i: int) -> None:
            argv = self.exec_argv(i, ["ping", "-n", "-q", "-c", "1", "-W", str(wait), self.address(0)])
            deadline = time.monotonic() + self._timeout_s
            while True:
                try:
                    await _arun(argv, timeout_s=wait + 5)
                    return
                except NetnsError as e:
                    if time.monotonic() > deadline:
                        raise NetnsError(f"device {i} ({self.ns(i)}) cannot reach device 0 at {self.address(0)}: "
                                         f"{e.problem}", "check the shim's stderr (log level DEBUG)") from None
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(probe(i) for i in range(1, len(self.devices))))

    async def aclose(self) -> None:
        """Terminate spawned processes and shims, delete the namespaces and any leftover TAPs; idempotent.

        Raises:
            NetnsError: something could not be removed (after trying everything else).
        """
        errors: list[str] = []
        procs, self._procs = [p for p in self._procs if p.returncode is None], []
        await asyncio.to_thread(_kill_pids, [p.pid for p in procs])
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 2.0)
            except TimeoutError:
                errors.append(f"process {p.pid} did not exit")
        shims, self._shims = self._shims, {}
        for i, shim in shims.items():
            await shim.stop(3.0)
            if shim.stderr:
                self.shim_summaries[i] = shim.stderr[-1]
                log.debug("shim of device %d: %s", i, shim.stderr[-1])
        created, self._created = self._created, []
        for name in reversed(created):
            try:
                pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split()]
                await asyncio.to_thread(_kill_pids, pids)
                _run(["ip", "netns", "del", name])
            except NetnsError as e:
                errors.append(str(e))
        try:
            if created:
                await asyncio.to_thread(cleanup_stale, self.prefix)
        except NetnsError as e:
            errors.append(str(e))
        if errors:
            raise NetnsError(f"cleaning up emulated LAN {self.prefix!r} failed: {'; '.join(errors)}",
                             f"call cleanup_stale({self.prefix!r})")

    def _index(self, i: int) -> int:
        if not isinstance(i, int) or not 0 <= i < len(self.devices):
            raise ConfigError(f"device index {i!r} is out of range", f"use 0 to {len(self.devices) - 1}")
        return i
