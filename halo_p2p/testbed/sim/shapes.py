"""Model shapes for the simulator: the LLaMA hyper-parameters that set compute and traffic.

Only the shape matters to the simulator (no weights): how many groups each sync point has, how
many weight parameters each group holds (compute time), and how wide the residual stream is
(bytes on the wire). Every value is copied from the model's ``config.json`` as published by its
authors on the Hugging Face Hub (field names in parentheses: ``num_hidden_layers``,
``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
``vocab_size``, ``tie_word_embeddings``); the address is in each shape's ``source``.

Pure module: no I/O, no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from halo_p2p.errors import ConfigError
from halo_p2p.groups import GroupLayout
from halo_p2p.model.config import ModelConfig

__all__ = ["LLAMA2_7B", "LLAMA3_8B", "SHAPES", "SMOLLM2_135M", "TINYLLAMA_1_1B", "ModelShape"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The shape of a LLaMA-family decoder.

    Attributes:
        name: short name, e.g. ``"llama2-7b"``.
        n_layers: transformer blocks (``num_hidden_layers``).
        dim: residual stream width (``hidden_size``).
        n_heads: query heads (``num_attention_heads``).
        n_kv_heads: key/value heads (``num_key_value_heads``).
        hidden_dim: SwiGLU intermediate width (``intermediate_size``).
        vocab_size: token ids (``vocab_size``).
        tied_embeddings: the classifier is the embedding matrix (``tie_word_embeddings``).
        source: where the numbers come from (the author's ``config.json``).

    Raises:
        ConfigError: a non-positive size, or heads that do not divide the width.
    """

    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    tied_embeddings: bool
    source: str

    def __post_init__(self) -> None:
        sizes = (self.n_layers, self.dim, self.n_heads, self.n_kv_heads, self.hidden_dim, self.vocab_size)
        if min(sizes) <= 0 or self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model shape {self.name!r} is inconsistent: {sizes}",
                              "copy the sizes from the model's config.json")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (``dim / n_heads``)."""
        return self.dim // self.n_heads

    def config(self) -> ModelConfig:
        """A :class:`~halo_p2p.model.config.ModelConfig` of this shape (RoPE and norm settings are
        placeholders: they do not affect timing)."""
        return ModelConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           head_dim=self.head_dim, hidden_dim=self.hidden_dim, vocab_size=self.vocab_size,
                           rope_base=10000.0, norm_eps=1e-5, max_seq_len=2048, tied_embeddings=self.tied_embeddings)

    def layout(self, mlp_group_size: int | None = None) -> GroupLayout:
        """The neuron-group layout halo-p2p uses for this shape (default MLP group size)."""
        return GroupLayout.from_config(self.config(), mlp_group_size)

    @property
    def layer_params(self) -> int:
        """Weight parameters of one block's projections (Wq, Wk, Wv, Wo, W1, W2, W3)."""
        kv = self.n_kv_heads * self.head_dim
        return 2 * self.dim * self.dim + 2 * self.dim * kv + 3 * self.dim * self.hidden_dim

    @property
    def classifier_params(self) -> int:
        """Weight parameters of the output projection (``vocab_size x dim``; read per token even if
        tied to the embeddings)."""
        return self.vocab_size * self.dim

    @property
    def matvec_params(self) -> int:
        """Weight parameters read by the matrix-vector products of one decoded token (all blocks
        plus the classifier; the embedding lookup reads one row and is left out)."""
        return self.n_layers * self.layer_params + self.classifier_params


_HF = "https://huggingface.co/{}/blob/main/config.json"

SMOLLM2_135M = ModelShape("smollm2-135m", n_layers=30, dim=576, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                          vocab_size=49152, tied_embeddings=True, source=_HF.format("HuggingFaceTB/SmolLM2-135M"))
TINYLLAMA_1_1B = ModelShape("tinyllama-1.1b", n_layers=22, dim=2048, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                            vocab_size=32000, tied_embeddings=False,
                            source=_HF.format("TinyLlama/TinyLlama-1.1B-Chat-v1.0"))
LLAMA2_7B = ModelShape("llama2-7b", n_layers=32, dim=4096, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                       vocab_size=32000, tied_embeddings=False, source=_HF.format("meta-llama/Llama-2-7b-hf"))
LLAMA3_8B = ModelShape("llama3-8b", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       vocab_size=128256, tied_embeddings=False, source=_HF.format("meta-llama/Meta-Llama-3-8B"))

SHAPES: dict[str, ModelShape] = {s.name: s for s in (SMOLLM2_135M, TINYLLAMA_1_1B, LLAMA2_7B, LLAMA3_8B)}
"""Known shapes by name."""
