"""One peer runs the whole model: torch compute on a single worker thread, off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from halo_p2p.model.config import ModelConfig
from halo_p2p.model.llama import Llama, weight_dtype
from halo_p2p.model.source import TensorSource

__all__ = ["LocalEngine"]

log = logging.getLogger(__name__)


class LocalEngine:
    """:class:`~halo_p2p.engine.protocol.Engine` over a local :class:`~halo_p2p.model.llama.Llama`.

    Args:
        source: the model weights.
        max_seq_len: KV-cache length in tokens (default: the model's context, capped at 4096
            to bound memory).
        dtype: weight storage dtype, ``"float32"`` (default) or ``"float16"``/``"bfloat16"``
            (see :func:`halo_p2p.model.llama.linear`).
    """

    def __init__(self, source: TensorSource, *, max_seq_len: int | None = None,
                 dtype: str = "float32") -> None:
        self.model = Llama(source, max_seq_len=max_seq_len or min(source.config.max_seq_len, 4096),
                           dtype=weight_dtype(dtype))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="halo-torch")

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    async def forward(self, token_ids: Sequence[int], start_pos: int, *,
                      all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: self.model.forward(ids, start_pos, all_logits=all_logits))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)
