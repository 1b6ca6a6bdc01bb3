"""The tokenizer embedded in a GGUF file (``tokenizer.ggml.*``), built with ``tokenizers``.

Two GGUF tokenizer models are read, following llama.cpp ``src/llama-vocab.cpp``:

- ``gpt2``: byte-level BPE from ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges``, split
  first by the regexes llama.cpp uses for ``tokenizer.ggml.pre`` (SmolLM2: ``smollm``).
- ``llama``: SentencePiece-style BPE from the tokens and their ``tokenizer.ggml.scores`` (the
  highest-scoring adjacent pair merges first), a ``▁`` space prefix and ``<0xXX>`` byte
  fallback, as used by Llama-2 and TinyLlama GGUFs.

Control, user-defined and unknown tokens (``tokenizer.ggml.token_type`` 3, 4, 2) are special:
their text in the input encodes to their id, and :meth:`GgufTokenizer.decode` drops them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from halo_p2p.errors import TokenizerError, UnsupportedModel

__all__ = ["GgufTokenizer"]

log = logging.getLogger(__name__)

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama_token_type in llama.cpp
_FIX = "use a GGUF converted with its tokenizer by llama.cpp's convert_hf_to_gguf.py"

# Pre-tokenizer regexes per tokenizer.ggml.pre, as in llama.cpp's llm_tokenizer_bpe.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), (r"\p{N}", _GPT2)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"),
                    (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "stablelm2"), (_QWEN2,)),
}
# llama.cpp matches whole words against the vocab first and adds BOS by default for these.
_LLAMA3_FAMILY = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})


class GgufTokenizer:
    """Text <-> token ids for a GGUF model; implements :class:`~halo_p2p.model.tokenizer.Tokenizer`.

    Build it with :meth:`from_metadata` (or ``GgufModel.tokenizer()``).

    Attributes:
        vocab_size: number of ids (length of ``tokenizer.ggml.tokens``).
        bos_id: ``tokenizer.ggml.bos_token_id``, or ``None``.
        eos_id: ``tokenizer.ggml.eos_token_id``, or ``None``.
        stop_ids: EOS plus ``tokenizer.ggml.eot_token_id`` when present.
        add_bos: ``tokenizer.ggml.add_bos_token``; default False for ``gpt2`` (True for the
            llama3 pre-tokenizer family) and True for ``llama``, as in llama.cpp.
    """

    def __init__(self, hf: HfTokenizer, *, vocab_size: int, bos_id: int | None,
                 eos_id: int | None, stop_ids: frozenset[int], add_bos: bool) -> None:
        self._hf = hf
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id
        self.stop_ids, self.add_bos = stop_ids, add_bos

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], *, source: str = "the GGUF file"
                      ) -> GgufTokenizer:
        """Build the tokenizer from decoded GGUF metadata.

        Args:
            meta: the key/value section (``GgufModel.metadata``).
            source: the file, named in error messages.

        Raises:
            TokenizerError: a ``tokenizer.ggml.*`` key is missing, mistyped or out of range.
            UnsupportedModel: ``tokenizer.ggml.model`` is neither ``gpt2`` nor ``llama``.
        """
        t0 = time.perf_counter()
        kind = meta.get("tokenizer.ggml.model")
        tokens = _list(meta, "tokenizer.ggml.tokens", str, source)
        types = _list(meta, "tokenizer.ggml.token_type", int, source, len(tokens))
        n = len(tokens)
        ids = {k: _token_id(meta, f"tokenizer.ggml.{k}_token_id", n, source)
               for k in ("bos", "eos", "eot", "unknown")}
        pre = meta.get("tokenizer.ggml.pre", "default")
        if kind == "gpt2":
            hf = _byte_level_bpe(tokens, _list(meta, "tokenizer.ggml.merges", str, source),
                                 str(pre), source)
            default_bos = pre in _LLAMA3_FAMILY
        elif kind == "llama":
            hf = _sentencepiece_bpe(tokens, _list(meta, "tokenizer.ggml.scores", float, source, n),
                                    ids["unknown"], meta.get("tokenizer.ggml.add_space_prefix", True)
                                    is not False, source)
            default_bos = True
        else:
            raise UnsupportedModel(f"tokenizer model {kind!r} of {source} is not supported",
                                   "use a GGUF whose tokenizer.ggml.model is gpt2 or llama")
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types)
                               if t in (_UNKNOWN, _CONTROL, _USER_DEFINED)])
        add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos) is True
        stop = frozenset(i for i in (ids["eos"], ids["eot"]) if i is not None)
        log.debug("built %s tokenizer of %s (%d tokens, pre %r) in %.3f s", kind, source, n, pre,
                  time.perf_counter() - t0)
        return cls(hf, vocab_size=n, bos_id=ids["bos"], eos_id=ids["eos"], stop_ids=stop,
                   add_bos=add_bos and ids["bos"] is not None)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Encode ``text``; special-token markup (``<|im_start|>``) becomes its id.

        Args:
            text: the input.
            add_bos: prepend BOS; ``None`` follows the model's ``add_bos``.
        """
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ``ids`` to text, dropping special tokens.

        Raises:
            TokenizerError: an id is outside ``[0, vocab_size)``.
        """
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is out of range (the vocabulary has "
                                 f"{self.vocab_size} ids)", "decode ids produced by this model")
        return self._hf.decode(ids, skip_special_tokens=True)


def _list(meta: Mapping[str, object], key: str, kind: type, source: str,
          length: int | None = None) -> list:
    value = meta.get(key)
    if value is None and length is not None and kind is int:
        return [1] * length  # no token types: all normal
    if not isinstance(value, list) or not value or not isinstance(value[0], kind) or (
            length is not None and len(value) != length):
        raise TokenizerError(f"{source} has no valid {key} (expected a list of {kind.__name__}"
                             + (f" of length {length})" if length is not None else ")"), _FIX)
    return value


def _token_id(meta: Mapping[str, object], key: str, n: int, source: str) -> int | None:
    value = meta.get(key)
    if value is not None and (not isinstance(value, int) or not 0 <= value < n):
        raise TokenizerError(f"{source} has {key}={value!r} but the vocabulary has {n} tokens",
                             _FIX)
    return value


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str, source: str) -> HfTokenizer:
    regexes = _PRE_REGEXES.get(pre)
    if regexes is None:
        log.warning("%s: unknown tokenizer.ggml.pre %r; splitting with the GPT-2 regex",
                    source, pre)
        regexes = (_GPT2,)
    if any(" " not in m for m in merges):
        raise TokenizerError(f"{source} has a tokenizer.ggml.merges entry without a space", _FIX)
    try:
        pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
        hf = HfTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs,
                                    ignore_merges=pre in _LLAMA3_FAMILY))
    except Exception as e:  # tokenizers raises plain Exception for merges outside the vocab
        raise TokenizerError(f"{source} has an inconsistent BPE vocabulary: {e}", _FIX) from None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens: list[str], scores: list[float], unk_id: int | None,
                       add_space_prefix: bool, source: str) -> HfTokenizer:
    """BPE whose merge ranks follow the merged piece's score, like llama.cpp's llm_tokenizer_spm."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None else None
    try:
        hf = HfTokenizer(models.BPE(vocab, [(r[3], r[4]) for r in ranked], unk_token=unk,
                                    fuse_unk=True, byte_fallback="<0x00>" in vocab))
    except Exception as e:  # see _byte_level_bpe
        raise TokenizerError(f"{source} has an inconsistent SentencePiece vocabulary: {e}",
                             _FIX) from None
    prefix = [normalizers.Prepend("▁")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), *strip])
    return hf
