"""The llama2.c tokenizer: ``tokenizer.bin`` files such as ``tok512.bin``.

File format (little-endian, as written by llama2.c ``tokenizer.py``)::

    int32 max_token_length
    vocab_size times: float32 score, int32 length, ``length`` bytes of the token's text

Ids 0, 1 and 2 are ``<unk>``, BOS and EOS; ids 3..258 are the byte-fallback tokens
``<0x00>``..``<0xFF>``. Encoding and decoding reproduce ``encode`` and ``decode`` of
llama2.c ``run.c``, including its quirks (a dummy-prefix space token, greedy merging of the
highest-scoring adjacent pair, and dropping the leading space of the piece that follows BOS).
"""

from __future__ import annotations

import heapq
import logging
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from halo_p2p.errors import ModelFormatError, ModelNotFound, TokenizerError

__all__ = ["Llama2cTokenizer"]

log = logging.getLogger(__name__)

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # id of <0x00>; byte b is id b + 3
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_HEADER = struct.Struct("<i")
_RECORD = struct.Struct("<fi")
_NO_SCORE = -1e10  # run.c's initial best_score: pairs scoring at or below it never merge


@dataclass(eq=False)
class Llama2cTokenizer:
    """A llama2.c SentencePiece-style BPE vocabulary (implements :class:`Tokenizer`).

    Build it with :meth:`open`. Generation stops at EOS *and* at BOS: run.c's ``generate``
    ends the loop when it samples BOS (id 1), the separator between TinyStories stories, so
    ``stop_ids`` holds both.

    Attributes:
        pieces: raw bytes of each token's text, by id (``<0xXX>`` for byte tokens).
        scores: merge score of each token, by id (higher merges first).
        max_token_length: longest piece in bytes, from the file header.
        add_bos: whether :meth:`encode` prepends BOS by default (run.c encodes with bos=1).
        vocab_size: number of ids.
        bos_id: 1. eos_id: 2.
        stop_ids: ``{bos_id, eos_id}``.
    """

    pieces: list[bytes] = field(repr=False)
    scores: list[float] = field(repr=False)
    max_token_length: int
    add_bos: bool = True
    vocab_size: int = field(init=False)
    bos_id: int | None = field(init=False, default=BOS_ID)
    eos_id: int | None = field(init=False, default=EOS_ID)
    stop_ids: frozenset[int] = field(init=False, default=frozenset({BOS_ID, EOS_ID}))

    def __post_init__(self) -> None:
        self.vocab_size = len(self.pieces)
        self._lookup: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._lookup.setdefault(piece, i)  # first id wins for duplicate pieces
        self._text: list[bytes] = []  # what each id decodes to
        for i, piece in enumerate(self.pieces):
            m = _BYTE_PIECE.fullmatch(piece)
            self._text.append(b"" if i <= EOS_ID else bytes([int(m[1], 16)]) if m else piece)
        space = self._lookup.get(b" ")  # run.c assumes " " is a token; else use its byte id
        self._prefix = [space] if space is not None else [ord(" ") + BYTE_OFFSET]

    @classmethod
    def open(cls, path: str | Path, vocab_size: int | None = None) -> Llama2cTokenizer:
        """Read a llama2.c ``tokenizer.bin`` (run.c ``build_tokenizer``).

        Args:
            path: the tokenizer file.
            vocab_size: number of tokens the model expects; ``None`` accepts the file's count.

        Returns:
            The tokenizer.

        Raises:
            ModelNotFound: ``path`` does not exist.
            ModelFormatError: the file is truncated, garbled, lacks the 256 byte-fallback
                tokens, or holds a different number of tokens than ``vocab_size``.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelNotFound(f"tokenizer file {path} does not exist",
                                "pass --tokenizer PATH to a llama2.c tokenizer.bin") from None
        except IsADirectoryError:
            raise ModelNotFound(f"tokenizer path {path} is a directory",
                                "pass --tokenizer PATH to a llama2.c tokenizer.bin") from None
        fix = "replace it with an intact llama2.c tokenizer.bin (re-download or reinstall it)"
        if len(data) < _HEADER.size:
            raise ModelFormatError(f"tokenizer file {path} is truncated ({len(data)} bytes)", fix)
        (max_len,) = _HEADER.unpack_from(data, 0)
        if max_len <= 0:
            raise ModelFormatError(
                f"tokenizer file {path} has max_token_length={max_len}; it is not a llama2.c "
                "tokenizer", fix)
        pieces: list[bytes] = []
        scores: list[float] = []
        offset = _HEADER.size
        while offset < len(data):
            if offset + _RECORD.size > len(data):
                raise ModelFormatError(
                    f"tokenizer file {path} is truncated inside token {len(pieces)}", fix)
            score, length = _RECORD.unpack_from(data, offset)
            offset += _RECORD.size
            if not 0 < length <= max_len:
                raise ModelFormatError(
                    f"tokenizer file {path} is garbled: token {len(pieces)} has length "
                    f"{length} (max_token_length is {max_len})", fix)
            if offset + length > len(data):
                raise ModelFormatError(
                    f"tokenizer file {path} is truncated inside token {len(pieces)}", fix)
            pieces.append(data[offset:offset + length])
            scores.append(score)
            offset += length
        expected = [b"<0x%02X>" % b for b in range(256)]
        if pieces[BYTE_OFFSET:BYTE_OFFSET + 256] != expected:
            raise ModelFormatError(
                f"tokenizer file {path} lacks the byte-fallback tokens <0x00>..<0xFF> at ids "
                "3..258", fix)
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ModelFormatError(
                f"tokenizer file {path} has {len(pieces)} tokens but the model has a vocabulary "
                f"of {vocab_size}", "pass the model's own tokenizer with --tokenizer PATH")
        log.debug("read %d tokens from %s", len(pieces), path)
        return cls(pieces, scores, max_len)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Encode ``text`` as run.c ``encode(t, text, bos, eos=0, ...)`` does.

        A non-empty text gets the dummy-prefix token ``" "`` first; each UTF-8 character
        becomes its token, or its bytes' fallback ids (byte + 3); then the adjacent pair whose
        concatenation is a token with the highest score merges, leftmost first on ties, until
        no pair merges. A heap finds the same merges as run.c's quadratic loop in
        O(n log n). Markup such as ``<s>`` is plain text: no special ids come out of the text.

        Args:
            text: text to encode.
            add_bos: prepend BOS; ``None`` uses :attr:`add_bos`.

        Returns:
            Token ids.

        Raises:
            TokenizerError: ``text`` holds an unpaired surrogate, which has no UTF-8 form.
        """
        bos = [BOS_ID] if (self.add_bos if add_bos is None else add_bos) else []
        if not text:
            return bos
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"cannot encode {text[e.start:e.end]!r} as UTF-8",
                                 "remove unpaired surrogates from the text") from None
        ids = bos + self._prefix
        for ch in text:  # one UTF-8 character at a time, as run.c groups continuation bytes
            raw = ch.encode("utf-8")
            tid = self._lookup.get(raw)
            ids.extend([tid] if tid is not None else [b + BYTE_OFFSET for b in raw])
        return self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply run.c's merge loop to ``ids`` using a heap of candidate pairs."""
        pieces, scores, lookup = self.pieces, self.scores, self._lookup
        n = len(ids)
        tok = list(ids)                   # tok[i] == -1: node i merged into its left neighbour
        nxt = list(range(1, n + 1))       # nxt[i] == n: no right neighbour
        prv = list(range(-1, n - 1))
        # (-score, left node, left id, right id, merged id): pops the best, leftmost pair
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                mid = lookup.get(pieces[tok[i]] + pieces[tok[j]])
                if mid is not None and scores[mid] > _NO_SCORE:
                    heapq.heappush(heap, (-scores[mid], i, tok[i], tok[j], mid))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, mid = heapq.heappop(heap)
            j = nxt[i]
            if tok[i] != left or j >= n or tok[j] != right:
                continue  # stale: one side has merged since this pair was pushed
            tok[i] = mid
            tok[j] = -1
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [t for t in tok if t >= 0]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids as run.c ``decode(prev, token)`` applied along ``ids``.

        A piece that follows BOS loses its leading space (the dummy prefix), ``<0xXX>`` pieces
        are raw bytes, BOS/EOS/UNK decode to nothing, and the joined bytes are decoded as UTF-8
        with U+FFFD for invalid sequences. The first id has no predecessor, so it keeps its
        space; ``decode(encode(text))`` therefore equals ``text``.

        Args:
            ids: token ids, each in ``range(vocab_size)``.

        Returns:
            The text.

        Raises:
            TokenizerError: an id is out of range.
        """
        out = bytearray()
        prev = -1
        for tid in ids:
            if not 0 <= tid < self.vocab_size:
                raise TokenizerError(f"token id {tid} is outside the vocabulary of "
                                     f"{self.vocab_size}", "use ids produced by this model")
            # run.c tests the raw piece, so a <0x20> byte token after BOS keeps its space
            strip = prev == BOS_ID and self.pieces[tid][:1] == b" "
            out += self._text[tid][1:] if strip else self._text[tid]
            prev = tid
        return out.decode("utf-8", errors="replace")
