"""Calibration of the criticality predictor, and forwards with neuron groups dropped.

:func:`group_forward` runs the whole model block by block as the sum of its neuron-group
partials (:meth:`~halo_p2p.model.llama.AttentionShard.partials`,
:meth:`~halo_p2p.model.llama.MlpShard.partials`), so that at every sync point (layer, part) a
callback sees the normalized input ``xn`` and the true per-group partial norms, and may drop
(zero) any group's partial per token — exactly what ``halo`` mode does to a skipped group. A
dropped attention group still wrote its keys and values (its worker received the input), so
only its output is lost, as on the wire.

:func:`collect` records the predictor's inputs and labels; :func:`run_calibration` is the one
call behind ``halo-peer calibrate``; :func:`self_generated_corpus` samples the default
calibration text from the model itself. References: HALO (Zheng et al., INFOCOM 2026, arXiv
2601.11676, abstract) for the semantic-aware predictor; Deja Vu (Liu et al., ICML 2023, arXiv
2310.17157) for per-layer predictors trained on the model's own activations.
"""

from __future__ import annotations

import ast
import copy
import logging
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from halo_p2p.groups import ATTN, PARTS, GroupLayout
from halo_p2p.model.chat import ChatTemplate, Message
from halo_p2p.model.llama import Llama, linear, rms_norm
from halo_p2p.model.source import TensorSource
from halo_p2p.model.tokenizer import Tokenizer
from halo_p2p.predictor import CalibrationSet, Predictor, fit_predictor
from halo_p2p.sampling import Sampler, SamplingParams

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_SEED",
    "GroupSelect",
    "collect",
    "default_corpus",
    "group_forward",
    "run_calibration",
    "self_generated_corpus",
    "split_windows",
    "stdlib_docstrings",
]

log = logging.getLogger(__name__)

GroupSelect = Callable[[int, int, np.ndarray, np.ndarray], "np.ndarray | None"]
"""``select(layer, part, xn, norms) -> keep``: ``xn`` ``(T, dim)`` float32, ``norms`` ``(T, n_groups)``
float32 true partial norms; returns a ``(T, n_groups)`` bool mask of the groups to keep, or
``None`` to keep all."""

DEFAULT_PROMPTS = (
    "Once upon a time",
    "Explain how a bicycle works.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle to a ten-year-old.",
    "Write a Python function that checks whether a number is prime.",
    "What happened during the French Revolution?",
    "List some tips for a job interview.",
    "Tell me a story about a dragon who was afraid of the dark.",
    "How do vaccines train the immune system?",
    "Summarize the rules of chess.",
)
"""Diverse prompts of the self-generated calibration text (chat turns for a chat model)."""

DOCSTRING_MODULES = ("argparse", "functools", "pathlib", "subprocess", "tarfile", "textwrap", "shutil",
                     "datetime", "inspect", "logging/__init__", "contextlib", "typing")
"""Standard-library modules whose docstrings are the package-shipped calibration text (never
``pydoc_data``, which holds the held-out text of the benchmarks)."""

DEFAULT_SEED = 1234
"""Sampling seed of the self-generated calibration text (prompt ``i`` uses ``seed + i``)."""


def _mlp_regrouped(model: Llama, group_size: int) -> list[Any]:
    """Shallow copies of each block's MlpShard (weights shared) cut into ``group_size`` blocks."""
    shards = []
    for block in model.blocks:
        shard = copy.copy(block.mlp)
        shard.group_size = group_size
        shards.append(shard)
    return shards


@torch.inference_mode()
def group_forward(model: Llama, layout: GroupLayout, token_ids: Sequence[int], *,
                  select: GroupSelect | None = None, all_logits: bool = True) -> np.ndarray:
    """Forward ``T`` tokens from position 0 as sums of group partials, with optional dropping.

    Every token of the window is processed at once (causal attention), which equals decoding
    them one by one: the keep mask of token ``t`` at a sync point only depends on token ``t``'s
    input there, and later tokens see the resulting keys and values.

    Args:
        model: the whole model (its KV cache is overwritten from position 0).
        layout: the group layout (its ``mlp_group_size`` sets the MLP groups).
        token_ids: ``(T,)`` ids, ``T <= model.max_seq_len``.
        select: called at each sync point; see :data:`GroupSelect`.
        all_logits: return the logits of every position, else only the last.
    Returns:
        float32 logits ``(T, vocab)`` or ``(1, vocab)``.
    Raises:
        ValueError: ``T`` is 0 or exceeds the KV cache, or a mask of the wrong shape.
    """
    t = len(token_ids)
    if t == 0 or t > model.max_seq_len:
        raise ValueError(f"{t} tokens do not fit a cache of {model.max_seq_len}")
    eps = model.config.norm_eps
    mlps = _mlp_regrouped(model, layout.mlp_group_size)
    x = model.tok_embeddings[torch.from_numpy(np.asarray(token_ids, dtype=np.int64))].float()   # (T, dim)
    for layer, (block, cache) in enumerate(zip(model.blocks, model.caches, strict=True)):
        for part in PARTS:
            if part == ATTN:
                xn = rms_norm(x, block.attention_norm, eps)
                partials = block.attention.partials(block.attention.heads(xn, 0, cache, model.rope))
            else:
                xn = rms_norm(x, block.ffn_norm, eps)
                partials = mlps[layer].partials(mlps[layer].hidden(xn))                      # (G, T, dim)
            if select is None:
                x = x + partials.sum(0)
                continue
            norms = torch.linalg.vector_norm(partials, dim=-1).T                             # (T, G)
            keep = select(layer, part, xn.numpy(), norms.numpy())
            if keep is None:
                x = x + partials.sum(0)
                continue
            if keep.shape != norms.shape:
                raise ValueError(f"keep mask {keep.shape} at layer {layer} part {part}, expected {tuple(norms.shape)}")
            x = x + torch.einsum("gtd,tg->td", partials, torch.from_numpy(keep.astype(np.float32)))
    if not all_logits:
        x = x[-1:]
    return linear(rms_norm(x, model.norm, eps), model.output).numpy()


def split_windows(token_ids: Sequence[int] | Sequence[Sequence[int]], window: int) -> list[list[int]]:
    """Cut ids into sequences of at most ``window`` ids (each later run from position 0).

    Args:
        token_ids: one flat id sequence, or a list of sequences (each is cut separately).
        window: the longest sequence, >= 2.
    Returns:
        Non-empty sequences of >= 2 ids (shorter tails are dropped).
    """
    if window < 2:
        raise ValueError(f"window of {window} tokens; use 2 or more")
    if token_ids and not isinstance(token_ids[0], int | np.integer):
        seqs = [list(cast(Sequence[int], s)) for s in token_ids]
    else:
        seqs = [list(cast(Sequence[int], token_ids))]
    out = [s[i:i + window] for s in seqs for i in range(0, len(s), window)]
    return [[int(i) for i in s] for s in out if len(s) >= 2]


def collect(model: Llama, layout: GroupLayout, sequences: Sequence[Sequence[int]]) -> CalibrationSet:
    """Record every sync point's input and per-group partial norms over some sequences.

    Args:
        model: the whole model.
        layout: the group layout of the labels.
        sequences: id sequences, each ``<= model.max_seq_len`` (see :func:`split_windows`).
    Returns:
        The calibration set, ``xn`` and ``norms`` stored as float16 (``xn`` clipped to the
        float16 range).
    Raises:
        ValueError: no sequence, or one longer than the cache.
    """
    if not sequences:
        raise ValueError("no calibration tokens")
    xs: dict[int, list[list[np.ndarray]]] = {p: [[] for _ in range(layout.n_layers)] for p in PARTS}
    ns: dict[int, list[list[np.ndarray]]] = {p: [[] for _ in range(layout.n_layers)] for p in PARTS}

    def record(layer: int, part: int, xn: np.ndarray, norms: np.ndarray) -> None:
        xs[part][layer].append(np.clip(xn, -65000, 65000).astype(np.float16))
        ns[part][layer].append(norms.astype(np.float16))

    for seq in sequences:
        group_forward(model, layout, seq, select=record, all_logits=False)
    seq_ids = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(sequences)])
    xn = tuple(np.stack([np.concatenate(xs[p][layer]) for layer in range(layout.n_layers)]) for p in PARTS)
    norms = tuple(np.stack([np.concatenate(ns[p][layer]) for layer in range(layout.n_layers)]) for p in PARTS)
    log.info("collected %d tokens in %d sequences", len(seq_ids), len(sequences))
    # mypy: tuples built per part: mypy sees tuple[ndarray, ...], the field is a 2-tuple
    return CalibrationSet(xn, norms, seq_ids, layout)                                           # type: ignore[arg-type]


def run_calibration(source: TensorSource, token_ids: Sequence[int] | Sequence[Sequence[int]], *,
                    model_sha256: str, rank: int | None = None, mlp_group_size: int | None = None,
                    window: int = 512, metadata: dict[str, Any] | None = None) -> Predictor:
    """Calibrate a predictor for a model on some text: the one call behind ``halo-peer calibrate``.

    Runs the model over the ids (cut into windows of ``window`` tokens), records each sync
    point's input and group partial norms (:func:`collect`) and fits the ridge scorers
    (:func:`~halo_p2p.predictor.fit_predictor`). A few thousand tokens take minutes on 2 cores
    for a 135M model. The caller saves it, e.g. to
    :func:`~halo_p2p.predictor.default_predictor_path` ``(model_sha256)``.

    Args:
        source: the model weights.
        token_ids: calibration ids, flat or as separate sequences (e.g. tokenized text files).
        model_sha256: hex SHA-256 of the model file (recorded, checked when loading).
        rank: inner rank of the scorers (``None``: full ridge).
        mlp_group_size: neurons per MLP group (default: the layout default, as in sessions).
        window: longest sequence run at once (tokens; capped at the model's context).
        metadata: extra JSON-serializable facts saved with the predictor.
    Returns:
        The fitted predictor.
    Raises:
        ValueError: fewer than two usable ids.
        ConfigError: ``mlp_group_size`` does not divide the MLP width.
    """
    layout = GroupLayout.from_config(source.config, mlp_group_size)
    window = min(window, source.config.max_seq_len)
    sequences = split_windows(token_ids, window)
    if not sequences:
        raise ValueError("calibration needs at least two token ids")
    model = Llama(source, max_seq_len=max(len(s) for s in sequences))
    data = collect(model, layout, sequences)
    return fit_predictor(data, model_sha256=model_sha256, rank=rank,
                         metadata={"window": window, **(metadata or {})})


@torch.inference_mode()
def self_generated_corpus(model: Llama, tokenizer: Tokenizer, *, chat_template: ChatTemplate | None = None,
                          prompts: Sequence[str] = DEFAULT_PROMPTS, tokens_per_prompt: int = 256,
                          seed: int = DEFAULT_SEED, temperature: float = 0.8, top_p: float = 0.95
                          ) -> list[list[int]]:
    """Calibration text sampled from the model itself, one sequence per prompt.

    Each prompt (rendered as a user turn when ``chat_template`` is given) is continued with
    temperature/top-p sampling, seeded ``seed + i`` for prompt ``i``, until ``tokens_per_prompt``
    ids or a stop id. A stop id ends the sequence; for models with short outputs (e.g. the
    260K TinyStories model) the prompt is restarted within the same sequence until it is full.

    Args:
        model: the whole model.
        tokenizer: encodes prompts, names stop ids.
        chat_template: renders prompts as chat turns (instruct models).
        prompts: the prompts.
        tokens_per_prompt: ids per sequence, prompt included (capped at the cache length).
        seed, temperature, top_p: sampling settings.
    Returns:
        One id list per prompt (prompt ids included).
    """
    out: list[list[int]] = []
    limit = min(tokens_per_prompt, model.max_seq_len)
    for i, prompt in enumerate(prompts):
        text = chat_template.render([Message("user", prompt)]) if chat_template else prompt
        prompt_ids = tokenizer.encode(text)
        sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed + i))
        seq: list[int] = []
        while len(seq) + len(prompt_ids) < limit:
            start = len(seq)
            seq += prompt_ids
            logits = model.forward(np.asarray(prompt_ids), start)
            while len(seq) < limit:
                token = sampler(logits[-1])
                if token in tokenizer.stop_ids:
                    break
                seq.append(token)
                if len(seq) < limit:
                    logits = model.forward(np.asarray([token]), len(seq) - 1)
            if chat_template is not None:
                break
        out.append(seq[:limit])
        log.info("calibration prompt %d: %d ids", i, len(out[-1]))
    return out


def stdlib_docstrings(modules: Sequence[str] = DOCSTRING_MODULES, *, min_chars: int = 80) -> list[str]:
    """Docstrings of standard-library modules, classes and functions, one text per module.

    Read from the source files of the running Python with :mod:`ast` (nothing is imported),
    in :func:`ast.walk` order, so the text is reproducible for a Python version.

    Args:
        modules: module paths relative to the stdlib folder, without ``.py``.
        min_chars: skip shorter docstrings (one-liners).
    Returns:
        Per module, its whitespace-normalized docstrings joined by blank lines.
    Raises:
        ValueError: a module of ``pydoc_data`` (reserved for held-out evaluation).
        OSError: a module file is missing.
    """
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for mod in modules:
        if mod.startswith("pydoc_data"):
            raise ValueError("pydoc_data is the held-out evaluation text; do not calibrate on it")
        tree = ast.parse((lib / f"{mod}.py").read_text(encoding="utf-8"))
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(" ".join(doc.split()))
        texts.append("\n\n".join(docs))
    return texts


def default_corpus(model: Llama, tokenizer: Tokenizer, *, chat_template: ChatTemplate | None = None,
                   tokens_per_prompt: int = 256, doc_tokens_per_module: int = 256,
                   seed: int = DEFAULT_SEED) -> tuple[list[list[int]], dict[str, Any]]:
    """The default calibration text: self-generated answers plus standard-library docstrings.

    :func:`self_generated_corpus` over :data:`DEFAULT_PROMPTS` (sampling at temperature 0.8,
    top-p 0.95, seed ``seed + i``), then the first ``doc_tokens_per_module`` ids of each module's
    :func:`stdlib_docstrings` (:data:`DOCSTRING_MODULES`): about 6k ids, minutes on 2 cores.

    Returns:
        ``(sequences, metadata)``: id sequences and a JSON-serializable description of them.
    """
    generated = self_generated_corpus(model, tokenizer, chat_template=chat_template,
                                      tokens_per_prompt=tokens_per_prompt, seed=seed)
    docs = [tokenizer.encode(text)[:doc_tokens_per_module] for text in stdlib_docstrings()]
    docs = [d for d in docs if len(d) >= 2]
    meta = {"text": "self-generated + stdlib docstrings", "prompts": list(DEFAULT_PROMPTS), "seed": seed,
            "temperature": 0.8, "top_p": 0.95, "tokens_per_prompt": tokens_per_prompt,
            "chat_template": chat_template is not None, "generated_tokens": sum(map(len, generated)),
            "docstring_modules": list(DOCSTRING_MODULES), "docstring_tokens": sum(map(len, docs)),
            "python": sysconfig.get_python_version()}
    return generated + docs, meta
