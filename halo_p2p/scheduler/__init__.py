"""HALO's load-balancing scheduler: which peer computes which neuron group (pure, no I/O).

Critical groups go to the coordinator and to fast, reliable peers, less critical ones to slow or
unstable peers, within every peer's memory budget, so that the expected time per token is short
and little importance is lost to skipped partials. See ``docs/scheduler.md`` for the cost model,
the objective and the algorithm.

* :mod:`~halo_p2p.scheduler.model`: inputs (:class:`PeerModel`, :class:`GroupStats`,
  :class:`SchedulerConfig`), outputs (:class:`Schedule`, :class:`PeerLoad`), and the node's
  adapter :func:`peer_models_from`.
* :mod:`~halo_p2p.scheduler.cost`: the cost model (wire protocol 2: one answer per worker per
  sync point) and :func:`evaluate_plan`; :mod:`~halo_p2p.scheduler.frames`: elements per frame of
  each wire format, from the session's own framing.
* :mod:`~halo_p2p.scheduler.search`: :func:`schedule` and :func:`schedule_for_layout` (memory
  allocation over the sync points; a re-plan passes the running plan as ``incumbent``) and
  :func:`moved_groups`; :mod:`~halo_p2p.scheduler.greedy`: one sync point.

Reference: HALO (Zheng et al., "Semantic-Aware Distributed LLM Inference in Lossy Edge
Network", INFOCOM 2026, arXiv 2601.11676; abstract only).
"""

from __future__ import annotations

from halo_p2p.scheduler.cost import evaluate_plan
from halo_p2p.scheduler.model import (
    UNLIMITED_BYTES,
    GroupStats,
    PeerLoad,
    PeerModel,
    Schedule,
    SchedulerConfig,
    peer_models_from,
)
from halo_p2p.scheduler.search import moved_groups, order_peers, schedule, schedule_for_layout

__all__ = [
    "UNLIMITED_BYTES",
    "GroupStats",
    "PeerLoad",
    "PeerModel",
    "Schedule",
    "SchedulerConfig",
    "evaluate_plan",
    "moved_groups",
    "order_peers",
    "peer_models_from",
    "schedule",
    "schedule_for_layout",
]
