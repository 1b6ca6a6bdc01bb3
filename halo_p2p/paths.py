"""Where halo-p2p keeps the user's files; library code asks here instead of reading XDG variables.

Both follow the XDG Base Directory specification: a variable that is unset, empty or a relative
path is ignored (the spec says relative paths are invalid) and the default under the home
folder is used. They are read on every call, not cached, so a process (or a test) that changes
the environment is followed. Nothing is created here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["user_cache_dir", "user_config_dir"]

log = logging.getLogger(__name__)

APP = "halo-p2p"


def _xdg(variable: str, default: str) -> Path:
    base = os.environ.get(variable, "")
    return (Path(base) if os.path.isabs(base) else Path.home() / default) / APP


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/halo-p2p`` (default ``~/.cache/halo-p2p``): pulled models (``models/``),
    predictors (``predictors/``), streamed weights and float32 blocks."""
    return _xdg("XDG_CACHE_HOME", ".cache")


def user_config_dir() -> Path:
    """``$XDG_CONFIG_HOME/halo-p2p`` (default ``~/.config/halo-p2p``): the swarm key and the peer id."""
    return _xdg("XDG_CONFIG_HOME", ".config")
