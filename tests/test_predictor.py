"""The criticality predictor: calibration labels, fitting, persistence, policy and shipped files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halo_p2p.errors import ConfigError, ModelFormatError
from halo_p2p.groups import ATTN, MLP, GroupId, GroupLayout
from halo_p2p.model.calibrate import collect, group_forward, run_calibration, self_generated_corpus, split_windows
from halo_p2p.model.llama import Llama
from halo_p2p.model.loader import open_model
from halo_p2p.model.registry import KNOWN_MODELS, sha256_file
from halo_p2p.model.shard import GroupShard
from halo_p2p.predictor import (
    CalibrationSet,
    Predictor,
    PredictorPolicy,
    default_predictor_path,
    fit_predictor,
    fit_ridge,
    load_predictor_for,
    recall_at_k,
    shipped_predictor_path,
    top_mass_share,
)

STORIES_SHA = "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The 260K model decodes faster on one thread (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories():
    return open_model("stories260K")


@pytest.fixture(scope="module")
def layout(stories):
    return GroupLayout.from_config(stories.source.config)


@pytest.fixture(scope="module")
def model(stories):
    return Llama(stories.source, max_seq_len=256)


def synthetic_layout(n_layers: int = 1, dim: int = 12, n_attn: int = 3, n_mlp: int = 6) -> GroupLayout:
    return GroupLayout(n_layers=n_layers, n_attn=n_attn, n_mlp=n_mlp, mlp_group_size=2, q_per_kv=1,
                       head_dim=dim // n_attn, dim=dim, hidden_dim=2 * n_mlp)


def synthetic_set(rng, lay: GroupLayout, t: int = 600) -> tuple[CalibrationSet, dict[int, np.ndarray]]:
    """Labels ``exp(x @ W_part + 0.5)`` with a per-part random linear map ``W``."""
    w = {p: rng.normal(size=(lay.dim, lay.n_groups(p))) / np.sqrt(lay.dim) for p in (ATTN, MLP)}
    xs = tuple(rng.normal(size=(lay.n_layers, t, lay.dim)).astype(np.float16) for _ in (ATTN, MLP))
    norms = tuple(np.exp(xs[p].astype(np.float64) @ w[p] + 0.5).astype(np.float16) for p in (ATTN, MLP))
    return CalibrationSet(xs, norms, np.arange(t, dtype=np.int32) // 50, lay), w


# -- calibration -------------------------------------------------------------------------------

def test_calibration_shapes_and_labels_equal_independent_partial_norms(stories, layout, model) -> None:
    ids = stories.tokenizer.encode("Once upon a time, there was a little cat named Tom. Tom liked to play.")
    seen: dict[tuple[int, int], np.ndarray] = {}

    def keep_inputs(layer, part, xn, norms):
        seen[(layer, part)] = xn.copy()

    group_forward(model, layout, ids, select=keep_inputs)
    data = collect(model, layout, [ids, ids[:9]])
    t = len(ids) + 9
    assert data.xn[ATTN].shape == data.xn[MLP].shape == (layout.n_layers, t, layout.dim)
    assert data.norms[ATTN].shape == (layout.n_layers, t, layout.n_attn)
    assert data.norms[MLP].shape == (layout.n_layers, t, layout.n_mlp)
    assert data.xn[ATTN].dtype == data.norms[MLP].dtype == np.float16
    assert data.sequence_ids.tolist() == [0] * len(ids) + [1] * 9
    # independent path: a GroupShard holding one group, loaded from the file's weight slices
    for gid in (GroupId(2, ATTN, 1), GroupId(3, MLP, 2), GroupId(0, MLP, 0)):
        shard = GroupShard(stories.source, layout, [gid], max_seq_len=64)
        partial = shard.partials(gid.layer, gid.part, seen[(gid.layer, gid.part)], 0)[0]     # (T, dim)
        np.testing.assert_allclose(data.norms[gid.part][gid.layer, :len(ids), gid.index],
                                   np.linalg.norm(partial, axis=-1), rtol=2e-3, atol=1e-3)


def test_group_forward_equals_the_model_and_dropping_changes_it(stories, layout, model) -> None:
    ids = np.array(stories.tokenizer.encode("The dog ran to the park and saw a big red ball."))
    ref = Llama(stories.source, max_seq_len=64).forward(ids, 0, all_logits=True)
    np.testing.assert_allclose(group_forward(model, layout, ids), ref, atol=1e-4, rtol=0)
    keep_all = group_forward(model, layout, ids, select=lambda layer, part, xn, norms: np.ones_like(norms, bool))
    np.testing.assert_allclose(keep_all, ref, atol=1e-4, rtol=0)
    drop_one = group_forward(model, layout, ids, select=lambda layer, part, xn, norms:
                             np.arange(norms.size).reshape(norms.shape) % norms.shape[1] != 0
                             if (layer, part) == (1, MLP) else None)
    assert np.abs(drop_one - ref).max() > 1e-2


def test_split_windows() -> None:
    assert split_windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert split_windows([[1, 2, 3, 4], [5], [6, 7]], 3) == [[1, 2, 3], [6, 7]]


# -- fitting -----------------------------------------------------------------------------------

def test_ridge_recovers_a_linear_map_and_a_low_rank_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 10))
    w, b = rng.normal(size=(10, 4)), rng.normal(size=4)
    u, v, b_hat = fit_ridge(x, x @ w + b, alpha=1e-6)
    assert v is None
    np.testing.assert_allclose(u, w, atol=1e-3)
    np.testing.assert_allclose(b_hat, b, atol=1e-3)
    low = rng.normal(size=(10, 2)) @ rng.normal(size=(2, 6))
    u, v, b_hat = fit_ridge(x, x @ low, alpha=1e-6, rank=2)
    assert u.shape == (10, 2) and v.shape == (2, 6)
    np.testing.assert_allclose(u @ v, low, atol=1e-3)
    _, v_full, _ = fit_ridge(x, x @ low, alpha=1e-6, rank=6)
    assert v_full is None


def test_fit_predictor_recovers_the_synthetic_ranking() -> None:
    rng = np.random.default_rng(1)
    lay = synthetic_layout()
    data, w = synthetic_set(rng, lay)
    pred = fit_predictor(data, model_sha256="ab" * 32, alphas=(1e-6, 1e-2))
    x = rng.normal(size=(200, lay.dim)).astype(np.float32)
    for part in (ATTN, MLP):
        np.testing.assert_allclose(pred.scores(0, part, x), x @ w[part] + 0.5, atol=5e-2)
        assert recall_at_k(pred.scores(0, part, x), x @ w[part], 1) > 0.95
    assert pred.metadata["calibration_tokens"] == 600


def test_recall_and_sparsity_metrics() -> None:
    truth = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert recall_at_k(truth, truth, 2) == 1.0
    assert recall_at_k(-truth, truth, 2) == 0.0
    assert recall_at_k(np.array([[1.0, 0, 2, 0], [0, 0, 2, 1.0]]), truth, 2) == 0.75
    assert top_mass_share(truth, 0.25) == pytest.approx(0.4)
    assert top_mass_share(np.ones((3, 8)), 0.5) == pytest.approx(0.5)


# -- persistence -------------------------------------------------------------------------------

def test_save_load_round_trip_and_sha_check(tmp_path) -> None:
    rng = np.random.default_rng(2)
    lay = synthetic_layout(n_layers=2)
    data, _ = synthetic_set(rng, lay)
    sha = "12" * 32
    for rank in (None, 2):
        pred = fit_predictor(data, model_sha256=sha, rank=rank, metadata={"text": "synthetic"})
        path = tmp_path / f"p{rank}.npz"
        pred.save(path)
        back = Predictor.load(path, model_sha256=sha)
        assert back.layout == lay and back.model_sha256 == sha
        assert back.metadata["text"] == "synthetic" and back.metadata["rank"] == rank
        x = rng.normal(size=(5, lay.dim)).astype(np.float32)
        for part in (ATTN, MLP):
            np.testing.assert_allclose(back.scores(1, part, x), pred.scores(1, part, x), atol=2e-2)
    with pytest.raises(ConfigError, match="calibrated for model sha256 121212"):
        Predictor.load(tmp_path / "pNone.npz", model_sha256="ff" * 32)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "pNone.npz").read_bytes()[:300])
    with np.load(tmp_path / "pNone.npz") as z:
        arrays = dict(z)
    arrays["meta"] = np.array(str(arrays["meta"]).replace('"format_version": 1', '"format_version": 99'))
    np.savez(tmp_path / "future.npz", **arrays)
    for bad in ("bad.npz", "cut.npz", "future.npz"):
        with pytest.raises(ModelFormatError):
            Predictor.load(tmp_path / bad)
    with pytest.raises(ConfigError, match="recalibrate"):
        back.check_layout(synthetic_layout(n_layers=2, n_mlp=3))


def test_load_predictor_for_prefers_the_user_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sha = "34" * 32
    assert default_predictor_path(sha) == tmp_path / "halo-p2p" / "predictors" / f"{sha}.npz"
    assert load_predictor_for(sha) is None
    data, _ = synthetic_set(np.random.default_rng(3), synthetic_layout())
    fit_predictor(data, model_sha256=sha).save(default_predictor_path(sha))
    assert load_predictor_for(sha).model_sha256 == sha
    # the cache shadows the shipped file of stories260K
    assert load_predictor_for(STORIES_SHA).metadata.get("model_name") == "stories260K"
    fit_predictor(data, model_sha256=STORIES_SHA, metadata={"model_name": "mine"}).save(
        default_predictor_path(STORIES_SHA))
    assert load_predictor_for(STORIES_SHA).metadata["model_name"] == "mine"


# -- policy ------------------------------------------------------------------------------------

def test_policy_returns_k_groups_and_ranks_a_planted_group_first() -> None:
    rng = np.random.default_rng(4)
    lay = synthetic_layout(n_layers=2)
    data, _ = synthetic_set(rng, lay)
    pred = fit_predictor(data, model_sha256="56" * 32)
    x = rng.normal(size=(1, lay.dim)).astype(np.float32)
    policy = PredictorPolicy(pred, 0.5)
    for part in (ATTN, MLP):
        crit = policy.critical(1, part, x)
        k = round(0.5 * lay.n_groups(part))
        assert len(crit) == k
        assert crit == set(np.argsort(-pred.scores(1, part, x)[0])[:k].tolist())
    u, v, b = pred.weights[MLP][0]
    planted = b.copy()
    planted[4] += 100.0
    pred.weights[MLP][0] = (u, v, planted)
    assert PredictorPolicy(pred, 1).critical(0, MLP, x) == {4}
    assert 4 in PredictorPolicy(pred, 0.5).critical(0, MLP, np.repeat(x, 3, axis=0))
    assert PredictorPolicy(pred, 1.0).critical(0, MLP, x) == set(range(lay.n_mlp))
    assert PredictorPolicy(pred, 0.0).critical(0, ATTN, x) == frozenset()
    assert len(PredictorPolicy(pred, 0.5, attn_critical=3).critical(0, ATTN, x)) == 3
    with pytest.raises(ValueError):
        PredictorPolicy(pred, 1.5)


# -- shipped predictors and held-out quality ---------------------------------------------------

@pytest.mark.parametrize(("name", "sha"), [("stories260K", STORIES_SHA), ("smollm2-135m-instruct", SMOLLM2_SHA)])
def test_shipped_predictors_load_and_match_their_model(name, sha) -> None:
    assert KNOWN_MODELS[name].sha256 == sha
    path = shipped_predictor_path(sha)
    assert path.is_file() and path.stat().st_size < 2_000_000
    pred = Predictor.load(path, model_sha256=sha)
    assert pred.metadata["model_name"] in (name, "SmolLM2-135M-Instruct.Q4_1")
    if name == "stories260K":
        pred.check_layout(GroupLayout.from_config(open_model(name).source.config))
        assert sha256_file(KNOWN_MODELS[name].path) == sha
    else:
        assert (pred.layout.n_layers, pred.layout.n_attn, pred.layout.n_mlp) == (30, 3, 24)


def test_trained_predictor_beats_random_on_heldout_stories(stories, layout, model) -> None:
    train = self_generated_corpus(model, stories.tokenizer, prompts=("Once upon a time", "Lily and Ben", "One day"),
                                  tokens_per_prompt=256, seed=10)
    pred = run_calibration(stories.source, train, model_sha256=STORIES_SHA, window=256)
    test = self_generated_corpus(model, stories.tokenizer, prompts=("Tom had a big red ball",),
                                 tokens_per_prompt=256, seed=99)
    held = collect(model, layout, test)
    for part in (ATTN, MLP):
        k = layout.n_groups(part) // 2
        recall = np.mean([recall_at_k(pred.scores(i, part, held.xn[part][i].astype(np.float32)),
                                      held.norms[part][i], k) for i in range(layout.n_layers)])
        assert recall > k / layout.n_groups(part) + 0.1, (part, recall)
