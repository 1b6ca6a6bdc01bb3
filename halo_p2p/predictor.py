"""The semantic-aware criticality predictor: which neuron groups matter for the current token.

At every sync point (layer, part) — see :mod:`halo_p2p.groups` — the coordinator holds the
normalized layer input ``xn`` ``(dim,)`` *before* any group is computed. The predictor maps it
to one score per group, a linear estimate of ``log ||partial_g||_2``: the log L2 norm of the
group's contribution to the residual stream. :class:`PredictorPolicy` names the top-k groups
critical, so in ``halo`` mode the coordinator waits for them and skips the others when late.

Per sync point the scorer is closed-form ridge regression ``xn -> log norms`` with an
intercept, optionally reduced-rank (``dim -> r -> n_groups``, the rank-r projection of the
ridge fit, Izenman 1975), so scoring is one or two tiny matmuls plus a partition: microseconds.
This is the linear analogue of Deja Vu's per-layer sparsity predictors (Liu et al., ICML 2023,
arXiv 2310.17157), which predict the contextual sparsity of heads and MLP neurons from the
layer input; the "semantic-aware predictor" and its use for relaxed synchronization are from
HALO (Zheng et al., INFOCOM 2026, arXiv 2601.11676, abstract).

Pure numpy: no torch. Calibration data comes from :mod:`halo_p2p.model.calibrate`.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from halo_p2p.errors import ConfigError, ModelFormatError
from halo_p2p.groups import ATTN, MLP, PARTS, GroupLayout
from halo_p2p.paths import user_cache_dir

__all__ = [
    "FORMAT_VERSION",
    "CalibrationSet",
    "Predictor",
    "PredictorPolicy",
    "default_predictor_path",
    "fit_predictor",
    "fit_ridge",
    "load_predictor_for",
    "recall_at_k",
    "shipped_predictor_path",
    "top_mass_share",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the ``.npz`` layout written by :meth:`Predictor.save`."""

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Ridge strengths tried per sync point, relative to the mean eigenvalue of ``X^T X``."""

_LOG_FLOOR = 1e-8
_PART_NAMES = {ATTN: "attn", MLP: "mlp"}


@dataclass(slots=True)
class CalibrationSet:
    """Inputs and labels of every sync point over ``T`` calibration tokens.

    Attributes:
        xn: per part, ``(n_layers, T, dim)`` float16: the normalized input of the sync point
            (``RMSNorm(x) * g``; for :data:`~halo_p2p.groups.MLP` that is ``hn``).
        norms: per part, ``(n_layers, T, n_groups)`` float16: ``||partial_g||_2`` of each group
            (units of the residual stream).
        sequence_ids: ``(T,)`` int32, which calibration sequence each token belongs to (for
            splitting by sequence, never inside one).
        layout: the group layout the labels were computed with.
    """

    xn: tuple[np.ndarray, np.ndarray]
    norms: tuple[np.ndarray, np.ndarray]
    sequence_ids: np.ndarray
    layout: GroupLayout

    @property
    def n_tokens(self) -> int:
        return int(self.sequence_ids.shape[0])

    def subset(self, tokens: np.ndarray) -> CalibrationSet:
        """The tokens selected by ``tokens`` (a bool mask or an index array)."""
        # mypy: tuples built per part: mypy sees tuple[ndarray, ...], the field is a 2-tuple
        return CalibrationSet(tuple(a[:, tokens] for a in self.xn),        # type: ignore[arg-type]
                              # mypy: tuples built per part: mypy sees tuple[ndarray, ...], the field is a 2-tuple
                              tuple(a[:, tokens] for a in self.norms),     # type: ignore[arg-type]
                              self.sequence_ids[tokens], self.layout)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float, rank: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Ridge regression ``y ~ x @ W + b`` with an optional reduced-rank projection.

    ``W = (Xc^T Xc + lam I)^-1 Xc^T Yc`` on centered data, ``lam = alpha * trace(Xc^T Xc) / dim``.
    With ``rank = r < n_out`` the fit is projected onto the top-r right singular vectors ``V_r``
    of the fitted values (reduced-rank ridge): ``W_r = (W V_r) V_r^T``.

    Args:
        x: ``(T, dim)`` inputs (any float dtype; computed in float64).
        y: ``(T, n_out)`` targets.
        alpha: relative ridge strength, > 0.
        rank: inner rank, or ``None``/``>= n_out`` for the full map.
    Returns:
        ``(u, v, b)`` float32: ``u`` ``(dim, r)`` and ``v`` ``(r, n_out)`` (``v`` is ``None`` for a
        full-rank map, then ``u`` is ``W``), and the intercept ``b`` ``(n_out,)``.
    Raises:
        ValueError: fewer than two rows, or mismatched row counts.
    """
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x64.shape[0] < 2 or x64.shape[0] != y64.shape[0]:
        raise ValueError(f"ridge needs matching rows >= 2, got x {x64.shape} and y {y64.shape}")
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    lam = alpha * max(np.trace(gram) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)    # (dim, n_out)
    v = None
    if rank is not None and rank < w.shape[1]:
        _, _, vt = np.linalg.svd(xc @ w, full_matrices=False)
        v = vt[:rank]                                                     # (r, n_out)
        w = w @ v.T                                                       # (dim, r)
    b = my - (mx @ w if v is None else (mx @ w) @ v)
    return (w.astype(np.float32), None if v is None else v.astype(np.float32), b.astype(np.float32))


def _log_norms(norms: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(norms, np.float64), _LOG_FLOOR))


def _choose_alpha(x: np.ndarray, y: np.ndarray, train: np.ndarray, alphas: Sequence[float]) -> tuple[float, float]:
    """The alpha of lowest validation MSE (fit on ``train`` rows, validate on the others), and
    the validation recall at half the groups of that fit."""
    x64, y64 = np.asarray(x, np.float64), _log_norms(y)
    xt, yt, xv, yv = x64[train], y64[train], x64[~train], y64[~train]
    mx, my = xt.mean(0), yt.mean(0)
    xc = xt - mx
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    proj = evecs.T @ (xc.T @ (yt - my))                                   # (dim, n_out)
    scale = max(evals.sum() / len(evals), 1e-12)
    best, best_mse, best_pred = alphas[0], np.inf, yv
    for a in alphas:
        pred = (xv - mx) @ (evecs @ (proj / (np.maximum(evals, 0) + a * scale)[:, None])) + my
        mse = float(np.mean((pred - yv) ** 2))
        if mse < best_mse:
            best, best_mse, best_pred = a, mse, pred
    return best, recall_at_k(best_pred, yv, max(1, yv.shape[1] // 2))


def fit_predictor(data: CalibrationSet, *, model_sha256: str, rank: int | None = None,
                  alphas: Sequence[float] = DEFAULT_ALPHAS, val_fraction: float = 0.2,
                  metadata: dict[str, Any] | None = None) -> Predictor:
    """Fit one ridge scorer per sync point to ``log ||partial||``.

    The ridge strength of each sync point is chosen on the last ``val_fraction`` of the
    calibration sequences (whole sequences, so validation tokens share no context with
    training tokens), then the scorer is refit on all tokens.

    Args:
        data: calibration inputs and labels.
        model_sha256: hex SHA-256 of the model file the labels came from.
        rank: inner rank of the MLP/attention maps (``None``: full ridge).
        alphas: candidate relative ridge strengths.
        val_fraction: share of sequences used to choose alpha (0 uses ``alphas[0]``).
        metadata: JSON-serializable facts about the calibration (prompts, seed, text source).
    Returns:
        The fitted predictor.
    Raises:
        ValueError: fewer than two calibration tokens.
    """
    seqs = np.unique(data.sequence_ids)
    n_val = round(val_fraction * len(seqs)) if len(seqs) > 1 else 0
    train = ~np.isin(data.sequence_ids, seqs[len(seqs) - n_val:]) if n_val else None
    weights: dict[int, list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]] = {}
    chosen: dict[str, list[float]] = {}
    val_recall: dict[str, float] = {}
    label_mean: dict[str, list[list[float]]] = {}
    for part in PARTS:
        name = _PART_NAMES[part]
        weights[part], chosen[name], label_mean[name], recalls = [], [], [], []
        for layer in range(data.layout.n_layers):
            x, y = data.xn[part][layer], data.norms[part][layer]
            alpha, recall = _choose_alpha(x, y, train, alphas) if train is not None else (alphas[0], np.nan)
            chosen[name].append(alpha)
            recalls.append(recall)
            label_mean[name].append(np.round(_log_norms(y).mean(0), 4).tolist())
            weights[part].append(fit_ridge(x, _log_norms(y), alpha, rank))
        val_recall[name] = round(float(np.mean(recalls)), 4)
    meta = {"calibration_tokens": data.n_tokens, "calibration_sequences": len(seqs), "alphas": chosen,
            "rank": rank, "target": "log L2 norm of the group partial", "validation_sequences": n_val,
            "validation_recall_at_half": val_recall, "label_mean": label_mean, **(metadata or {})}
    log.info("fitted predictor on %d tokens (%d sequences), rank %s", data.n_tokens, len(seqs), rank)
    return Predictor(weights, layout=data.layout, model_sha256=model_sha256, metadata=meta)


@dataclass(eq=False)
class Predictor:
    """Per sync point linear scorers of group importance.

    Args:
        weights: per part, one ``(u, v, b)`` per layer (see :func:`fit_ridge`); scores are
            ``x @ u @ v + b`` (``x @ u + b`` when ``v`` is ``None``).
        layout: the group layout the scorer was fitted for.
        model_sha256: hex SHA-256 of the model file.
        metadata: JSON-serializable training facts, saved with the weights.
    """

    weights: dict[int, list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]]
    layout: GroupLayout
    model_sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def scores(self, layer: int, part: int, x: np.ndarray) -> np.ndarray:
        """Predicted ``log ||partial_g||`` of every group at (layer, part).

        Args:
            x: ``(T, dim)`` or ``(dim,)`` float32 normalized input of the sync point.
        Returns:
            float32 ``(T, n_groups)`` (or ``(n_groups,)`` for a 1-D ``x``).
        """
        u, v, b = self.weights[part][layer]
        h = np.asarray(x, np.float32) @ u
        return (h if v is None else h @ v) + b

    def check_layout(self, layout: GroupLayout) -> None:
        """Raise unless ``layout`` cuts the model into the groups this predictor scores.

        Raises:
            ConfigError: different layer count, width or group counts (e.g. another
                ``--mlp-group-size``).
        """
        mine = (self.layout.n_layers, self.layout.dim, self.layout.n_attn, self.layout.n_mlp)
        theirs = (layout.n_layers, layout.dim, layout.n_attn, layout.n_mlp)
        if mine != theirs:
            raise ConfigError(f"the predictor scores (layers, dim, attn, mlp groups) = {mine}, the session uses "
                              f"{theirs}", "recalibrate with the session's MLP group size (halo-peer calibrate)")

    def save(self, path: str | Path) -> None:
        """Write the predictor as ``.npz``: float16 weights, float32 intercepts, JSON metadata."""
        lay = self.layout
        meta = {"format_version": FORMAT_VERSION, "model_sha256": self.model_sha256,
                "layout": {"n_layers": lay.n_layers, "n_attn": lay.n_attn, "n_mlp": lay.n_mlp,
                           "mlp_group_size": lay.mlp_group_size, "q_per_kv": lay.q_per_kv,
                           "head_dim": lay.head_dim, "dim": lay.dim, "hidden_dim": lay.hidden_dim},
                "metadata": self.metadata}
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta, sort_keys=True))}
        for part in PARTS:
            name = _PART_NAMES[part]
            us, vs, bs = zip(*self.weights[part], strict=True)
            arrays[f"{name}_u"] = np.stack(us).astype(np.float16)
            arrays[f"{name}_b"] = np.stack(bs).astype(np.float32)
            if vs[0] is not None:
                arrays[f"{name}_v"] = np.stack(vs).astype(np.float16)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, allow_pickle=False, **arrays)
        os.replace(tmp, path)
        log.info("saved predictor for %s to %s", self.model_sha256[:12], path)

    @classmethod
    def load(cls, path: str | Path, *, model_sha256: str | None = None) -> Predictor:
        """Read a predictor written by :meth:`save`.

        Args:
            path: the ``.npz`` file.
            model_sha256: when given, the model the predictor must belong to.
        Raises:
            ModelFormatError: not a predictor file, or a format version this code cannot read.
            ConfigError: the file was calibrated for another model (``model_sha256`` differs).
            OSError: the file cannot be read.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:   # JSONDecodeError is a ValueError
            raise ModelFormatError(f"{path} is not a halo-p2p predictor file ({exc})",
                                   "delete it and recalibrate: halo-peer calibrate") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(f"{path} has predictor format {meta.get('format_version')}, this halo-p2p reads "
                                   f"{FORMAT_VERSION}", "recalibrate: halo-peer calibrate")
        if model_sha256 is not None and meta["model_sha256"] != model_sha256:
            raise ConfigError(f"predictor {path} was calibrated for model sha256 {meta['model_sha256'][:12]}…, "
                              f"not {model_sha256[:12]}…", "recalibrate for this model: halo-peer calibrate")
        layout = GroupLayout(**meta["layout"])
        weights: dict[int, list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]] = {}
        for part in PARTS:
            name = _PART_NAMES[part]
            u, b, v = arrays[f"{name}_u"], arrays[f"{name}_b"], arrays.get(f"{name}_v")
            if u.shape[0] != layout.n_layers or b.shape != (layout.n_layers, layout.n_groups(part)):
                raise ModelFormatError(f"{path}: {name} weights {u.shape} do not match the layout",
                                       "the file is corrupt; recalibrate")
            weights[part] = [(np.ascontiguousarray(u[i], np.float32),
                              None if v is None else np.ascontiguousarray(v[i], np.float32),
                              np.ascontiguousarray(b[i], np.float32)) for i in range(layout.n_layers)]
        return cls(weights, layout=layout, model_sha256=meta["model_sha256"], metadata=meta.get("metadata", {}))


def _k_of(critical: float | int, n: int) -> int:
    if isinstance(critical, int) and not isinstance(critical, bool):
        if critical < 0:
            raise ValueError(f"critical group count {critical} is negative")
        return min(critical, n)
    if not 0 <= critical <= 1:
        raise ValueError(f"critical fraction {critical} outside [0, 1]")
    return round(critical * n)


class PredictorPolicy:
    """:class:`~halo_p2p.session.criticality.CriticalityPolicy` from predicted group importance.

    At each sync point the groups are scored from the input ``xn`` and the ``k`` highest are
    critical (attention and MLP alike). For ``T > 1`` tokens a group's score is its maximum
    over the tokens.

    Args:
        predictor: the fitted scorer.
        critical: a float in [0, 1] (share of each sync point's groups, ``round(f * n)``) or an
            int ``k`` (groups per sync point, capped at ``n``).
        attn_critical: the same for attention groups only (default: ``critical``).
    Raises:
        ValueError: a fraction outside [0, 1] or a negative count.
    """

    def __init__(self, predictor: Predictor, critical: float | int = 0.5, *,
                 attn_critical: float | int | None = None) -> None:
        self.predictor = predictor
        lay = predictor.layout
        self.k = {ATTN: _k_of(critical if attn_critical is None else attn_critical, lay.n_attn),
                  MLP: _k_of(critical, lay.n_mlp)}
        self._all = {part: frozenset(range(lay.n_groups(part))) for part in PARTS}
        self._w = {(layer, part): (u, v, b[None, :]) for part in PARTS
                   for layer, (u, v, b) in enumerate(predictor.weights[part])}

    def critical(self, layer: int, part: int, x: np.ndarray) -> frozenset[int]:
        """Indices of the ``k`` groups of highest predicted importance at (layer, part).

        Costs a few microseconds (one or two small matmuls and an argsort), so it may run on
        the event loop.

        Args:
            x: ``(T, dim)`` float32 normalized input.
        """
        k = self.k[part]
        every = self._all[part]
        n = len(every)
        if k >= n:
            return every
        if k == 0:
            return frozenset()
        u, v, b = self._w[(layer, part)]
        h = x @ u                                   # 2-D matmul: BLAS even for one row
        s = (h if v is None else h @ v) + b         # (T, n)
        row = s[0] if s.shape[0] == 1 else s.max(axis=0)
        return frozenset(np.argsort(row)[n - k:].tolist())


def recall_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the true top-``k`` groups that are in the predicted top-``k``.

    Args:
        scores: ``(T, n)`` predicted importance (any monotone scale).
        truth: ``(T, n)`` true importance (e.g. partial norms).
        k: groups kept, ``1 <= k <= n``.
    Returns:
        Recall in [0, 1], averaged over tokens; a random ranking scores ``k / n`` in expectation.
    Raises:
        ValueError: ``k`` outside ``[1, n]``.
    """
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    pred = np.argpartition(-np.asarray(scores, np.float64), k - 1, axis=1)[:, :k]
    true = np.argpartition(-np.asarray(truth, np.float64), k - 1, axis=1)[:, :k]
    hit = (pred[:, :, None] == true[:, None, :]).any(-1).sum(1)
    return float(hit.mean() / k)


def top_mass_share(norms: np.ndarray, fraction: float = 0.25) -> float:
    """Sparsity: mean share of the summed partial norms carried by the top ``fraction`` groups.

    Args:
        norms: ``(..., T, n)`` partial norms.
        fraction: share of groups counted (``max(1, round(fraction * n))`` groups).
    Returns:
        In [fraction-ish, 1]: ``fraction`` means no concentration, 1 full concentration.
    """
    a = np.sort(np.asarray(norms, np.float64), axis=-1)[..., ::-1]
    k = max(1, round(fraction * a.shape[-1]))
    return float((a[..., :k].sum(-1) / np.maximum(a.sum(-1), 1e-30)).mean())


def default_predictor_path(model_sha256: str) -> Path:
    """Where ``halo-peer calibrate`` saves the predictor of a model: the user cache.

    ``$XDG_CACHE_HOME/halo-p2p/predictors/<sha256>.npz`` (``~/.cache`` when ``XDG_CACHE_HOME``
    is unset, empty or relative: :func:`halo_p2p.paths.user_cache_dir`). The folder is not
    created here.
    """
    return user_cache_dir() / "predictors" / f"{model_sha256}.npz"


def shipped_predictor_path(model_sha256: str) -> Path:
    """The predictor shipped in the package data for a model (it may not exist)."""
    return Path(str(resources.files("halo_p2p.model").joinpath("data", "predictors", f"{model_sha256}.npz")))


def load_predictor_for(model_sha256: str) -> Predictor | None:
    """The predictor of a model: the user cache first, then the shipped package data.

    Returns:
        The predictor, or ``None`` when neither location has one (callers fall back to
        :class:`~halo_p2p.session.criticality.StaticRule`).
    Raises:
        ModelFormatError: a file exists but is corrupt or of an unknown format version.
        ConfigError: a file exists but records another model's sha256.
    """
    for path in (default_predictor_path(model_sha256), shipped_predictor_path(model_sha256)):
        if path.is_file():
            log.info("using predictor %s", path)
            return Predictor.load(path, model_sha256=model_sha256)
    log.info("no predictor for model %s", model_sha256[:12])
    return None
