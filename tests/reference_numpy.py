"""An independent, plain-numpy LLaMA forward (no KV cache, float64) used as a test oracle.

Written from the equations (LLaMA paper; llama2.c run.c), sharing no code with
``halo_p2p.model.llama`` beyond reading the weights through the same ``TensorSource``.
"""

from __future__ import annotations

import numpy as np


def reference_logits(source, token_ids: list[int]) -> np.ndarray:
    """Logits ``(T, vocab)`` float64 of a full causal forward over ``token_ids``."""
    c = source.config
    hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads

    def w(name: str) -> np.ndarray:
        return source.load(name).astype(np.float64)

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * g

    def rope(x: np.ndarray) -> np.ndarray:  # x (T, H, hd), rotate pairs (2i, 2i+1)
        t = x.shape[0]
        out = x.copy()
        for p in range(t):
            for i in range(hd // 2):
                theta = p / c.rope_base ** (2 * i / hd)
                co, si = np.cos(theta), np.sin(theta)
                a, b = x[p, :, 2 * i], x[p, :, 2 * i + 1]
                out[p, :, 2 * i], out[p, :, 2 * i + 1] = a * co - b * si, a * si + b * co
        return out

    emb = w("tok_embeddings")
    x = emb[np.asarray(token_ids)]
    t = len(token_ids)
    for layer in range(c.n_layers):
        p = f"layers.{layer}."
        xn = norm(x, w(p + "attention_norm"))
        q = rope((xn @ w(p + "wq").T).reshape(t, nh, hd))
        k = rope((xn @ w(p + "wk").T).reshape(t, nkv, hd))
        v = (xn @ w(p + "wv").T).reshape(t, nkv, hd)
        att = np.zeros((t, nh, hd))
        for h in range(nh):
            kv = h // (nh // nkv)
            s = q[:, h] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, h] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(t, nh * hd) @ w(p + "wo").T
        hn = norm(x, w(p + "ffn_norm"))
        gate, up = hn @ w(p + "w1").T, hn @ w(p + "w3").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w(p + "w2").T
    out = emb if c.tied_embeddings else w("output")
    return norm(x, w("norm")) @ out.T
