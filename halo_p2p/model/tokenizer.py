"""Tokenizer seam and the streaming text decoder shared by every tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["StreamDecoder", "Tokenizer"]


class Tokenizer(Protocol):
    """Text <-> token ids for one model.

    Attributes:
        vocab_size: number of ids.
        bos_id: beginning-of-sequence id, or ``None``.
        eos_id: end-of-sequence id, or ``None``.
        stop_ids: ids that end generation (EOS; llama2.c models also stop at BOS, as run.c does).
        add_bos: whether prompts start with BOS (from the model metadata).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    add_bos: bool

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Encode ``text``; ``add_bos=None`` follows the model's own setting.

        Special-token markup in ``text`` (e.g. ``<|im_start|>``) becomes the special ids.
        """
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Decode a whole sequence of ids to text (special tokens dropped)."""
        ...


class StreamDecoder:
    """Turns a growing id sequence into text increments, never splitting a UTF-8 character.

    It re-decodes the ids since the last emitted boundary and emits only the new suffix, and it
    holds back text that ends in U+FFFD (an incomplete multi-byte character) until the next id
    completes it.

    Args:
        tokenizer: the model's tokenizer.
        prefix: ids already in the context (e.g. the prompt), so that context-dependent
            decoding (a leading space after BOS) matches a whole-sequence decode.
    """

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prefix)
        self._start = len(self._ids)          # ids from here on are not fully emitted
        self._emitted = ""                    # text of ids[_ctx:_start+...] already emitted
        self._ctx = max(0, len(self._ids) - 1)  # one id of left context

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        base = self._tok.decode(self._ids[self._ctx:self._start])
        full = self._tok.decode(self._ids[self._ctx:])
        if full.endswith("\ufffd"):
            return ""
        new = full[len(base):] if full.startswith(base) else full
        text = new[len(self._emitted):] if new.startswith(self._emitted) else new
        self._emitted = new
        if len(self._ids) - self._start > 16:  # keep the re-decode window short
            self._ctx = len(self._ids) - 1
            self._start = len(self._ids)
            self._emitted = ""
        return text
