"""Placement plans: which peer computes which neuron group (pure, serializable).

A plan maps every :class:`~halo_p2p.groups.GroupId` of a :class:`~halo_p2p.groups.GroupLayout`
to exactly one peer. The coordinator always keeps the embeddings, the norms and the classifier
and may hold groups too; shares may be uneven and any number of peers is allowed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from halo_p2p.errors import PlanError
from halo_p2p.groups import PARTS, GroupId, GroupLayout

__all__ = ["PLAN_VERSION", "PlacementPlan", "proportional_counts"]

PLAN_VERSION = 1


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
        params = Counter()
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


def _seq(value: object) -> Sequence[object]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _triples(value: object) -> Iterable[Sequence[object]]:
    for item in _seq(value):
        if len(_seq(item)) != 3:
            raise ValueError(f"group entry {item!r} is not [layer, part, index]")
        yield item  # type: ignore[misc]
