"""Llama2cTokenizer against llama2.c run.c's encode/decode on the embedded tok512.bin."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from halo_p2p.errors import ModelFormatError, ModelNotFound, TokenizerError
from halo_p2p.model.llama2c_tokenizer import Llama2cTokenizer
from halo_p2p.model.tokenizer import StreamDecoder

TOK512 = Path(__file__).resolve().parents[1] / "halo_p2p/model/data/stories260K/tok512.bin"

# run.c's greedy output for stories260K (llama2.c test_all.py expected_stdout; PROVENANCE.md).
GOLDEN_STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what "
    "to do.\"\n"
    "Lily didn't want to help her mom, so she\n"
)


@pytest.fixture(scope="module")
def tok() -> Llama2cTokenizer:
    return Llama2cTokenizer.open(TOK512, vocab_size=512)


def run_c_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """A literal port of run.c's quadratic merge loop, as the reference for the heap version."""
    ids = [1, tok.pieces.index(b" ")] if text else [1]
    for ch in text:
        raw = ch.encode()
        ids += [tok.pieces.index(raw)] if raw in tok.pieces else [b + 3 for b in raw]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = tok.pieces[ids[i]] + tok.pieces[ids[i + 1]]
            if merged in tok.pieces and tok.scores[tok.pieces.index(merged)] > best_score:
                best_id = tok.pieces.index(merged)
                best_score, best_idx = tok.scores[best_id], i
        if best_idx == -1:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


def test_header_facts(tok: Llama2cTokenizer) -> None:
    assert (tok.vocab_size, tok.max_token_length, tok.bos_id, tok.eos_id) == (512, 7, 1, 2)
    assert tok.stop_ids == frozenset({1, 2}) and tok.add_bos


def test_known_encoding(tok: Llama2cTokenizer) -> None:
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.encode("Once upon a time", add_bos=False) == [403, 407, 261, 378]
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []


def test_heap_merge_matches_run_c_loop(tok: Llama2cTokenizer) -> None:
    rng = random.Random(0)
    alphabet = "abcdehilnorstuwy ,.\n<>0x'\"éü漢😀"
    texts = [GOLDEN_STORY[:300], "Tom and Sue went to the", "  two  spaces ", "<0x41>"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
              for _ in range(200)]
    for text in texts:
        assert tok.encode(text) == run_c_encode(tok, text), text


def test_ascii_round_trip(tok: Llama2cTokenizer) -> None:
    text = "The dog was a big, red ball. He liked to play with his ball!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == " " + text  # the dummy prefix stays


def test_non_ascii_uses_byte_fallback(tok: Llama2cTokenizer) -> None:
    text = "Zoë 漢字 😀"
    ids = tok.encode(text)
    assert any(3 <= i <= 258 for i in ids)
    assert [i - 3 for i in tok.encode("😀", add_bos=False)[1:]] == list("😀".encode())
    assert tok.decode(ids) == text


def test_decode_rules(tok: Llama2cTokenizer) -> None:
    once = tok.encode("Once", add_bos=False)[0]
    assert tok.pieces[once] == b" Once"
    assert tok.decode([1, once]) == "Once"          # space after BOS dropped
    assert tok.decode([once]) == " Once"            # no predecessor: kept
    assert tok.decode([once, once]) == " Once Once"
    assert tok.decode([0, 1, 2]) == ""              # UNK/BOS/EOS decode to nothing
    assert tok.decode([1, 0x20 + 3]) == " "         # <0x20> is not a piece starting with ' '
    assert tok.decode([0xC3 + 3]) == "\ufffd"       # a lone lead byte
    with pytest.raises(TokenizerError):
        tok.decode([512])


def test_golden_story_round_trip(tok: Llama2cTokenizer) -> None:
    ids = tok.encode(GOLDEN_STORY)
    assert ids[0] == 1 and tok.pieces[ids[1]].startswith(b" ")
    assert tok.decode(ids) == GOLDEN_STORY


def test_stream_decoder_matches_whole_decode(tok: Llama2cTokenizer) -> None:
    ids = tok.encode("Once upon a time, Zoë saw 漢字. The end.")
    stream = StreamDecoder(tok, ids[:1])
    assert "".join(stream.push(i) for i in ids[1:]) == tok.decode(ids)


def test_encode_speed(tok: Llama2cTokenizer) -> None:
    text = (GOLDEN_STORY * 10)[:4096]
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert tok.decode(ids) == text
    assert elapsed < 0.1, f"encoding 4 KB took {elapsed * 1000:.1f} ms"


def test_surrogate_is_a_tokenizer_error(tok: Llama2cTokenizer) -> None:
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("a\ud800b")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist") as e:
        Llama2cTokenizer.open(tmp_path / "nope.bin")
    assert "--tokenizer" in str(e.value)


@pytest.mark.parametrize("cut", [2, 4, 100, 6226])
def test_truncated_file(tmp_path: Path, cut: int) -> None:
    bad = tmp_path / "tok.bin"
    bad.write_bytes(TOK512.read_bytes()[:cut])
    with pytest.raises(ModelFormatError) as e:
        Llama2cTokenizer.open(bad)
    assert str(bad) in e.value.problem and e.value.fix


def test_garbled_file(tmp_path: Path) -> None:
    data = bytearray(TOK512.read_bytes())
    struct.pack_into("<i", data, 4 + 4, 1000)  # token 0's length
    bad = tmp_path / "tok.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="garbled"):
        Llama2cTokenizer.open(bad)
    bad.write_bytes(struct.pack("<i", 7) + struct.pack("<fi", 0.0, 3) + b"abc")
    with pytest.raises(ModelFormatError, match="byte-fallback"):
        Llama2cTokenizer.open(bad)


def test_vocab_size_mismatch() -> None:
    with pytest.raises(ModelFormatError, match="512 tokens") as e:
        Llama2cTokenizer.open(TOK512, vocab_size=32000)
    assert "--tokenizer" in str(e.value)
