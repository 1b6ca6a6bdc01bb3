"""Shared fixtures: paths to the models in ``../shared`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_GGUF = SHARED / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TOKENIZER_JSON = SHARED / "models/smollm2-135m-instruct-q4_1/tokenizer.json"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The shared SmolLM2-135M-Instruct Q4_1 GGUF (skips when ../shared is absent)."""
    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"{SMOLLM2_GGUF} is absent: put the shared folder beside the checkout")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of every real peer: one swarm key, a cache where SmolLM2 is 'pulled'."""
    from halo_p2p.net.swarmkey import generate_swarm_key

    if not SMOLLM2_GGUF.exists():
        pytest.skip("the shared SmolLM2 file is absent")
    cache = tmp_path_factory.mktemp("xdg-cache")
    (cache / "halo-p2p" / "models").mkdir(parents=True)
    (cache / "halo-p2p" / "models" / SMOLLM2_GGUF.name).symlink_to(SMOLLM2_GGUF)
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "HALO_SWARM_KEY": generate_swarm_key()}
