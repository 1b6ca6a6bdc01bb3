"""Group weights streamed from a coordinator, cached on disk by model hash and group.

A worker that does not hold a model's file receives its groups' weight slices
(:class:`~halo_p2p.wire.messages.GroupTensor`) and keeps them under
``$XDG_CACHE_HOME/halo-p2p/weights/<sha256[:16]>/<layer>-<part>-<index>.npz``, so the next
session with the same plan needs no transfer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from halo_p2p.errors import ModelFormatError
from halo_p2p.groups import GroupId, tensor_names
from halo_p2p.model.config import ModelConfig
from halo_p2p.paths import user_cache_dir

__all__ = ["DiskGroupCache"]

log = logging.getLogger(__name__)


class DiskGroupCache:
    """:class:`~halo_p2p.model.shard.GroupWeights` backed by files of streamed group slices.

    Args:
        sha256: the model file's hash (the cache key).
        config: the model's hyper-parameters (sent in the plan).
        root: cache folder (default ``<user cache>/halo-p2p/weights``).
    """

    def __init__(self, sha256: str, config: ModelConfig, root: Path | None = None) -> None:
        self.sha256, self._config = sha256, config
        self.folder = (root or user_cache_dir() / "weights") / sha256[:16]

    @property
    def config(self) -> ModelConfig:
        return self._config

    def path(self, gid: GroupId) -> Path:
        return self.folder / f"{gid.layer}-{gid.part}-{gid.index}.npz"

    def has(self, gid: GroupId) -> bool:
        return self.path(gid).is_file()

    def save(self, gid: GroupId, tensors: dict[str, np.ndarray]) -> None:
        """Write one group's float32 slices atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(gid).with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, allow_pickle=False, **tensors)
        os.replace(tmp, self.path(gid))

    def group(self, gid: GroupId) -> dict[str, np.ndarray]:
        """The cached slices of ``gid``.

        Raises:
            ModelFormatError: the file is missing or damaged (delete the folder to refetch).
        """
        try:
            with np.load(self.path(gid)) as data:
                out = {name: np.asarray(data[name], dtype=np.float32) for name in tensor_names(gid.part)}
        except (OSError, KeyError, ValueError) as exc:
            raise ModelFormatError(f"cached weights of group {gid} in {self.folder} are unreadable ({exc})",
                                   f"delete {self.folder}; they are streamed again") from None
        return out
