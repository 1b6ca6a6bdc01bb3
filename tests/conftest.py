"""Shared fixtures: paths to the models in ``../shared`` beside the checkout."""

from __future__ import annotations

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
