"""Peer discovery on the LAN with multicast DNS and DNS-SD (RFC 6762, RFC 6763), via python-zeroconf.

This is the only module that imports zeroconf. Each peer registers one service of type
:data:`~halo_p2p.discovery.txt.SERVICE_TYPE` named ``<instance_prefix><peer id>``: SRV for the
signaling port, A records for the advertised addresses, TXT for the rest of its
:class:`~halo_p2p.discovery.info.PeerInfo`. A browser watches the type; added or updated
services are resolved (bounded by ``resolve_timeout_s``) and fed to a
:class:`~halo_p2p.discovery.table.PeerTable`; goodbyes (TTL 0) and expired records remove them.

Timings measured on loopback (network-facts §4): registration takes ~1.2 s (probing and
announcing, RFC 6762 §8); a browser finds a service already registered in 0.05–0.11 s and one
registering concurrently ~1.2–1.5 s after it starts; resolving adds ≤ 3 ms.

Interfaces: by default zeroconf joins the multicast group on every interface. On a real LAN
device that is what you want (``allow_all_interfaces=True`` or ``--interface NAME``), but on a
development machine or CI runner it would multicast on the LAN, so ``interfaces=None`` is
refused unless this process runs in a network namespace made by ``ip netns`` or one that has only
loopback interfaces. Tests pin ``interfaces=["127.0.0.1"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import re
from collections.abc import Awaitable
from typing import Any, Final

import ifaddr
from zeroconf import InterfaceChoice, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from halo_p2p.discovery.info import PeerInfo
from halo_p2p.discovery.table import DUPLICATE_ID_FIX, PeerTable, TableView
from halo_p2p.discovery.txt import SERVICE_TYPE, decode_txt, encode_txt
from halo_p2p.errors import ConfigError, DiscoveryError

__all__ = ["MdnsDiscovery", "all_interfaces_stay_local", "interface_addresses"]

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 120
"""TTL of our records in seconds (RFC 6762 §10's host-record TTL; zeroconf's default for service
records is 75 minutes). A peer that shuts down cleanly is dropped at once (goodbye, TTL 0); one
that crashes lingers until its PTR record expires, and python-zeroconf raises received PTR TTLs
to at least 1125 s, so liveness must come from the link layer (heartbeats), not from here."""

_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9-]{0,14}")
_NETNS_DIRS: Final = ("/run/netns", "/var/run/netns")


def interface_addresses(name: str) -> list[str]:
    """IPv4 addresses of the network interface ``name`` (for ``--interface NAME``).

    Raises:
        ConfigError: no interface has that name, or it has no IPv4 address (names the
            available interfaces).
    """
    adapters = ifaddr.get_adapters()
    for adapter in adapters:
        if name in (adapter.name, adapter.nice_name):
            found = [str(ip.ip) for ip in adapter.ips if ip.is_IPv4]
            if not found:
                raise ConfigError(f"--interface {name!r} has no IPv4 address", "bring it up or pick another interface")
            return found
    names = ", ".join(sorted(str(a.nice_name) for a in adapters))
    raise ConfigError(f"--interface {name!r}: no such network interface", f"use one of: {names}")


def all_interfaces_stay_local() -> bool:
    """Whether multicasting on every interface stays on this machine.

    True inside a network namespace created by ``ip netns`` (listed in ``/run/netns``) or when every
    interface address is a loopback address. In the root namespace of a machine with a LAN
    interface it is False. (``/proc/1/ns/net`` would tell directly, but it is unreadable in containers.)
    """
    with contextlib.suppress(OSError):
        me = os.stat("/proc/self/ns/net")
        for folder in _NETNS_DIRS:
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder):
                    st = os.stat(entry.path)
                    if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                        return True
    ips = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips]
    return all(ipaddress.ip_address(ip if isinstance(ip, str) else ip[0]).is_loopback for ip in ips)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class MdnsDiscovery(TableView):
    """Discovery over mDNS/DNS-SD, implementing :class:`~halo_p2p.discovery.protocol.Discovery`.

    Args:
        interfaces: IP addresses of the interfaces to use (e.g. ``["127.0.0.1"]``, or the result
            of :func:`interface_addresses`); ``None`` = all interfaces (see ``allow_all_interfaces``).
        hostname_addresses: addresses advertised in our A/AAAA records; default: ``me.host`` if it
            is an IP address, else the ``interfaces`` addresses.
        allow_all_interfaces: allow ``interfaces=None`` where it would reach the LAN (production).
        instance_prefix: prepended to the peer id to name our service (0–14 characters
            ``[A-Za-z0-9-]``); services without the prefix are ignored, which isolates
            concurrent test runs on one machine.
        ttl_s: TTL of our records in seconds.
        resolve_timeout_s: longest wait for a service's records, in seconds.
        register_timeout_s: longest wait for probing and registration, in seconds.
        close_timeout_s: longest wait of each shutdown step (goodbyes, browser, sockets), in seconds.

    Raises:
        ConfigError: a bad interface or prefix, or ``interfaces=None`` where it would multicast on
            the LAN without ``allow_all_interfaces=True``.
    """

    def __init__(self, *, interfaces: list[str] | None = None, hostname_addresses: list[str] | None = None,
                 allow_all_interfaces: bool = False, instance_prefix: str = "", ttl_s: int = DEFAULT_TTL_S,
                 resolve_timeout_s: float = 3.0, register_timeout_s: float = 15.0,
                 close_timeout_s: float = 3.0) -> None:
        for addr in [*(interfaces or []), *(hostname_addresses or [])]:
            if not _is_ip(addr):
                raise ConfigError(f"mDNS interface address {addr!r} is not an IP address",
                                  "pass interface addresses such as 127.0.0.1, or use --interface NAME")
        if interfaces is not None and not interfaces:
            raise ConfigError("mDNS needs at least one interface address", "pass e.g. interfaces=['127.0.0.1']")
        if interfaces is None and not allow_all_interfaces and not all_interfaces_stay_local():
            raise ConfigError(
                "mDNS on all interfaces would multicast on this machine's LAN interfaces "
                "(this process runs in the root network namespace)",
                "pass an interface address (interfaces=['127.0.0.1'] in tests, --interface NAME) "
                "or allow_all_interfaces=True on a real LAN device")
        for label, value in (("ttl_s", ttl_s), ("resolve_timeout_s", resolve_timeout_s),
                             ("register_timeout_s", register_timeout_s), ("close_timeout_s", close_timeout_s)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e6:
                raise ConfigError(f"MdnsDiscovery {label} = {value!r} is invalid", "use a positive number of seconds")
        if not _PREFIX_RE.fullmatch(instance_prefix):
            raise ConfigError(f"instance_prefix {instance_prefix!r} is invalid", "use 0-14 characters A-Z a-z 0-9 -")
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.hostname_addresses = list(hostname_addresses) if hostname_addresses else None
        self.instance_prefix = instance_prefix
        self.ttl_s = int(ttl_s)
        self.resolve_timeout_s = resolve_timeout_s
        self.register_timeout_s = register_timeout_s
        self.close_timeout_s = close_timeout_s
        self._table = PeerTable("mdns")
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._me: PeerInfo | None = None
        self._advertised: list[str] = []
        self._registered = False
        self._closed = False
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._broadcasts: list[Awaitable[Any]] = []


    @property
    def service_name(self) -> str | None:
        """Our full service name, e.g. ``t1a2b-peer1._halo._tcp.local.`` (``None`` before start)."""
        return self._info.name if self._info is not None else None

    def _service_info(self, me: PeerInfo) -> AsyncServiceInfo:
        instance = f"{self.instance_prefix}{me.peer_id}"
        host_label = re.sub(r"[^A-Za-z0-9-]", "-", f"halo-{instance}")
        return AsyncServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", port=me.signaling_port,
                                properties=encode_txt(me), server=f"{host_label}.local.",
                                parsed_addresses=self._advertised, host_ttl=self.ttl_s, other_ttl=self.ttl_s)

    async def start(self, me: PeerInfo) -> None:
        """Browse for peers, then register ``me`` (probing for name conflicts, ~1.2 s).

        Raises:
            DiscoveryError: another device already uses ``me.peer_id`` (its service name is
                taken, or its record carries our id), or registration timed out. Everything
                started is closed before raising.
            ConfigError: no address to advertise (``me.host`` is a host name and no interface
                or hostname addresses were given).
        """
        if self._zc is not None or self._closed:
            raise DiscoveryError("mdns: discovery already started or closed", "create a new MdnsDiscovery")
        if self.hostname_addresses:
            self._advertised = self.hostname_addresses
        elif _is_ip(me.host):
            self._advertised = [me.host]
        elif self.interfaces:
            self._advertised = self.interfaces
        else:
            raise ConfigError(f"cannot tell which address to advertise for host {me.host!r}",
                              "use an IP address as the host, or pass hostname_addresses or --interface")
        self._me = self._table.me = me
        self._table.label = me.peer_id
        self._info = self._service_info(me)
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces if self.interfaces is not None
                                     else InterfaceChoice.All)
        except OSError as exc:
            self._closed = True
            raise DiscoveryError(f"cannot open mDNS sockets on {self.interfaces or 'all interfaces'}: {exc}",
                                 "pass the address of an interface that is up (--interface NAME)") from exc
        try:
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
            async with asyncio.timeout(self.register_timeout_s):
                try:
                    self._broadcasts.append(await self._zc.async_register_service(self._info))
                except NonUniqueNameException:
                    holder = await self._holder_of(self._info.name)
                    raise DiscoveryError(f"peer id {me.peer_id} is already used by {holder}",
                                         DUPLICATE_ID_FIX) from None
            self._registered = True
            if self._table.startup_conflict is not None:
                raise self._table.startup_conflict
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, TimeoutError):
                raise DiscoveryError(f"mDNS registration of {me.peer_id} did not finish in "
                                     f"{self.register_timeout_s:g} s",
                                     "check that the interface is up and allows multicast") from None
            raise
        self._table.started = True
        log.info("%s: announced as %s on %s", me.peer_id, self._info.name, self.interfaces or "all interfaces")

    async def _holder_of(self, name: str) -> str:
        """``host:port`` of the service that holds ``name``, or a vague description if it does not answer."""
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        with contextlib.suppress(Exception):
            if await info.async_request(self._zc.zeroconf, 1000) and info.port:
                hosts = info.parsed_scoped_addresses()
                if hosts:
                    return f"[{hosts[0]}]:{info.port}" if ":" in hosts[0] else f"{hosts[0]}:{info.port}"
        return "another device on the network"

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """Browser callback (runs in the event loop): resolve added or updated services, drop removed ones."""
        if self._closed or not name.removesuffix(f".{service_type}").startswith(self.instance_prefix):
            return
        key = name.lower()
        log.debug("%s: %s %s", self._table.label, name, state_change.name)
        if state_change is ServiceStateChange.Removed:
            task = self._resolving.pop(key, None)
            if task is not None:
                task.cancel()
            self._again.discard(key)
            self._table.withdraw(key)
        elif key in self._resolving:
            self._again.add(key)
        else:
            task = asyncio.get_running_loop().create_task(self._resolve(name, key), name=f"mdns-resolve-{name}")
            self._resolving[key] = task
            task.add_done_callback(functools.partial(self._resolved, key))

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            self._resolving.pop(key, None)

    async def _resolve(self, name: str, key: str) -> None:
        """Fetch the records of ``name`` and offer the decoded peer; again if it changed meanwhile."""
        assert self._zc is not None and self._me is not None
        while True:
            self._again.discard(key)
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            try:
                ok = await info.async_request(self._zc.zeroconf, int(self.resolve_timeout_s * 1000))
            except Exception as exc:   # e.g. zeroconf shut down under us; a later change retries
                log.debug("%s: resolving %s failed: %r", self._me.peer_id, name, exc)
                ok = False
            hosts = info.parsed_scoped_addresses() if ok else []
            if not hosts or not info.port:
                self._table.stats.resolve_failures += 1
                log.debug("%s: could not resolve %s within %g s", self._me.peer_id, name, self.resolve_timeout_s)
            else:
                host = next((h for h in hosts if "." in h), hosts[0])   # prefer IPv4
                try:
                    peer = decode_txt(info.properties, host, info.port)
                except DiscoveryError as exc:
                    self._table.malformed(key, exc)
                else:
                    own = key == self._info_key() and info.port == self._me.signaling_port \
                        and host in self._advertised
                    self._table.offer(key, peer, own=own)
            if key not in self._again:
                return

    def _info_key(self) -> str:
        return self._info.name.lower() if self._info is not None else ""

    async def update(self, me: PeerInfo) -> None:
        """Announce changed fields of ``me`` (same peer id); peers get ``"updated"``.

        Raises:
            ConfigError: ``me.peer_id`` differs from the registered one.
            DiscoveryError: not started, or closed.
        """
        if self._zc is None or self._me is None or self._closed:
            raise DiscoveryError("mdns: update() before start() or after aclose()", "call start() first")
        if me.peer_id != self._me.peer_id:
            raise ConfigError(f"update() changes the peer id from {self._me.peer_id} to {me.peer_id}",
                              "close this discovery and start a new one")
        if not self.hostname_addresses and _is_ip(me.host):
            self._advertised = [me.host]
        self._me = self._table.me = me
        self._info = self._service_info(me)
        self._broadcasts = [b for b in self._broadcasts if not (isinstance(b, asyncio.Future) and b.done())]
        self._broadcasts.append(await self._zc.async_update_service(self._info))

    async def _bounded(self, what: str, awaitable: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await awaitable
        except Exception as exc:   # shutdown goes on: each step is best effort
            log.warning("mdns: %s failed: %s", what, exc or type(exc).__name__)

    async def aclose(self) -> None:
        """Send goodbyes first (peers drop us at once), stop browsing and resolving, close the sockets.

        Pending announcements are cancelled before the goodbyes: one sent after them would make
        the others add us again until the TTL expires. Idempotent; each step waits at most
        ``close_timeout_s`` seconds.
        """
        if self._closed:
            return
        self._closed = True
        zc = self._zc
        broadcasts = [b for b in self._broadcasts if isinstance(b, asyncio.Future)]
        self._broadcasts.clear()
        for future in broadcasts:
            future.cancel()
        await asyncio.gather(*broadcasts, return_exceptions=True)
        if zc is not None and self._registered and self._info is not None:
            async def unregister() -> None:
                # mypy: zeroconf's stub types the awaitable it returns too narrowly
                await (await zc.async_unregister_service(self._info))  # type: ignore[arg-type]
            await self._bounded("sending goodbyes", unregister())
        if self._browser is not None:
            await self._bounded("stopping the browser", self._browser.async_cancel())
        resolving = list(self._resolving.values())
        self._resolving.clear()
        for task in resolving:
            task.cancel()
        await asyncio.gather(*resolving, return_exceptions=True)
        if zc is not None:
            await self._bounded("closing zeroconf", zc.async_close())
        self._table.close()
