"""The torch LLaMA: KV-cache decoding, group partials and an independent numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halo_p2p.model.llama import Llama, rms_norm
from halo_p2p.model.llama2c import Llama2cModel
from halo_p2p.model.registry import resolve
from tests.reference_numpy import reference_logits


@pytest.fixture(scope="module")
def stories():
    return Llama2cModel.open(resolve("stories260K").path)


def test_matches_numpy_reference_stories(stories) -> None:
    ids = [1, 403, 407, 261, 378, 432, 383]
    ours = Llama(stories).forward(np.array(ids), 0, all_logits=True)
    ref = reference_logits(stories, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_kv_cache_decoding_equals_full_forward(stories) -> None:
    ids = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]
    full = Llama(stories).forward(np.array(ids), 0, all_logits=True)
    model = Llama(stories)
    prefix = 4
    steps = [model.forward(np.array(ids[:prefix]), 0, all_logits=True)]
    steps += [model.forward(np.array([tok]), pos) for pos, tok in enumerate(ids[prefix:], start=prefix)]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=5e-5, rtol=0)


def test_rewinding_overwrites_the_cache(stories) -> None:
    model = Llama(stories)
    model.forward(np.array([1, 5, 6, 7, 8]), 0)
    again = model.forward(np.array([403, 407]), 1, all_logits=True)      # rewrite positions 1..2
    fresh = Llama(stories).forward(np.array([1, 403, 407]), 0, all_logits=True)[1:]
    np.testing.assert_allclose(again, fresh, atol=5e-5, rtol=0)


def test_group_partials_sum_to_the_layer_output(stories) -> None:
    model = Llama(stories)
    block, cache = model.blocks[2], model.caches[2]
    x = torch.randn(3, stories.config.dim)
    xn = rms_norm(x, block.attention_norm, stories.config.norm_eps)
    heads = block.attention.heads(xn, 0, cache, model.rope)
    att = block.attention.partials(heads)
    assert att.shape == (stories.config.n_kv_heads, 3, stories.config.dim)
    torch.testing.assert_close(att.sum(0), block.attention.output(heads), atol=1e-5, rtol=0)
    hidden = torch.randn(3, stories.config.hidden_dim)
    block.mlp.group_size = 43                                            # 172 = 4 blocks of 43
    mlp = block.mlp.partials(hidden)
    assert mlp.shape == (4, 3, stories.config.dim)
    torch.testing.assert_close(mlp.sum(0), block.mlp.output(hidden), atol=1e-5, rtol=0)


def test_invalid_positions_are_masked_out(stories) -> None:
    """A position marked invalid contributes nothing, as if its key were absent."""
    model = Llama(stories)
    block, cache = model.blocks[0], model.caches[0]
    xn = torch.randn(4, stories.config.dim)
    block.attention.heads(xn[:3], 0, cache, model.rope)
    cache.invalidate(1, 2)
    masked = block.attention.heads(xn[3:], 3, cache, model.rope)
    # the same attention with position 1 never written and excluded by hand
    q_only = Llama(stories)
    c2 = q_only.caches[0]
    q_only.blocks[0].attention.heads(xn[:3], 0, c2, q_only.rope)
    c2.k[:, 1] = 1e3                                                      # garbage key...
    c2.valid[1] = False                                                   # ...that must not matter
    again = q_only.blocks[0].attention.heads(xn[3:], 3, c2, q_only.rope)
    torch.testing.assert_close(masked, again, atol=1e-6, rtol=0)
    unmasked = Llama(stories)
    unmasked.blocks[0].attention.heads(xn[:3], 0, unmasked.caches[0], unmasked.rope)
    full = unmasked.blocks[0].attention.heads(xn[3:], 3, unmasked.caches[0], unmasked.rope)
    assert not torch.allclose(masked, full, atol=1e-4)


@pytest.mark.slow
def test_smollm2_matches_numpy_reference(smollm2_path) -> None:
    from halo_p2p.model.gguf import GgufModel

    source = GgufModel.open(smollm2_path)
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 2]   # ChatML-ish ids; any 8 ids will do
    ours = Llama(source, max_seq_len=64).forward(np.array(ids), 0, all_logits=True)
    ref = reference_logits(source, ids)
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_float16_weights_keep_the_greedy_choice(stories) -> None:
    ids = np.array([1, 403, 407, 261, 378, 432, 383, 286])
    ref = Llama(stories).forward(ids, 0, all_logits=True)
    half = Llama(stories, dtype=torch.float16)
    assert half.blocks[0].mlp.w13.dtype == torch.float16
    assert half.weight_bytes() < 0.55 * Llama(stories).weight_bytes()
    out = half.forward(ids, 0, all_logits=True)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).all()
