"""Next-token selection from logits: greedy, temperature and nucleus (top-p) sampling.

Pure numpy, no I/O. Greedy picks the first maximal id, as llama2.c ``run.c`` ``sample_argmax``.
Top-p follows Holtzman et al. 2020 ("The Curious Case of Neural Text Degeneration").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from halo_p2p.errors import ConfigError

__all__ = ["Sampler", "SamplingParams"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        temperature: 0 means greedy; otherwise logits are divided by it before softmax.
        top_p: keep the smallest set of ids whose probability mass reaches ``top_p`` (0 < p <= 1).
        seed: seed of the sampling RNG (``None``: fresh entropy).
        max_tokens: upper bound on generated tokens.
    """

    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature {self.temperature} is negative", "use 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p {self.top_p} is outside (0, 1]", "use e.g. --top-p 0.9")
        if self.max_tokens < 1:
            raise ConfigError(f"max-tokens {self.max_tokens} is below 1", "use --max-tokens 1 or more")


class Sampler:
    """Stateful sampler (owns the seeded RNG of one generation)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick an id from ``logits`` ``(vocab,)`` float32."""
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
            return int(keep[self._rng.choice(len(keep), p=probs[keep] / probs[keep].sum())])
        return int(self._rng.choice(len(probs), p=probs))
