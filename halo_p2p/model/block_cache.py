"""Dequantized weight blocks of a paged shard, cached on disk so that paging one in is a copy.

A :class:`~halo_p2p.model.paged.PagedShard` under a tight budget loads the same blocks again
every token. Building a block from a quantized file dequantizes its rows (tens of ms for Q4_1 in
numpy); reading its final float32 tensors back from a ``.npy`` file is a memory copy. A block is
stored as ONE flat float32 ``.npy`` array (the block's final tensors raveled one after the
other) at::

    <root>/blocks/<model key[:16]>/<layer>-<part>-<digest>.npy

where the model key is the file's sha256 (a peer knows it) or, failing that, a hash of the
file's path, size and mtime (:func:`source_key`), and the digest covers the group layout and the
group indices, so another layout or set of groups never reads a wrong block. Disk use: up to the
float32 size of the groups paged (~4x a Q4_1 file for all of them); nothing is evicted, delete
the folder to reclaim it.

Files are written to a temporary name and renamed (atomic on POSIX). A file whose header cannot
be read or whose length is not the expected one (truncated, foreign) is logged, deleted and
reported as absent, so the caller rebuilds it from the model: the cache never fails a load. A
write error (disk full, read-only folder) is logged and the block simply stays uncached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from halo_p2p.errors import ConfigError
from halo_p2p.groups import SLICE_AXIS, GroupId, GroupLayout, tensor_names
from halo_p2p.paths import user_cache_dir

if TYPE_CHECKING:
    from halo_p2p.model.shard import GroupWeights
    from halo_p2p.model.source import TensorSource

__all__ = ["BlockCache", "default_cache_root", "flat_block", "source_key"]

log = logging.getLogger(__name__)

Status = Literal["hit", "miss", "damaged"]
ReadMode = Literal["file", "mmap"]
FORMAT = 1                              # bump when the file layout changes (part of every digest)


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/halo-p2p`` (blocks go to its ``blocks/`` folder; not created here)."""
    return user_cache_dir()


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as half-open ``(first, stop)`` pairs."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _load_rows(source: TensorSource, name: str, spans: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([source.load(name, rows=s) for s in spans])


def _load_cols(source: TensorSource, name: str, spans: list[tuple[int, int]]) -> np.ndarray:
    full = source.load(name)                    # column slices need the whole matrix dequantized
    return np.concatenate([full[:, a:b] for a, b in spans], axis=1)


def flat_block(weights: GroupWeights | TensorSource, layout: GroupLayout, layer: int, part: int,
               idx: list[int], lock: threading.Lock | None = None) -> np.ndarray:
    """The weights of groups ``idx`` (ascending) at sync point (layer, part) as ONE flat array.

    Layout (the cache's file format): attention ``cat(Wq, Wk, Wv rows)`` ``(q + 2 kv, dim)``
    then the Wo columns ``(dim, q)``; MLP ``cat(W1, W3 rows)`` ``(2 h, dim)`` then the W2
    columns ``(dim, h)``; each raveled row-major, i.e. exactly the matrices
    :class:`~halo_p2p.model.shard.GroupShard` multiplies by.

    Args:
        weights: a model file (only the rows of ``idx`` are dequantized; Wo/W2 whole, then sliced)
            or group weights (queried group by group under ``lock`` if given).

    Returns:
        float32 ``(n,)``, ``n * 4`` = ``len(idx) * layout.group_params(part) * 4`` bytes.
    Raises:
        ModelFormatError: reading the weights failed (from the source).
    """
    names = tensor_names(part)
    if hasattr(weights, "group"):
        with lock or nullcontext():
            parts = [weights.group(GroupId(layer, part, i)) for i in idx]
        w = {n: np.concatenate([g[n] for g in parts], axis=SLICE_AXIS[n]) for n in names}
    else:
        src: TensorSource = weights
        p, runs = f"layers.{layer}.", _runs(idx)
        w = {}
        for n in names:           # a run of groups is one span of each matrix
            spans = [(layout.tensor_spans(part, a)[n][0], layout.tensor_spans(part, b - 1)[n][1]) for a, b in runs]
            w[n] = _load_rows(src, p + n, spans) if SLICE_AXIS[n] == 0 else _load_cols(src, p + n, spans)
    return np.concatenate([w[n].astype(np.float32, copy=False).ravel() for n in names])


def source_key(weights: object) -> str:
    """The cache key of a weights source: a 64-hex-digit string.

    Uses ``weights.sha256`` when present (e.g. :class:`~halo_p2p.node.weight_cache.DiskGroupCache`),
    else the file behind ``weights.path`` or ``weights.source.path`` (GGUF and llama2.c files,
    :class:`~halo_p2p.model.shard.SliceWeights`), identified by resolved path, size and mtime
    (re-downloading or editing the file changes the key).

    Raises:
        ConfigError: the source names no file (pass an explicit key to :class:`BlockCache`).
    """
    sha = getattr(weights, "sha256", None)
    if isinstance(sha, str) and sha:
        return sha
    path = getattr(weights, "path", None) or getattr(getattr(weights, "source", None), "path", None)
    if path is None:
        raise ConfigError(f"cannot derive a block-cache key from {type(weights).__name__} (no path or sha256)",
                          "pass BlockCache(root, model_key) with the model's sha256")
    st = Path(path).stat()
    ident = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()


class BlockCache:
    """A folder of flat float32 weight blocks of one model.

    Thread- and process-safe: a name is written by whoever misses it first (a concurrent
    duplicate write of identical bytes is harmless, the last rename wins). Keeps no counters:
    :meth:`get` and :meth:`put` report what happened and the caller counts.

    Args:
        root: cache root; files go to ``root/blocks/<model_key[:16]>/``.
        model_key: identity of the model (its sha256, or :func:`source_key`).
        read: how :meth:`get` copies a block into memory, ``"file"`` (``readinto``) or
            ``"mmap"`` (``np.load(mmap_mode="r")`` then ``np.copyto``).

    Raises:
        ConfigError: an empty ``model_key`` or an unknown ``read`` mode.
    """

    def __init__(self, root: Path | str, model_key: str, *, read: ReadMode = "file") -> None:
        if not model_key:
            raise ConfigError("empty block-cache model key", "pass the model's sha256 or source_key(weights)")
        if read not in ("file", "mmap"):
            raise ConfigError(f"unknown block-cache read mode {read!r}", "use 'file' or 'mmap'")
        self.folder, self.read = Path(root) / "blocks" / model_key[:16], read

    @staticmethod
    def name(layer: int, part: int, spec: object) -> str:
        """File stem of a block: ``<layer>-<part>-<digest>``, ``spec`` being any ``repr``-stable
        description of its slices and shapes (e.g. a tuple of spans and shapes)."""
        digest = hashlib.sha256(repr((FORMAT, layer, part, spec)).encode()).hexdigest()[:16]
        return f"{layer}-{part}-{digest}"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def get(self, name: str, out: np.ndarray) -> Status:
        """Fill ``out`` (float32, 1-D, e.g. a fresh torch tensor's ``.numpy()``) with block ``name``.

        The block is copied into ``out``, so it lives in process memory (the budget counts it)
        and the file's pages only in the page cache: with ``read="mmap"`` the file is
        memory-mapped (``np.load(mmap_mode="r")``) and copied with ``np.copyto``; with
        ``read="file"`` its data are read straight into ``out`` (``readinto``, no mapping to set
        up and tear down). Both copies run without the GIL.

        Returns:
            ``"hit"`` (``out`` filled), ``"miss"`` (no file), or ``"damaged"``: the file's header
            is unreadable or it does not hold exactly ``out.size`` float32 values (truncated,
            foreign); it was logged and deleted, rebuild the block and :meth:`put` it again.
        """
        path = self.path(name)
        try:
            if self.read == "mmap":
                return self._get_mmap(path, out)
            return self._get_file(path, out)
        except (FileNotFoundError, NotADirectoryError):
            return "miss"
        except (ValueError, EOFError) as exc:                 # bad header, or data shorter than it says
            return self._damaged(path, f"unreadable ({type(exc).__name__}: {exc})")
        except OSError as exc:                                # no access: leave it, build from the model
            log.warning("cannot read cached weight block %s: %s", path, exc)
            return "miss"

    def _get_mmap(self, path: Path, out: np.ndarray) -> Status:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mm, np.ndarray) or mm.dtype != np.float32 or mm.shape != out.shape:
            return self._damaged(path, f"of {getattr(mm, 'dtype', '?')} {getattr(mm, 'shape', '?')}, "
                                       f"expected float32 {out.shape}")
        np.copyto(out, mm)
        return "hit"

    def _get_file(self, path: Path, out: np.ndarray) -> Status:
        with open(path, "rb", buffering=0) as f:
            version = np.lib.format.read_magic(f)            # (1, 0) as np.save writes it, or (2, 0)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                return self._damaged(path, f"of .npy format {version}, expected (1, 0) or (2, 0)")
            shape, _, dtype = header[version](f)
            size = os.fstat(f.fileno()).st_size - f.tell()
            if dtype != np.float32 or shape != out.shape or size != out.nbytes:
                return self._damaged(path, f"of {dtype} {shape} with {size} data bytes, expected float32 "
                                           f"{out.shape} ({out.nbytes} bytes)")
            view = out.data.cast("B")
            done = 0
            while done < out.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    return self._damaged(path, f"shorter than its header says ({done} of {out.nbytes} bytes)")
                done += n
        return "hit"

    def put(self, name: str, flat: np.ndarray) -> bool:
        """Store ``flat`` (float32, 1-D) as block ``name`` atomically (temporary file, then rename).

        Returns:
            whether it was written; a write error (disk full, read-only folder) is logged, not raised.
        """
        path = self.path(name)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(flat, dtype=np.float32).reshape(-1), allow_pickle=False)
            os.replace(tmp, path)
            return True
        except OSError as exc:
            log.warning("cannot cache weight block %s in %s: %s (it is rebuilt from the model next time)",
                        name, self.folder, exc)
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False

    @staticmethod
    def _damaged(path: Path, why: str) -> Status:
        log.warning("cached weight block %s is %s: deleting it, it is rebuilt from the model", path, why)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete damaged cached block %s: %s", path, exc)
        return "damaged"
