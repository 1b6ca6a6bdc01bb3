"""Open a model by name or path: weights, tokenizer and chat template together."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from halo_p2p.model.chat import ChatTemplate
from halo_p2p.model.gguf import GgufModel
from halo_p2p.model.llama2c import Llama2cModel
from halo_p2p.model.llama2c_tokenizer import Llama2cTokenizer
from halo_p2p.model.registry import ModelRef, resolve
from halo_p2p.model.source import TensorSource
from halo_p2p.model.tokenizer import Tokenizer

__all__ = ["LoadedModel", "open_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to run: its weights source (lazy), tokenizer and chat template (if any)."""

    name: str
    path: Path
    source: TensorSource
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None


def open_model(spec: str, *, tokenizer_path: str | Path | None = None) -> LoadedModel:
    """Resolve ``spec`` (a known model name or a file path) and open it.

    Raises:
        ModelNotFound: unknown name, not-yet-pulled model or missing file.
        ModelFormatError: truncated or corrupt file.
        UnsupportedModel: architecture or tensor type not implemented.
    """
    ref: ModelRef = resolve(spec, tokenizer_path=tokenizer_path)
    if ref.format == "gguf":
        gguf = GgufModel.open(ref.path)
        template = ChatTemplate(gguf.chat_template) if gguf.chat_template else None
        return LoadedModel(ref.name, ref.path, gguf, gguf.tokenizer(), template)
    source = Llama2cModel.open(ref.path)
    assert ref.tokenizer_path is not None  # resolve() finds it or raises
    tokenizer = Llama2cTokenizer.open(ref.tokenizer_path, vocab_size=source.config.vocab_size)
    return LoadedModel(ref.name, ref.path, source, tokenizer, None)
