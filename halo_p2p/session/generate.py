"""Autoregressive generation and teacher-forced perplexity over any :class:`Engine`."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from halo_p2p.engine.protocol import Engine
from halo_p2p.errors import ConfigError, ContextOverflow
from halo_p2p.model.tokenizer import StreamDecoder, Tokenizer
from halo_p2p.sampling import Sampler, SamplingParams

__all__ = ["GenerationStats", "Generator", "PerplexityResult", "TokenEvent", "perplexity"]

log = logging.getLogger(__name__)

_PREFILL_CHUNK = 256   # tokens per forward when scoring long texts


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token: its id, the text it completes (may be empty) and its latency."""

    token_id: int
    text: str
    latency_s: float


@dataclass(slots=True)
class GenerationStats:
    """Timing of one generation.

    Attributes:
        prompt_tokens: ids fed before the first generated token (including a reused prefix).
        prefill_s: wall time of the prompt forward, seconds (first token latency).
        decode_s: wall time of each later token, seconds.
        decode_cpu_s: CPU time of this process (all threads, ``time.process_time``) over the
            decode steps, seconds: with ``len(decode_s)`` it gives CPU-seconds per decode token.
        token_ids: generated ids (a stop id is not included).
        stop_reason: ``"stop"`` (EOS-like id), ``"length"`` (max_tokens) or ``"context"``.
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    decode_cpu_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = "length"

    @property
    def tpot_ms(self) -> float | None:
        """Median time per output token after the first (TPOT), milliseconds."""
        return 1000 * statistics.median(self.decode_s) if self.decode_s else None

    @property
    def tpot_p95_ms(self) -> float | None:
        """95th percentile of the per-token decode time, milliseconds."""
        if not self.decode_s:
            return None
        return 1000 * float(np.percentile(self.decode_s, 95))

    @property
    def tokens_per_s(self) -> float | None:
        """Decode throughput: decoded tokens divided by decode wall time."""
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total > 0 else None


class Generator:
    """Generates from an engine, keeping the cached context so that a chat reuses its history.

    Args:
        engine: computes logits with a KV cache.
        tokenizer: decodes streamed ids and supplies the stop ids.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._cached: list[int] = []      # ids whose keys/values are in the engine's cache
        self.stats = GenerationStats()

    def reset(self) -> None:
        """Forget the cached context (the next prompt is computed from scratch)."""
        self._cached = []

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Yield generated tokens one by one.

        Args:
            prompt_ids: the whole context so far (e.g. the rendered chat history).
            params: sampling settings; ``max_tokens`` bounds the output.
        Raises:
            ContextOverflow: the prompt does not leave room for one generated token.
        """
        limit = self.engine.max_seq_len
        if not prompt_ids:
            raise ConfigError("the prompt is empty and the model adds no BOS token",
                              "give a non-empty --prompt")
        if len(prompt_ids) >= limit:
            raise ContextOverflow(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {limit}",
                "shorten the prompt (or /reset the chat), or raise --ctx up to the model's context length")
        sampler = Sampler(params)
        common = 0
        for a, b in zip(self._cached, prompt_ids, strict=False):
            if a != b:
                break
            common += 1
        start = min(common, len(prompt_ids) - 1)   # always forward at least one token
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids), reused_tokens=start)
        decoder = StreamDecoder(self.tokenizer, prompt_ids)
        context = list(prompt_ids)
        self._cached = context[:start]
        t0 = time.perf_counter()
        logits = await self.engine.forward(context[start:], start)
        self._cached = list(context)
        stats.prefill_s = latency = time.perf_counter() - t0
        while True:
            token = sampler(logits[-1])
            if token in self.tokenizer.stop_ids:
                stats.stop_reason = "stop"
                return
            stats.token_ids.append(token)
            context.append(token)
            yield TokenEvent(token, decoder.push(token), latency)
            if len(stats.token_ids) >= params.max_tokens:
                stats.stop_reason = "length"
                return
            if len(context) >= limit:
                stats.stop_reason = "context"
                return
            t0, c0 = time.perf_counter(), time.process_time()
            logits = await self.engine.forward([token], len(context) - 1)
            self._cached = list(context)
            latency = time.perf_counter() - t0
            stats.decode_s.append(latency)
            stats.decode_cpu_s += time.process_time() - c0


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """Teacher-forced scores: ``tokens`` predicted ids, their mean negative log-likelihood (nats)."""

    tokens: int
    mean_nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


async def perplexity(engine: Engine, ids: Sequence[int], *, window: int | None = None,
                     chunk_tokens: int = _PREFILL_CHUNK) -> PerplexityResult:
    """Mean NLL of each id given the ids before it (teacher forcing).

    The text is cut into non-overlapping windows of ``window`` ids (default: the engine's
    context); the first id of each window is context only, so ``tokens = len(ids) - n_windows``.
    Each forward pass takes ``chunk_tokens`` ids; 1 scores the text exactly as decoding would
    run it (on a split model in ``halo`` mode, relaxed synchronization then applies to every id).

    Raises:
        ContextOverflow: fewer than two ids to score.
    """
    window = min(window or engine.max_seq_len, engine.max_seq_len)
    if chunk_tokens < 1:
        raise ConfigError(f"chunk of {chunk_tokens} tokens", "use 1 or more tokens per forward pass")
    if len(ids) < 2:
        raise ContextOverflow(f"the text has {len(ids)} token(s); perplexity needs at least 2",
                              "use a longer text file")
    total, count = 0.0, 0
    for w0 in range(0, len(ids), window):
        chunk = list(ids[w0:w0 + window])
        for c0 in range(0, len(chunk) - 1, chunk_tokens):
            part = chunk[c0:c0 + chunk_tokens]
            targets = np.asarray(chunk[c0 + 1:c0 + 1 + len(part)], dtype=np.int64)
            logits = (await engine.forward(part, c0, all_logits=True))[: len(targets)].astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            total += float((logz - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
    return PerplexityResult(tokens=count, mean_nll=total / count)
