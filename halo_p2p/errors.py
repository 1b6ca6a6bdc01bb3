"""The one exception tree of halo-p2p.

Every error names the problem and, where one exists, the fix, so that the CLI can print
``halo-peer: error: <problem> (<fix>)`` on one line without a traceback.

::

    HaloError
    ├── ConfigError            bad flags, profiles, plans
    ├── ModelError
    │   ├── ModelNotFound      unknown name or missing file
    │   ├── ModelFormatError   truncated or corrupt file
    │   └── UnsupportedModel   architecture or quantization type we do not implement
    ├── TokenizerError
    ├── ContextOverflow        prompt plus generation longer than the context
    ├── PullError              downloading or verifying a model failed
    ├── PlanError              a placement plan misses, repeats or misnames groups
    ├── DiscoveryError         a peer id used twice, a bad mDNS record, too few peers found
    ├── WireError              malformed or incompatible message
    │   ├── DecodeError        bytes that are not a valid frame
    │   └── VersionMismatch    a frame of a wire version we do not speak
    ├── TransportError         link closed or timed out
    │   ├── LinkClosed         sending on a closed link, or receiving once it is drained
    │   ├── AuthError          a signaling peer without the swarm key, or a replayed offer
    │   └── PeerLost           a worker vanished mid-session
    └── NetnsError             creating or tearing down an emulated LAN (network namespaces) failed
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "ContextOverflow",
    "DecodeError",
    "DiscoveryError",
    "HaloError",
    "LinkClosed",
    "ModelError",
    "ModelFormatError",
    "ModelNotFound",
    "NetnsError",
    "PeerLost",
    "PlanError",
    "PullError",
    "TokenizerError",
    "TransportError",
    "UnsupportedModel",
    "VersionMismatch",
    "WireError",
]


class HaloError(Exception):
    """Base of every halo-p2p error.

    Args:
        problem: what went wrong, naming the offending input.
        fix: what the user can do about it (optional).
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} ({self.fix})" if self.fix else self.problem


class ConfigError(HaloError):
    """A flag, profile or setting is invalid."""


class ModelError(HaloError):
    """A model cannot be used."""


class ModelNotFound(ModelError):
    """The model name is unknown or its file is missing."""


class ModelFormatError(ModelError):
    """The model file is truncated, corrupt or inconsistent."""


class UnsupportedModel(ModelError):
    """The file is valid but uses an architecture or tensor type we do not implement."""


class TokenizerError(HaloError):
    """The tokenizer cannot be built or cannot encode/decode the input."""


class ContextOverflow(HaloError):
    """The prompt (plus the tokens to generate) does not fit the model's context length."""


class PullError(HaloError):
    """Downloading, extracting or verifying a model failed."""


class PlanError(HaloError):
    """A placement plan is invalid (missing, repeated or unknown groups or peers)."""


class DiscoveryError(HaloError):
    """Finding peers failed: our peer id is used by another device, a peer's record is malformed,
    or fewer peers than needed were found in time."""


class WireError(HaloError):
    """A message is malformed, of an unknown kind, or of an incompatible version."""


class DecodeError(WireError):
    """Bytes are not a valid frame: not CBOR, truncated, unknown kind, wrong field count or types."""


class VersionMismatch(WireError):
    """A frame carries a wire version this peer does not speak.

    Args:
        problem: what went wrong.
        fix: what the user can do about it (optional).
        peer_version: the version found in the frame.
    """

    def __init__(self, problem: str, fix: str | None = None, *, peer_version: int | None = None) -> None:
        super().__init__(problem, fix)
        self.peer_version = peer_version


class TransportError(HaloError):
    """A link is closed or a network wait timed out."""


class PeerLost(TransportError):
    """A worker vanished during a session (its link closed); the coordinator re-plans.

    Attributes:
        peers: ids of the lost peers.
    """

    def __init__(self, peers: list[str]) -> None:
        super().__init__(f"lost peer(s) {', '.join(peers)} during the session",
                         "the coordinator re-plans without them")
        self.peers = peers


class LinkClosed(TransportError):
    """The link is closed: a send on it, or a receive once every delivered message was read."""


class NetnsError(HaloError):
    """An emulated LAN cannot be set up or torn down: a namespace, link, nft or shim command failed.

    The problem names the failing command and its stderr.
    """


class AuthError(TransportError):
    """Signaling failed authentication: a bad MAC, a replayed message, or a peer refused our key."""
