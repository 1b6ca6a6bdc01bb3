"""Model hyper-parameters, read from the model file (never hard-coded)."""

from __future__ import annotations

from dataclasses import dataclass

from halo_p2p.errors import ModelFormatError

__all__ = ["ModelConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Shape of a LLaMA-family decoder.

    Attributes:
        dim: residual stream width (GGUF ``llama.embedding_length``).
        n_layers: number of transformer blocks (``llama.block_count``).
        n_heads: query heads (``llama.attention.head_count``).
        n_kv_heads: key/value heads; ``n_heads % n_kv_heads == 0`` (GQA).
        head_dim: width of one head (``llama.attention.key_length`` or ``dim // n_heads``).
        hidden_dim: SwiGLU intermediate width (``llama.feed_forward_length``).
        vocab_size: number of token ids.
        rope_base: RoPE frequency base theta (``llama.rope.freq_base``).
        norm_eps: RMSNorm epsilon (``llama.attention.layer_norm_rms_epsilon``).
        max_seq_len: context length in tokens (``llama.context_length``).
        tied_embeddings: the classifier reuses the token embedding matrix.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    rope_base: float
    norm_eps: float
    max_seq_len: int
    tied_embeddings: bool

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"model config has {name}={getattr(self, name)}",
                                       "the file's header or metadata is corrupt")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
                "the file's header or metadata is corrupt")
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim={self.head_dim} is odd; RoPE needs pairs",
                                   "the file's header or metadata is corrupt")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (the GQA ratio)."""
        return self.n_heads // self.n_kv_heads
