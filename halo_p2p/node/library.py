"""The models a peer holds, by sha256, and how a worker opens the one a plan names."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from halo_p2p.discovery import model_entry
from halo_p2p.engine.protocol import GroupCompute
from halo_p2p.errors import ModelNotFound
from halo_p2p.groups import GroupLayout
from halo_p2p.model.block_cache import BlockCache, default_cache_root
from halo_p2p.model.loader import LoadedModel, open_model
from halo_p2p.model.paged import PagedShard
from halo_p2p.model.registry import KNOWN_MODELS, cache_dir, sha256_file
from halo_p2p.model.shard import GroupShard, SliceWeights
from halo_p2p.node.weight_cache import DiskGroupCache
from halo_p2p.plan import PlanBody
from halo_p2p.session.worker import NeedWeights, ShardFactory

__all__ = ["HeldModel", "ModelLibrary", "file_sha256"]

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, memoised in ``<cache>/sha256.json`` by (path, size, mtime)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir().parent / "sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return str(memo[key])
    digest = sha256_file(path)
    memo[key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError as exc:
        log.debug("cannot memoise sha256 in %s: %s", memo_path, exc)
    return digest


@dataclass(frozen=True, slots=True)
class HeldModel:
    """A model file this peer can compute groups of."""

    name: str
    sha256: str
    model: LoadedModel

    @property
    def entry(self) -> str:
        """The ``name@sha16`` form advertised in mDNS."""
        return model_entry(self.name, self.sha256)


class ModelLibrary:
    """The models a peer offers to coordinators.

    Args:
        specs: model names or paths to hold; ``None`` holds every known model present locally.
    """

    def __init__(self, specs: Iterable[str] | None = None, *, memory_budget_bytes: int | None = None) -> None:
        self.memory_budget_bytes = memory_budget_bytes
        self.held: dict[str, HeldModel] = {}
        names = list(specs) if specs is not None else list(KNOWN_MODELS)
        for spec in names:
            try:
                loaded = open_model(spec)
            except ModelNotFound:
                if specs is not None:
                    raise
                continue
            digest = file_sha256(loaded.path)
            self.held[digest] = HeldModel(loaded.name, digest, loaded)
            log.info("holding %s (sha256 %s)", loaded.name, digest[:16])

    def entries(self) -> tuple[str, ...]:
        return tuple(m.entry for m in self.held.values())

    def find(self, sha256: str) -> HeldModel | None:
        return self.held.get(sha256)

    def open_for_plan(self, sha256: str, body: PlanBody) -> tuple[GroupLayout, ShardFactory]:
        """The :data:`~halo_p2p.session.worker.ModelOpener` of this peer's workers: the layout of
        the model ``sha256`` cut as ``body`` says, and a factory of shards of it (from the model
        file, paged within the memory budget; else from streamed weights, by ``body.config``).

        Raises:
            ConfigError: the plan's MLP group size does not divide this model's MLP width.
        """
        held = self.find(sha256)
        group_size = body.layout.mlp_group_size
        if held is not None:
            source = held.model.source
            layout = GroupLayout.from_config(source.config, group_size)
            weights = SliceWeights(source, layout)
            budget = self.memory_budget_bytes

            def factory(groups: list, max_seq_len: int) -> GroupCompute:
                need = 4 * sum(layout.group_params(g.part) for g in groups)
                if budget is not None and need > budget:    # page groups in and out (parallel loading)
                    cache = BlockCache(default_cache_root(), sha256)    # dequantized blocks: loads are copies
                    log.info("groups need %.0f MB, budget %.0f MB: paging (block cache %s)", need / 1e6,
                             budget / 1e6, cache.folder)
                    return PagedShard(source, layout, groups, max_seq_len=max_seq_len, memory_budget_bytes=budget,
                                      block_cache=cache)
                return GroupShard(weights, layout, groups, max_seq_len=max_seq_len)

            return layout, factory
        config = body.config            # this peer does not hold the file: build shards from streamed weights
        layout = GroupLayout.from_config(config, group_size)
        cache = DiskGroupCache(sha256, config)

        def from_cache(groups: list, max_seq_len: int) -> GroupShard:
            missing = [g for g in groups if not cache.has(g)]
            if missing:
                raise NeedWeights(missing, cache.save)
            return GroupShard(cache, layout, groups, max_seq_len=max_seq_len)

        return layout, from_cache
