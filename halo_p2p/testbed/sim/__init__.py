"""A discrete-event simulator of strict vs halo synchronization on a simulated edge cluster.

It projects what halo-p2p's protocol would achieve on hardware this machine does not have
(a Raspberry Pi cluster on 1 GbE, as in HALO's evaluation: Zheng et al., "Semantic-Aware
Distributed LLM Inference in Lossy Edge Network", INFOCOM 2026, arXiv 2601.11676), with the
groups placed by :mod:`halo_p2p.scheduler` and the run-time deadlines of
:class:`~halo_p2p.session.sync.ResponseTimer`.

* :mod:`~halo_p2p.testbed.sim.shapes`: model shapes (:class:`ModelShape`; SmolLM2-135M, TinyLlama-1.1B,
  Llama-2-7B, Llama-3-8B from their ``config.json``).
* :mod:`~halo_p2p.testbed.sim.cluster`: :class:`Device`, :class:`LinkModel`, :class:`Cluster`, presets
  (:func:`rpi4b`, :func:`rpi5`, :func:`gbe_link`), and the scheduler glue :func:`place`.
* :mod:`~halo_p2p.testbed.sim.cpu`: the network stack's CPU cost (:class:`StackCost`), measured on this
  machine and scaled to Raspberry Pi cores (:data:`RPI4_STACK`, :data:`RPI5_STACK`).
* :mod:`~halo_p2p.testbed.sim.framing`: the frames of wire protocol 2, sized by the real encoder.
* :mod:`~halo_p2p.testbed.sim.des`: :func:`simulate` (:class:`SimOptions` -> :class:`SimResult`, both in
  :mod:`~halo_p2p.testbed.sim.options`), modes ``strict``, ``strict-unreliable`` and ``halo``, on the ports
  and bursts of :mod:`~halo_p2p.testbed.sim.transport`.

``benchmarks/projection.py`` prints the projected TPOT table; ``benchmarks/projection.md``
lists every assumption with its source.
"""

from __future__ import annotations

from halo_p2p.testbed.sim.cluster import (
    Cluster,
    Device,
    LinkModel,
    ReliableStream,
    gbe_link,
    place,
    rpi4b,
    rpi5,
    uniform_cluster,
)
from halo_p2p.testbed.sim.cpu import NATIVE_STACK, RPI4_SCALE, RPI4_STACK, RPI5_STACK, X86_STACK, StackCost
from halo_p2p.testbed.sim.des import SimOptions, SimResult, SyncTrace, simulate
from halo_p2p.testbed.sim.shapes import LLAMA2_7B, LLAMA3_8B, SHAPES, SMOLLM2_135M, TINYLLAMA_1_1B, ModelShape

__all__ = [
    "LLAMA2_7B",
    "LLAMA3_8B",
    "NATIVE_STACK",
    "RPI4_SCALE",
    "RPI4_STACK",
    "RPI5_STACK",
    "SHAPES",
    "SMOLLM2_135M",
    "TINYLLAMA_1_1B",
    "X86_STACK",
    "Cluster",
    "Device",
    "LinkModel",
    "ModelShape",
    "ReliableStream",
    "SimOptions",
    "SimResult",
    "StackCost",
    "SyncTrace",
    "gbe_link",
    "place",
    "rpi4b",
    "rpi5",
    "simulate",
    "uniform_cluster",
]
