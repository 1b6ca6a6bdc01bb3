"""Placement plans: which peer computes which neuron group (pure, serializable).

A plan maps every :class:`~halo_p2p.groups.GroupId` of a :class:`~halo_p2p.groups.GroupLayout`
to exactly one peer. The coordinator always keeps the embeddings, the norms and the classifier
and may hold groups too; shares may be uneven and any number of peers is allowed.
:class:`PlanBody` is what the coordinator sends a worker (the ``plan`` of the wire ``Plan``
message): the placement, the model's config and the session's context length.
"""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from halo_p2p.errors import ConfigError, HaloError, PlanError
from halo_p2p.groups import PARTS, GroupId, GroupLayout
from halo_p2p.model.config import ModelConfig

__all__ = ["PLAN_BODY_VERSION", "PLAN_VERSION", "PlacementPlan", "PlanBody", "proportional_counts"]

PLAN_VERSION = 1
"""Version of :meth:`PlacementPlan.to_dict`'s map (its ``version`` key)."""
PLAN_BODY_VERSION = 1
"""Version of :meth:`PlanBody.to_dict`'s map (its ``version`` key); see ``docs/wire-protocol.md`` §4."""


def proportional_counts(total: int, shares: Sequence[float], offset: int = 0,
                        carry: Sequence[float] | None = None) -> list[int]:
    """Split ``total`` items by ``shares`` with the largest-remainder method.

    Args:
        total: items to split.
        shares: non-negative weights, one per peer.
        offset: rotates who wins ties, so that remainders spread over layers.
        carry: per-peer items owed from earlier splits (added to the exact quotas), so that
            repeated small splits (3 attention groups per layer) converge to the shares overall.
    """
    weight = sum(shares)
    if weight <= 0 or any(s < 0 for s in shares):
        raise PlanError(f"shares {list(shares)} must be non-negative with a positive sum",
                        "give every peer a share >= 0")
    exact = [max(0.0, total * s / weight + (carry[i] if carry else 0.0)) for i, s in enumerate(shares)]
    scale = total / sum(exact) if sum(exact) > 0 else 0.0
    exact = [e * scale for e in exact]
    counts = [int(e) for e in exact]
    n = len(shares)
    order = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), (i - offset) % n))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """A validated mapping group -> peer.

    Attributes:
        layout: how the model cuts into groups.
        coordinator: the peer serving the prompt (holds embeddings, norms, classifier).
        peers: every peer taking part, coordinator included, in a fixed order.
        owner: group -> peer id, covering every group of ``layout`` exactly once.

    Raises:
        PlanError: a group is missing, out of range, or owned by a peer not in ``peers``.
    """

    layout: GroupLayout
    coordinator: str
    peers: tuple[str, ...]
    owner: Mapping[GroupId, str] = field(repr=False)

    def __post_init__(self) -> None:
        if self.coordinator not in self.peers:
            raise PlanError(f"coordinator {self.coordinator!r} is not among the plan's peers",
                            "list the coordinator in peers")
        if len(set(self.peers)) != len(self.peers):
            raise PlanError(f"peer listed twice in {list(self.peers)}", "list each peer once")
        for group, peer in self.owner.items():
            if not self.layout.contains(group):
                raise PlanError(f"group {group} does not exist in this model's layout",
                                "rebuild the plan for this model")
            if peer not in self.peers:
                raise PlanError(f"group {group} is assigned to unknown peer {peer!r}",
                                "assign groups only to peers listed in the plan")
        missing = [g for g in self.layout.all_groups() if g not in self.owner]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise PlanError(f"plan misses group(s) {', '.join(map(str, missing[:3]))}{more}",
                            "assign every group of every layer to a peer")

    @classmethod
    def split(cls, layout: GroupLayout, peers: Sequence[str], *, coordinator: str | None = None,
              shares: Sequence[float] | None = None) -> PlacementPlan:
        """Contiguous blocks of groups per layer and part, sized by ``shares`` (equal by default)."""
        shares = list(shares) if shares is not None else [1.0] * len(peers)
        if len(shares) != len(peers):
            raise PlanError(f"{len(shares)} shares for {len(peers)} peers", "give one share per peer")
        owner: dict[GroupId, str] = {}
        weight = sum(shares) or 1.0
        carry = {part: [0.0] * len(peers) for part in PARTS}
        for layer in range(layout.n_layers):
            for part in PARTS:
                n = layout.n_groups(part)
                counts = proportional_counts(n, shares, offset=layer + part, carry=carry[part])
                carry[part] = [c + n * s / weight - k for c, s, k in zip(carry[part], shares, counts, strict=True)]
                index = 0
                for peer, count in zip(peers, counts, strict=True):
                    for _ in range(count):
                        owner[GroupId(layer, part, index)] = peer
                        index += 1
        return cls(layout, coordinator or peers[0], tuple(peers), owner)

    def groups_of(self, peer: str) -> list[GroupId]:
        """The groups ``peer`` computes, sorted."""
        return sorted(g for g, p in self.owner.items() if p == peer)

    def owners_at(self, layer: int, part: int) -> dict[int, str]:
        """group index -> peer at one sync point."""
        return {i: self.owner[GroupId(layer, part, i)] for i in range(self.layout.n_groups(part))}

    def share(self, peer: str) -> float:
        """Fraction of the groups' weight parameters held by ``peer``."""
        params: Counter[str] = Counter()
        for g, p in self.owner.items():
            params[p] += self.layout.group_params(g.part)
        return params[peer] / sum(params.values())

    def workers(self) -> list[str]:
        """Peers other than the coordinator that hold at least one group."""
        holders = set(self.owner.values())
        return [p for p in self.peers if p != self.coordinator and p in holders]

    def to_dict(self) -> dict[str, object]:
        """JSON/CBOR-ready form: per peer, its groups as ``[layer, part, index]`` triples."""
        return {
            "version": PLAN_VERSION, "coordinator": self.coordinator, "peers": list(self.peers),
            "mlp_group_size": self.layout.mlp_group_size,
            "assign": {p: [[g.layer, g.part, g.index] for g in self.groups_of(p)] for p in self.peers},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object], layout: GroupLayout) -> PlacementPlan:
        """Parse :meth:`to_dict` output for ``layout``.

        Raises:
            PlanError: wrong version or layout, malformed entries, or a group assigned twice
                (plus everything ``__post_init__`` checks).
        """
        try:
            if data["version"] != PLAN_VERSION:
                raise PlanError(f"plan version {data['version']} is not {PLAN_VERSION}",
                                "run the same halo-p2p version on every peer")
            if data["mlp_group_size"] != layout.mlp_group_size:
                raise PlanError(f"plan uses MLP groups of {data['mlp_group_size']} neurons, this "
                                f"model's layout {layout.mlp_group_size}", "rebuild the plan")
            owner: dict[GroupId, str] = {}
            assign = data["assign"]
            assert isinstance(assign, Mapping)
            for peer, triples in assign.items():
                for layer, part, index in _triples(triples):
                    group = GroupId(int(layer), int(part), int(index))
                    if group in owner:
                        raise PlanError(f"group {group} is assigned twice ({owner[group]!r} and {peer!r})",
                                        "assign each group to exactly one peer")
                    owner[group] = str(peer)
            peers = tuple(str(p) for p in _seq(data["peers"]))
            return cls(layout, str(data["coordinator"]), peers, owner)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise PlanError(f"malformed plan ({type(exc).__name__}: {exc})",
                            "send a plan made by PlacementPlan.to_dict") from None


_CONFIG_TYPES: dict[str, type] = typing.get_type_hints(ModelConfig)   # field -> int, float or bool
_BODY_KEYS = ("version", "max_seq_len", "config", "placement")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanBody:
    """What a worker needs to take part in a session: the ``plan`` field of the wire ``Plan``.

    Attributes:
        placement: which peer computes which group; its ``layout`` is the model's, cut into MLP
            groups of ``placement.layout.mlp_group_size`` neurons.
        config: the model's shape (a worker that does not hold the model file builds its shard
            from streamed weights with it).
        max_seq_len: KV-cache length of every peer (tokens, >= 1).
        version: :data:`PLAN_BODY_VERSION`.

    Raises:
        ConfigError: another version, ``max_seq_len`` < 1, or a placement whose layout is not the
            layout of ``config``.
    """

    placement: PlacementPlan
    config: ModelConfig
    max_seq_len: int
    version: int = PLAN_BODY_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_BODY_VERSION:
            raise ConfigError(f"plan body version {self.version!r:.40} is not {PLAN_BODY_VERSION}",
                              "run the same halo-p2p version on every peer")
        if type(self.max_seq_len) is not int or self.max_seq_len < 1:
            raise ConfigError(f"plan body field 'max_seq_len' must be an int >= 1, got {self.max_seq_len!r:.40}",
                              "give the session a context length of at least one token")
        if GroupLayout.from_config(self.config, self.placement.layout.mlp_group_size) != self.placement.layout:
            raise ConfigError("plan body field 'placement' is laid out for another model than field 'config'",
                              "build the placement from GroupLayout.from_config(config)")

    @property
    def layout(self) -> GroupLayout:
        """The model's group layout (the placement's)."""
        return self.placement.layout

    def to_dict(self) -> dict[str, Any]:
        """The JSON/CBOR-ready map sent on the wire: ``version``, ``max_seq_len``, ``config`` (every
        :class:`ModelConfig` field) and ``placement`` (:meth:`PlacementPlan.to_dict`)."""
        config = {name: kind(getattr(self.config, name)) for name, kind in _CONFIG_TYPES.items()}
        return {"version": self.version, "max_seq_len": self.max_seq_len, "config": config,
                "placement": self.placement.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanBody:
        """Parse and validate :meth:`to_dict` output.

        Raises:
            ConfigError: naming the field: another version, a missing or unknown key, a value of
                the wrong type or range, or a placement that does not fit the config.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"plan body must be a map, got {type(data).__name__}", "send PlanBody.to_dict()")
        if data.get("version") != PLAN_BODY_VERSION:   # before the keys: another version may have others
            raise ConfigError(f"plan body version {data.get('version')!r:.40} is not {PLAN_BODY_VERSION}",
                              "run the same halo-p2p version on every peer")
        _keys("plan body", data, _BODY_KEYS)
        placement = data["placement"]
        if not isinstance(placement, Mapping):
            raise ConfigError(f"plan body field 'placement' must be a map, got {type(placement).__name__}")
        size = placement.get("mlp_group_size")
        if type(size) is not int or size < 1:
            raise ConfigError(f"plan body field 'placement.mlp_group_size' must be an int >= 1, got {size!r:.40}")
        config = _config_from(data["config"])
        if config.hidden_dim % size:   # checked here: GroupLayout's error would search hidden_dim's divisors
            raise ConfigError(f"plan body field 'placement.mlp_group_size': MLP group size {size} does not divide "
                              f"hidden_dim {config.hidden_dim} of field 'config'",
                              "build the placement from GroupLayout.from_config(config)")
        try:
            layout = GroupLayout.from_config(config, size)
        except ConfigError as exc:
            raise ConfigError(f"plan body field 'placement.mlp_group_size': {exc.problem}", exc.fix) from None
        assign = placement.get("assign")
        listed = (sum(len(v) for v in assign.values() if isinstance(v, (list, tuple)))
                  if isinstance(assign, Mapping) else 0)
        n_groups = layout.n_layers * (layout.n_attn + layout.n_mlp)
        if listed != n_groups:      # checked first: a forged config must not make the layout enumerate 2**40 groups
            raise ConfigError(f"plan body field 'placement' assigns {listed} groups; the layout of field 'config' "
                              f"has {n_groups}", "assign every group of every layer to exactly one peer")
        try:
            plan = PlacementPlan.from_dict(placement, layout)
        except PlanError as exc:
            raise ConfigError(f"plan body field 'placement': {exc.problem}", exc.fix) from None
        return cls(placement=plan, config=config, max_seq_len=data["max_seq_len"])


def _keys(what: str, data: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise :class:`ConfigError` unless ``data`` has exactly ``keys``."""
    want = set(keys)
    missing, unknown = sorted(want - set(data)), sorted(map(str, set(data) - want))
    if missing or unknown:
        raise ConfigError(f"{what} " + "; ".join(
            ([f"misses field(s) {', '.join(map(repr, missing))}"] if missing else [])
            + ([f"has unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}"] if unknown else [])),
            "run the same halo-p2p version on every peer")


def _config_from(data: object) -> ModelConfig:
    """A :class:`ModelConfig` from its map, each field checked against its type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"plan body field 'config' must be a map, got {type(data).__name__}")
    _keys("plan body field 'config'", data, _CONFIG_TYPES)
    values: dict[str, Any] = {}
    for name, kind in _CONFIG_TYPES.items():
        v = data[name]
        ok = type(v) is kind or (kind is float and type(v) is int)
        if not ok:
            raise ConfigError(f"plan body field 'config.{name}' must be {kind.__name__}, got {type(v).__name__}")
        values[name] = kind(v)
    try:
        return ModelConfig(**values)
    except HaloError as exc:
        raise ConfigError(f"plan body field 'config' is invalid: {exc.problem}", exc.fix) from None


def _seq(value: object) -> Sequence[object]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _triples(value: object) -> Iterable[Sequence[Any]]:
    for item in _seq(value):
        if len(_seq(item)) != 3:
            raise ValueError(f"group entry {item!r} is not [layer, part, index]")
        yield item  # type: ignore[misc]  # _seq(item) has length 3, checked above
