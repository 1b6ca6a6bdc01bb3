"""An Engine that survives lost workers: it re-plans over the peers left and replays the context.

When a worker's link closes, a ``strict`` coordinator raises
:class:`~halo_p2p.errors.PeerLost` at once; a ``halo`` coordinator counts the worker's groups as
missing from the next deadline on and finishes the token. Either way this engine then builds a
new coordinator (new session id, new plan without the lost peers), recomputes the KV caches of
the new plan by replaying the ids forwarded so far, and carries on, so no generation hangs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from halo_p2p.errors import PeerLost, TransportError
from halo_p2p.model.config import ModelConfig
from halo_p2p.session.coordinator import Coordinator

__all__ = ["CoordinatorFactory", "ReplanningEngine", "ReplanningFacade"]

log = logging.getLogger(__name__)

CoordinatorFactory = Callable[[frozenset[str], int], Awaitable[Coordinator]]
"""Builds and starts a coordinator for a session id without the given lost peers."""

_REPLAY_CHUNK = 256


class ReplanningEngine:
    """:class:`~halo_p2p.engine.protocol.Engine` over a sequence of coordinators.

    Args:
        factory: builds a started coordinator excluding some peers.
        max_replans: give up (raise TransportError) after this many re-plans in one session.
    """

    def __init__(self, factory: CoordinatorFactory, *, max_replans: int = 8) -> None:
        self._factory = factory
        self.max_replans = max_replans
        self.coordinator: Coordinator | None = None
        self.lost: set[str] = set()
        self.replans = 0
        self.moved_groups = 0          # groups that changed owner over all re-plans
        self.session = 0
        self._history: list[int] = []    # ids at positions [0, len) as last forwarded

    async def start(self) -> None:
        """Build the first coordinator; workers that refuse the plan are left out (PeerLost)."""
        while True:
            self.session += 1
            try:
                self.coordinator = await self._factory(frozenset(self.lost), self.session)
                return
            except PeerLost as exc:
                self.replans += 1
                if self.replans > self.max_replans:
                    raise
                log.warning("leaving out %s: %s", ", ".join(exc.peers), exc)
                self.lost.update(exc.peers)

    @property
    def config(self) -> ModelConfig:
        assert self.coordinator is not None
        return self.coordinator.config

    @property
    def max_seq_len(self) -> int:
        assert self.coordinator is not None
        return self.coordinator.max_seq_len

    async def forward(self, token_ids: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """See :meth:`Coordinator.forward`; re-plans and retries when a worker is lost."""
        del self._history[start_pos:]
        self._history.extend(int(t) for t in token_ids)
        while True:
            assert self.coordinator is not None
            try:
                out = await self.coordinator.forward(token_ids, start_pos, all_logits=all_logits)
            except PeerLost as exc:
                await self._replan(exc.peers, replay_upto=start_pos)
                continue
            if self.coordinator.dead:          # halo finished the token without them
                await self._replan(sorted(self.coordinator.dead), replay_upto=start_pos + len(token_ids))
            return out

    async def _replan(self, peers: list[str], *, replay_upto: int) -> None:
        self.replans += 1
        if self.replans > self.max_replans:
            raise TransportError(f"re-planned {self.max_replans} times in one session",
                                 "the swarm is unstable; check the peers' links")
        self.lost.update(peers)
        log.warning("re-planning without %s (re-plan %d)", ", ".join(peers), self.replans)
        old = self.coordinator
        if old is not None:
            await old.aclose()
        await self.start()
        assert self.coordinator is not None
        if old is not None:                    # groups whose owner changed (shown by chat and --json)
            before, after = old.plan.owner, self.coordinator.plan.owner
            self.moved_groups += sum(1 for g, p in after.items() if before.get(g) != p)
        history = self._history[:replay_upto]
        for c0 in range(0, len(history), _REPLAY_CHUNK):
            await self.coordinator.forward(history[c0:c0 + _REPLAY_CHUNK], c0)

    @property
    def records(self) -> list:
        return self.coordinator.records if self.coordinator else []

    async def aclose(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.aclose()


class ReplanningFacade:
    """The :class:`~halo_p2p.engine.protocol.Engine` face of an object holding a
    :class:`ReplanningEngine` in ``self.engine`` (the emulated and the real swarm)."""

    engine: ReplanningEngine

    @property
    def coordinator(self) -> Coordinator:
        assert self.engine.coordinator is not None
        return self.engine.coordinator

    @property
    def config(self) -> ModelConfig:
        return self.engine.config

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    async def forward(self, token_ids: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        return await self.engine.forward(token_ids, start_pos, all_logits=all_logits)
