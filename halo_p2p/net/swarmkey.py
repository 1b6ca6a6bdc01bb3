"""The swarm key: one shared secret that admits a device to the swarm.

Every device of a swarm holds the same 32-byte key. Signaling messages carry an HMAC-SHA256 of
their bytes under it (RFC 2104, FIPS 180-4), so only key holders can set up a link; see
:mod:`halo_p2p.net.signaling` for the security argument.

* Text form: 43 characters of URL-safe base64 without padding (RFC 4648 §5), as made by
  :func:`generate_swarm_key`. 64 hex digits are accepted too.
* Where it comes from, first match wins: ``--swarm-key`` (``explicit``), the ``HALO_SWARM_KEY``
  environment variable, then the key file (default ``~/.config/halo-p2p/swarm.key``), which
  must not be readable by group or others (mode 0600).
* Replays: :class:`ReplayGuard` accepts each (nonce, timestamp) once within a window of
  ``±window_s`` seconds, so clocks of the devices must agree to within that window (NTP).

The key is never logged and never part of an error message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from halo_p2p.errors import ConfigError

__all__ = [
    "DEFAULT_KEY_PATH",
    "ENV_VAR",
    "KEY_BYTES",
    "ReplayGuard",
    "find_swarm_key",
    "generate_swarm_key",
    "load_swarm_key",
    "parse_swarm_key",
    "save_swarm_key",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

KEY_BYTES: Final = 32
"""Length of the raw swarm key in bytes (256 bits, the HMAC-SHA256 block's recommended minimum)."""

ENV_VAR: Final = "HALO_SWARM_KEY"
"""Environment variable that holds the key in text form."""

DEFAULT_KEY_PATH: Final = Path("~/.config/halo-p2p/swarm.key")
"""Default key file (expand with :meth:`Path.expanduser`)."""

_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]{43}=?")
_MISSING_FIX: Final = ("run: halo-peer init (then copy ~/.config/halo-p2p/swarm.key to every device), "
                       "or pass --swarm-key")


def generate_swarm_key() -> str:
    """A fresh random swarm key in text form.

    Returns:
        43 characters of URL-safe base64 (no padding) encoding 32 bytes from :mod:`secrets`.
    """
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode("ascii")


def parse_swarm_key(text: str, *, source: str) -> bytes:
    """The raw 32-byte key of a key in text form.

    Args:
        text: 43 (or 44 with ``=``) URL-safe base64 characters, or 64 hex digits; surrounding
            whitespace is ignored.
        source: where the text came from, for the error message (e.g. ``"--swarm-key"``).

    Returns:
        The 32 key bytes.

    Raises:
        ConfigError: the text is neither form (the message names ``source``, never the text).
    """
    text = text.strip()
    raw: bytes | None = None
    try:
        if len(text) == 2 * KEY_BYTES:
            raw = bytes.fromhex(text)
        elif _BASE64URL.fullmatch(text):
            raw = base64.urlsafe_b64decode(text.rstrip("=") + "=")
    except (ValueError, binascii.Error):
        raw = None
    if raw is None or len(raw) != KEY_BYTES:
        raise ConfigError(f"malformed swarm key in {source} ({len(text)} characters)",
                          "expect 43 URL-safe base64 characters as written by halo-peer init, or 64 hex digits")
    return raw


def load_swarm_key(*, explicit: str | None, env: Mapping[str, str], path: Path) -> bytes:
    """Find the swarm key: ``explicit``, then ``env["HALO_SWARM_KEY"]``, then the file ``path``.

    Args:
        explicit: the ``--swarm-key`` value, or None if not given.
        env: the environment (``os.environ``); an empty ``HALO_SWARM_KEY`` counts as unset.
        path: the key file (normally ``DEFAULT_KEY_PATH.expanduser()``).

    Returns:
        The 32 key bytes.

    Raises:
        ConfigError: no key anywhere; the key is malformed; the file is readable by group or
            others (the fix is ``chmod 600 FILE``); the file is not a regular file (a FIFO, a
            device, a folder: refused without blocking); the file cannot be read.
    """
    key = find_swarm_key(explicit=explicit, env=env, path=path)
    if key is None:
        raise ConfigError("no swarm key", _MISSING_FIX)
    return key


def find_swarm_key(*, explicit: str | None, env: Mapping[str, str], path: Path) -> bytes | None:
    """As :func:`load_swarm_key`, but ``None`` when no key is configured at all (no flag, no
    variable, no file): the one case in which a prompt runs on this device alone.

    Raises:
        ConfigError: a key is there but unusable (malformed, readable by others, not a regular
            file, unreadable); a corrupt key is never taken for "no swarm".
    """
    if explicit is not None:
        return parse_swarm_key(explicit, source="--swarm-key")
    if env.get(ENV_VAR):
        return parse_swarm_key(env[ENV_VAR], source=f"${ENV_VAR}")
    try:
        # O_NONBLOCK: opening a FIFO without a writer would block forever; a regular file ignores it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read swarm key file {path}: {exc.strerror}",
                          f"check that {path} is a readable file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"swarm key file {path} is not a regular file", f"replace {path} with the key file")
    with os.fdopen(fd, "rb") as fh:
        if mode & 0o077:
            raise ConfigError(f"swarm key file {path} is readable by group or others "
                              f"(mode {stat.S_IMODE(mode):04o})", f"run: chmod 600 {path}")
        try:
            data = fh.read(4096)
        except OSError as exc:
            raise ConfigError(f"cannot read swarm key file {path}: {exc.strerror}",
                              f"check that {path} is a readable file") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = "?"
    return parse_swarm_key(text, source=str(path))


def save_swarm_key(key: str, path: Path, *, force: bool = False) -> None:
    """Write ``key`` to ``path`` atomically with mode 0600, creating parent folders (mode 0700).

    The key goes to a temporary file in the same folder, is flushed to disk, then linked into
    place (refusing an existing file) or, with ``force``, renamed over it. A reader never sees
    a partial file.

    Args:
        key: the key in text form (checked with :func:`parse_swarm_key`).
        path: the key file.
        force: replace an existing file.

    Raises:
        ConfigError: the key is malformed; the file exists and ``force`` is false; the folder
            cannot be written.
    """
    parse_swarm_key(key, source="the key to save")
    tmp: Path | None = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.strip().encode("ascii") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)   # a umask cannot widen it, but be explicit
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            except FileExistsError:
                raise ConfigError(f"swarm key file {path} already exists",
                                  "pass --force to replace it (then copy the new key to every device)") from None
            finally:
                os.unlink(tmp)
        tmp = None
    except OSError as exc:
        raise ConfigError(f"cannot write swarm key file {path}: {exc.strerror}",
                          f"check the permissions of {path.parent}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    log.info("wrote swarm key file %s (mode 0600)", path)


def sign(key: bytes, payload: bytes) -> str:
    """HMAC-SHA256 of ``payload`` under ``key`` (RFC 2104), as 64 lowercase hex digits."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(key: bytes, payload: bytes, mac: str) -> bool:
    """Whether ``mac`` is :func:`sign` ``(key, payload)``; constant-time (``hmac.compare_digest``).

    Args:
        key: the raw swarm key.
        payload: the signed bytes.
        mac: the claimed MAC, hex; anything else (wrong length, non-ASCII) is simply invalid.

    Returns:
        True if the MAC is valid.
    """
    expected = sign(key, payload)
    try:
        return hmac.compare_digest(expected, mac.lower() if mac.isascii() else "")
    except TypeError:
        return False


class ReplayGuard:
    """Accepts each ``(nonce, timestamp)`` once, and only within ``±window_s`` of the local clock.

    Memory is bounded: a nonce is forgotten once its timestamp is older than the window (after
    that the timestamp alone refuses it), and at most ``max_nonces`` are held; beyond that new
    nonces are refused (a flood can only come from key holders, since MACs are checked first).

    Args:
        window_s: accepted clock difference in seconds, both ways (default 30).
        max_nonces: most nonces remembered at once.
        clock: wall clock in seconds (``time.time``; injectable for tests).
    """

    def __init__(self, window_s: float = 30.0, *, max_nonces: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        if not window_s > 0 or max_nonces < 1:
            raise ConfigError(f"ReplayGuard(window_s={window_s!r}, max_nonces={max_nonces!r}) is invalid",
                              "use window_s > 0 and max_nonces >= 1")
        self.window_s = float(window_s)
        self.max_nonces = max_nonces
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._by_time: list[tuple[float, str]] = []   # min-heap of (timestamp, nonce)

    def __len__(self) -> int:
        """Number of nonces remembered."""
        return len(self._seen)

    def check(self, nonce: str, timestamp_s: float, *, now_s: float | None = None) -> str | None:
        """Accept ``nonce`` (sent at wall-clock ``timestamp_s``) or say why not.

        Args:
            nonce: the message's random nonce.
            timestamp_s: the sender's wall clock at sending, in seconds since the epoch.
            now_s: the local wall clock (default: the guard's clock).

        Returns:
            None if accepted (and remembered); otherwise the reason, one short sentence.
        """
        now = self._clock() if now_s is None else now_s
        self._forget(now)
        skew = timestamp_s - now
        if not -self.window_s <= skew <= self.window_s:
            side = "old" if skew < 0 else "in the future"
            return (f"timestamp is {abs(skew):.1f} s {side} (window ±{self.window_s:g} s; "
                    "check the clocks of both devices)")
        if nonce in self._seen:
            return "nonce was already used (replayed message)"
        if len(self._seen) >= self.max_nonces:
            return f"too many recent messages ({self.max_nonces} in {self.window_s:g} s)"
        self._seen[nonce] = timestamp_s
        heapq.heappush(self._by_time, (timestamp_s, nonce))
        return None

    def _forget(self, now_s: float) -> None:
        horizon = now_s - self.window_s
        while self._by_time and self._by_time[0][0] < horizon:
            _, nonce = heapq.heappop(self._by_time)
            self._seen.pop(nonce, None)
