"""Compute engines: what turns token ids into logits (one peer, or a split model)."""

from halo_p2p.engine.protocol import Engine

__all__ = ["Engine"]
