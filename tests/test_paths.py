"""The user's cache and config folders (XDG Base Directory rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from halo_p2p.model.registry import cache_dir
from halo_p2p.paths import user_cache_dir, user_config_dir
from halo_p2p.predictor import default_predictor_path


@pytest.mark.parametrize(("variable", "folder", "default"), [("XDG_CACHE_HOME", user_cache_dir, ".cache"),
                                                             ("XDG_CONFIG_HOME", user_config_dir, ".config")])
def test_xdg_variable_or_the_home_default(variable: str, folder, default: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, str(tmp_path))
    assert folder() == tmp_path / "halo-p2p"
    for ignored in ("", "relative/path"):           # invalid per the spec: the default applies
        monkeypatch.setenv(variable, ignored)
        assert folder() == Path.home() / default / "halo-p2p"
    monkeypatch.delenv(variable)
    assert folder() == Path.home() / default / "halo-p2p"


def test_models_and_predictors_live_in_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "halo-p2p" / "models"
    assert default_predictor_path("ab" * 32) == tmp_path / "halo-p2p" / "predictors" / f"{'ab' * 32}.npz"


def test_peer_config_and_weight_caches_live_in_the_user_folders(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from halo_p2p.model.block_cache import default_cache_root
    from halo_p2p.model.config import ModelConfig
    from halo_p2p.node.peer import config_dir, load_peer_id
    from halo_p2p.node.weight_cache import DiskGroupCache

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert config_dir() == tmp_path / "config" / "halo-p2p"
    peer_id = load_peer_id()
    assert (tmp_path / "config" / "halo-p2p" / "peer-id").read_text().strip() == peer_id
    assert default_cache_root() == tmp_path / "cache" / "halo-p2p"
    config = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, hidden_dim=16, vocab_size=32,
                         rope_base=10000.0, norm_eps=1e-5, max_seq_len=16, tied_embeddings=True)
    assert DiskGroupCache("cd" * 32, config).folder == tmp_path / "cache" / "halo-p2p" / "weights" / ("cd" * 8)
