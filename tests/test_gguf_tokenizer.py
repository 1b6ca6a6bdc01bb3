"""GgufTokenizer: SmolLM2 against its reference tokenizer.json, synthetic BPE and SentencePiece
vocabularies, and bad metadata."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import pytest
import tokenizers
from tokenizers import pre_tokenizers

import halo_p2p
from halo_p2p.errors import TokenizerError, UnsupportedModel
from halo_p2p.model.gguf import GgufModel
from halo_p2p.model.gguf_tokenizer import GgufTokenizer
from halo_p2p.model.tokenizer import StreamDecoder

TOK512 = Path(halo_p2p.__file__).parent / "model/data/stories260K/tok512.bin"

STRINGS = ["2024 was 12345", "café naïve", "<|im_start|>user\nHi<|im_end|>\n",
           "emoji 😀🎉👍🏽 ok", "a   b\t\tc\n\n\n d  ", "Hello, world! It's 3.14159 -- don't",
           "²³ ٣ Ⅻ x", "", " leading space", "中文 日本語 한국어", "x<|endoftext|>y",
           "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
           "<|im_start|>assistant\n", "<repo_name>a<file_sep>b", "I'M HERE, you're 'quoted'"]
PLAIN = [s for s in STRINGS if "<" not in s]


@pytest.fixture(scope="module")
def smol_model(smollm2_path: Path) -> GgufModel:
    return GgufModel.open(smollm2_path)


@pytest.fixture(scope="module")
def smol(smol_model: GgufModel) -> GgufTokenizer:
    return smol_model.tokenizer()


def test_smollm2_ids_match_reference_tokenizer_json(smollm2_path: Path,
                                                     smol: GgufTokenizer) -> None:
    reference = smollm2_path.parent / "tokenizer.json"      # beside the shared file; a pulled model has none
    if not reference.is_file():
        pytest.skip(f"no reference {reference} (only ../shared has it)")
    ref = tokenizers.Tokenizer.from_file(str(reference))
    for s in STRINGS:
        assert smol.encode(s) == ref.encode(s, add_special_tokens=False).ids, s


def test_smollm2_roundtrip_and_specials(smol: GgufTokenizer) -> None:
    for s in PLAIN:
        assert smol.decode(smol.encode(s)) == s
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.add_bos) == (49152, 1, 2, False)
    assert smol.stop_ids == frozenset({2})
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and smol.decode(ids) == "user\nHi"
    assert smol.encode("Hi", add_bos=True) == [1, *smol.encode("Hi")]
    with pytest.raises(TokenizerError, match=r"token id 49152 is out of range"):
        smol.decode([5, 49152])


def test_smollm2_streams_through_stream_decoder(smol: GgufTokenizer) -> None:
    text = "Say 😀🎉 in café, 2024!"
    stream = StreamDecoder(smol)
    assert "".join(stream.push(i) for i in smol.encode(text)) == text


def test_smollm2_build_time(smol_model: GgufModel) -> None:
    t0 = time.perf_counter()
    GgufTokenizer.from_metadata(smol_model.metadata, source="smollm2")
    assert time.perf_counter() - t0 < 2.0


# ---- synthetic byte-level BPE ---------------------------------------------------------------

def bpe_meta(pre: str | None, merges: list[str], **extra: object) -> dict[str, object]:
    """A byte-level vocabulary: the 256 byte symbols, the merge results, two special tokens."""
    tokens = ["<|eot|>", "<|user|>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    tokens += [m.replace(" ", "") for m in merges]
    meta: dict[str, object] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 4] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 0, **extra}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


def pieces(tok: GgufTokenizer, meta: dict[str, object], text: str) -> list[str]:
    names = meta["tokenizer.ggml.tokens"]
    return [names[i] for i in tok.encode(text)]


DIGIT_MERGES = ["3 4", "1 2", "12 3", "Ġ t", "h e", "Ġt he"]


@pytest.mark.parametrize(("pre", "want"), [
    ("smollm", ["1", "2", "3", "4"]),     # every digit alone
    ("llama-bpe", ["123", "4"]),          # digits in runs of at most 3
    ("gpt-2", ["12", "34"]),              # one run of digits, merged by rank
    ("default", ["123", "4"]),            # llama.cpp's default also splits [0-9]{3}
])
def test_pre_tokenizer_by_name(pre: str, want: list[str]) -> None:
    meta = bpe_meta(pre, DIGIT_MERGES)
    tok = GgufTokenizer.from_metadata(meta)
    assert pieces(tok, meta, "1234") == want
    assert pieces(tok, meta, " the") == ["Ġthe"]
    assert tok.decode(tok.encode("1234 the\n")) == "1234 the\n"


def test_llama3_family_ignores_merges_for_whole_words_and_adds_bos() -> None:
    meta = bpe_meta("llama-bpe", ["a b"], **{"tokenizer.ggml.bos_token_id": 1})
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "abc"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 1]
    tok = GgufTokenizer.from_metadata(meta)
    assert tok.add_bos and pieces(tok, meta, "abc") == ["<|user|>", "abc"]
    gpt2 = GgufTokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "gpt-2"})
    assert not gpt2.add_bos and pieces(gpt2, meta, "abc") == ["ab", "c"]
    off = GgufTokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": False})
    assert not off.add_bos


def test_unknown_pre_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    meta = bpe_meta("made-up", DIGIT_MERGES)
    with caplog.at_level(logging.WARNING, logger="halo_p2p.model.gguf_tokenizer"):
        tok = GgufTokenizer.from_metadata(meta, source="x.gguf")
    assert "x.gguf: unknown tokenizer.ggml.pre 'made-up'" in caplog.text
    assert pieces(tok, meta, "1234") == ["12", "34"]


def test_control_and_user_defined_tokens_are_special() -> None:
    meta = bpe_meta("gpt-2", DIGIT_MERGES, **{"tokenizer.ggml.eot_token_id": 1})
    tok = GgufTokenizer.from_metadata(meta)
    ids = tok.encode("<|user|> the<|eot|>")
    assert ids[0] == 1 and ids[-1] == 0 and pieces(tok, meta, " the") == ["Ġthe"]
    assert tok.decode(ids) == " the"
    assert tok.stop_ids == frozenset({0, 1}) and tok.bos_id is None and not tok.add_bos


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"tokenizer.ggml.model": "bert"}, UnsupportedModel, "tokenizer model 'bert' of x.gguf"),
    ({"tokenizer.ggml.tokens": None}, TokenizerError, "x.gguf has no valid tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": None}, TokenizerError, "no valid tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["ab"]}, TokenizerError, "merges entry without a space"),
    ({"tokenizer.ggml.merges": ["x yz"]}, TokenizerError, "inconsistent BPE vocabulary"),
    ({"tokenizer.ggml.token_type": [1]}, TokenizerError, "token_type .*of length 264"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, TokenizerError, "eos_token_id=1000000 but the vo"),
])
def test_bad_metadata(change: dict, error: type, message: str) -> None:
    meta = {**bpe_meta("gpt-2", DIGIT_MERGES), **change}
    with pytest.raises(error, match=message):
        GgufTokenizer.from_metadata({k: v for k, v in meta.items() if v is not None},
                                    source="x.gguf")


# ---- SentencePiece-style ("llama") vocabulary: llama2.c's tok512 as GGUF metadata ----------

def tok512_meta() -> dict[str, object]:
    data = TOK512.read_bytes()
    pos, tokens, scores = 4, [], []
    for _ in range(512):
        score, n = struct.unpack_from("<fi", data, pos)
        tokens.append(data[pos + 8:pos + 8 + n].decode().replace(" ", "▁"))
        scores.append(score)
        pos += 8 + n
    tokens[1:3] = ["<s>", "</s>"]  # llama2.c stores them as "\n<s>\n", GGUF as "<s>"
    types = [2, 3, 3] + [6] * 256 + [1] * 253
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def spm_reference(meta: dict[str, object], text: str) -> list[int]:
    """llama2.c run.c encode(): dummy-space prefix, byte fallback, best-score pair merging."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = []
    for ch in "▁" + text.replace(" ", "▁"):
        ids += [vocab[ch]] if ch in vocab else [b + 3 for b in ch.encode()]
    while True:
        best = None
        for i in range(len(ids) - 1):
            merged = vocab.get(tokens[ids[i]] + tokens[ids[i + 1]])
            if merged is not None and (best is None or scores[merged] > scores[best[1]]):
                best = (i, merged)
        if best is None:
            return ids
        ids[best[0]:best[0] + 2] = [best[1]]


def test_sentencepiece_vocabulary_matches_llama2c() -> None:
    meta = tok512_meta()
    tok = GgufTokenizer.from_metadata(meta)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, True, frozenset({2}))
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]  # stories260K PROVENANCE
    for s in ["Once upon a time, there was a little girl named Lily.", "The cat sat. It's fun!",
              "héllo wörld 123 😀", "  two  spaces", "Tom said: \"Yes!\"\nThe end"]:
        assert tok.encode(s, add_bos=False) == spm_reference(meta, s), s
        assert tok.decode(tok.encode(s)) == s
    assert "ж" not in meta["tokenizer.ggml.tokens"]
    assert tok.encode("ж", add_bos=False)[-2:] == [0xD0 + 3, 0xB6 + 3]  # byte fallback
    assert tok.encode("<s>Hi</s>", add_bos=False)[0] == 1
