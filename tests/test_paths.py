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
