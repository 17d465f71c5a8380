"""Tests of the RWKV world tokenizer (modeling_rwkv7/tokenization_rwkv7.py).

The reference is pip ``rwkv``'s TRIE_TOKENIZER (dev dependency ``rwkv==0.8.32``): our ids must be identical on every
input, including text whose tokens split UTF-8 characters.
"""

from __future__ import annotations

import json
import os
import random

import pytest

import modeling_rwkv7  # noqa: F401  (the package __init__ registers the tokenizer with AutoTokenizer)
from modeling_rwkv7.tokenization_rwkv7 import (
    DEFAULT_VOCAB_PATH,
    END_OF_TEXT,
    Rwkv7Tokenizer,
    get_world_tokenizer,
    load_rwkv_vocab,
)

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")

TRICKY = [
    "",
    " ",
    "\n",
    "\n\n",
    "\n\n\n",
    "\n\n\n\n\n",
    "\r\n\r\n",
    "\t\t \t",
    " " * 127,
    " " * 128,
    " " * 129,
    " " * 300,
    "-" * 81,
    "Hello world!",
    "User: hi\n\nAssistant: hello\n\n",
    "The quick brown fox jumps over the lazy dog.",
    "人工智能是计算机科学的一个分支。",
    "日本語のテキスト、カタカナ、ひらがな",
    "한국어 텍스트",
    "Ελληνικά, русский текст, עברית, العربية",
    "naïve café — “quotes” ‘single’ … ½ ™ ©",
    "😀🎉👍🏽👨‍👩‍👧‍👦🇫🇷 🏳️‍🌈",
    "\x00\x01\x02\x7f\x1b[31mred\x1b[0m",
    "\u200b\u200d\ufeff zero width",
    "\U0010ffff\U000e0001 private/tags",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "<|rwkv_tokenizer_end_of_text|>",
    "text<|rwkv_tokenizer_end_of_text|>more",
    "<think>\nreasoning\n</think>",
    "a\ufffdb",
    "1234567890 3.14159 -1e-10 0xDEADBEEF",
    "http://example.com/path?query=1&b=2#frag",
    "    indented\n        more\n",
]

# Code point ranges for the fuzz: ASCII, Latin/Greek/Cyrillic, CJK, kana, Hangul, emoji, and the whole BMP/astral
# space (minus surrogates, which a str cannot encode to UTF-8).
RANGES = [
    (0x00, 0x7F),
    (0x20, 0x7E),
    (0x80, 0x52F),
    (0x3040, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0x0000, 0xD7FF),
    (0xE000, 0x10FFFF),
]


@pytest.fixture(scope="module")
def tok() -> Rwkv7Tokenizer:
    return get_world_tokenizer()


@pytest.fixture(scope="module")
def trie():
    path = os.path.join(os.path.dirname(rwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt")
    return rwkv_tokenizer.TRIE_TOKENIZER(path)


def _random_text(rng: random.Random, max_len: int) -> str:
    out = []
    for _ in range(rng.randint(0, max_len)):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", " " * rng.randint(1, 200)]))
        else:
            lo, hi = rng.choice(RANGES)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _random_token_soup(rng: random.Random, tables: list[bytes], n: int) -> bytes:
    # Concatenations of real tokens: the hardest case for longest match (many near-misses and overlaps).
    return b"".join(rng.choice(tables) for _ in range(n))


# ---- identity with TRIE_TOKENIZER -------------------------------------------------------------------------------


def test_vocab_matches_rwkv_package(trie):
    ours = load_rwkv_vocab(DEFAULT_VOCAB_PATH)
    assert ours == trie.idx2token
    assert sorted(ours) == list(range(1, 65530))
    assert max(map(len, ours.values())) == 128


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_identical(tok, trie, text):
    ref = trie.encode(text)
    assert tok.encode_text(text) == ref
    assert tok(text).input_ids == ref
    assert tok.encode(text) == ref
    # The HF slow path (tokenize -> token strings -> ids) must agree with the fast path.
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ref
    assert tok.decode(ref) == text


def test_fuzz_unicode_identical(tok, trie):
    rng = random.Random(1234)
    for _ in range(1500):
        text = _random_text(rng, 80)
        ref = trie.encode(text)
        assert tok.encode_text(text) == ref, repr(text)
        assert tok.decode(ref) == text


def test_fuzz_token_soup_identical(tok, trie):
    rng = random.Random(99)
    tokens = list(trie.idx2token.values())
    for _ in range(400):
        data = _random_token_soup(rng, tokens, rng.randint(1, 40))
        assert tok.encode_bytes(data) == trie.encodeBytes(data)
        text = data.decode("utf-8", "replace")
        assert tok.encode_text(text) == trie.encode(text)


def test_fuzz_random_bytes_identical(tok, trie):
    rng = random.Random(7)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        assert tok.encode_bytes(data) == trie.encodeBytes(data)
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_long_text_identical(tok, trie):
    rng = random.Random(5)
    text = "".join(_random_text(rng, 200) for _ in range(200)) + " " * 1000 + "\n\n" * 50
    assert tok.encode_text(text) == trie.encode(text)


def test_decode_arbitrary_ids_like_decode_bytes(tok, trie):
    rng = random.Random(42)
    for _ in range(500):
        ids = [rng.randint(1, 65529) for _ in range(rng.randint(0, 30))]
        raw = trie.decodeBytes(ids)
        assert tok.decode_bytes(ids) == raw
        assert tok.decode(ids) == raw.decode("utf-8", "replace")
        assert tok.decode(ids, errors="ignore") == raw.decode("utf-8", "ignore")
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == raw.decode("utf-8", "replace")


def test_split_character_decodes_whole(tok):
    ids = tok.encode_text("😀")
    assert len(ids) > 1  # the emoji is split over tokens that are not valid UTF-8 alone
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids) == "😀"
    tokens = tok.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_ids(tokens) == ids


def test_lone_surrogate_rejected_like_trie(tok, trie):
    with pytest.raises(UnicodeEncodeError):
        trie.encode("\ud800")
    with pytest.raises(UnicodeEncodeError):
        tok.encode_text("\ud800")


# ---- special tokens, "\n\n" ---------------------------------------------------------------------------------------


def test_double_newline_and_special_ids(tok):
    assert tok("\n\n").input_ids == [261]
    assert tok.encode("\n\n") == [261]
    assert tok.encode("\n") == [11]
    assert tok.encode(" ") == [33]
    assert tok.pad_token_id == tok.eos_token_id == tok.bos_token_id == 0
    assert tok.pad_token == tok.eos_token == END_OF_TEXT
    assert tok.convert_ids_to_tokens(0) == END_OF_TEXT
    assert tok.convert_tokens_to_ids(END_OF_TEXT) == 0
    assert tok.convert_ids_to_tokens(261) == "\n\n"
    # No BOS/EOS is added.
    assert tok("hi", add_special_tokens=True).input_ids == tok.encode_text("hi")
    assert len(tok) == 65530
    assert tok.vocab_size == 65536
    assert tok.decode([0, 261, 0], skip_special_tokens=True) == "\n\n"
    assert tok.decode([0]) == END_OF_TEXT


def test_end_of_text_in_text(tok, trie):
    text = f"a{END_OF_TEXT}b"
    assert tok.encode(text) == trie.encode(text)  # plain text by default, like TRIE_TOKENIZER
    assert tok.encode(text, split_special_tokens=False) == tok.encode("a") + [0] + tok.encode("b")


def test_newline_eos_pitfall_does_not_remap(tok):
    t = Rwkv7Tokenizer(eos_token="\n\n")
    assert t.eos_token_id == 261  # the pitfall config, but "\n\n" must never become an added id 65530
    assert t.encode("x\n\ny") == tok.encode("x\n\ny")
    assert 261 in t.encode("x\n\ny")
    assert len(t) == 65530


# ---- batching, padding, truncation, tensors ----------------------------------------------------------------------


def test_batch_padding_left_and_right(tok):
    texts = ["Hello world, this is longer", "Hi", "\n\n"]
    ids = [tok.encode_text(t) for t in texts]
    width = max(map(len, ids))
    right = tok(texts, padding=True)
    for row, mask, ref in zip(right.input_ids, right.attention_mask, ids):
        assert row == ref + [0] * (width - len(ref))
        assert mask == [1] * len(ref) + [0] * (width - len(ref))

    left_tok = get_world_tokenizer(padding_side="left")
    assert left_tok.padding_side == "left"
    left = left_tok(texts, padding=True, return_tensors="pt")
    assert tuple(left["input_ids"].shape) == (3, width)
    for row, mask, ref in zip(left["input_ids"].tolist(), left["attention_mask"].tolist(), ids):
        assert row == [0] * (width - len(ref)) + ref
        assert mask == [0] * (width - len(ref)) + [1] * len(ref)
    # padding_side can also be chosen per call
    per_call = tok(texts, padding="longest", padding_side="left")
    assert per_call.input_ids == left["input_ids"].tolist()
    assert tok.batch_decode(left["input_ids"], skip_special_tokens=True) == texts


def test_truncation_and_max_length_padding(tok):
    text = "The quick brown fox jumps over the lazy dog. " * 5
    ref = tok.encode_text(text)
    out = tok(text, truncation=True, max_length=7)
    assert out.input_ids == ref[:7]
    left = get_world_tokenizer(truncation_side="left")
    assert left(text, truncation=True, max_length=7).input_ids == ref[-7:]
    padded = tok(["a", "b c"], padding="max_length", max_length=5)
    assert [len(r) for r in padded.input_ids] == [5, 5]
    assert padded.input_ids[0] == tok.encode_text("a") + [0] * 4


def test_batch_decode_and_pairs(tok):
    assert tok.batch_decode([[11, 11], [261], []]) == ["\n\n", "\n\n", ""]
    pair = tok("User: hi", "\n\nAssistant:")
    assert pair.input_ids == tok.encode_text("User: hi") + tok.encode_text("\n\nAssistant:")


# ---- save / load / AutoTokenizer ---------------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == open(DEFAULT_VOCAB_PATH, "rb").read()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Rwkv7Tokenizer"
    assert cfg["eos_token"] == cfg["pad_token"] == END_OF_TEXT
    loaded = Rwkv7Tokenizer.from_pretrained(tmp_path)
    for text in TRICKY:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.pad_token_id == 0 and len(loaded) == len(tok)
    # Saving again into the folder it was loaded from must not fail (same-file copy).
    loaded.save_pretrained(tmp_path)


def test_padding_side_persists(tmp_path):
    t = get_world_tokenizer(padding_side="left")
    t.save_pretrained(tmp_path)
    assert Rwkv7Tokenizer.from_pretrained(tmp_path).padding_side == "left"


def test_auto_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import REGISTERED_TOKENIZER_CLASSES

    if "Rwkv7Tokenizer" not in REGISTERED_TOKENIZER_CLASSES:
        # The package __init__ should register it; fall back so that this file also runs on its own.
        from modeling_rwkv7.configuration_rwkv7 import Rwkv7Config

        AutoTokenizer.register(Rwkv7Config, slow_tokenizer_class=Rwkv7Tokenizer, exist_ok=True)
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(auto, Rwkv7Tokenizer)
    assert auto("\n\n").input_ids == [261]
    assert auto.encode("Hello 世界 😀") == tok.encode("Hello 世界 😀")


# ---- errors -------------------------------------------------------------------------------------------------------


def test_missing_vocab_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        Rwkv7Tokenizer(vocab_file=missing)


@pytest.mark.parametrize(
    "bad_line",
    [
        "300 'abc' 4",  # wrong length
        "300 abc 3",  # not a literal
        "300 __import__('os') 3",  # code, not a literal
        "x 'abc' 3",  # bad id
        "300 123 3",  # not str/bytes
        "300'abc'3",  # no separators
        "1 'zz' 2",  # duplicate id
    ],
)
def test_malformed_vocab_names_file_and_line(tmp_path, bad_line):
    lines = open(DEFAULT_VOCAB_PATH, encoding="utf-8").read().splitlines()
    lines.insert(5, bad_line)
    path = tmp_path / "bad_vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab\.txt.*line 6"):
        Rwkv7Tokenizer(vocab_file=path)


def test_vocab_missing_single_byte(tmp_path):
    lines = [ln for ln in open(DEFAULT_VOCAB_PATH, encoding="utf-8").read().splitlines() if ln != "66 'A' 1"]
    path = tmp_path / "no_A.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no_A.txt"):
        Rwkv7Tokenizer(vocab_file=path)


def test_crlf_vocab_gives_same_tokenizer(tmp_path, tok):
    path = tmp_path / "crlf.txt"
    path.write_bytes(open(DEFAULT_VOCAB_PATH, "rb").read().replace(b"\n", b"\r\n"))
    t = Rwkv7Tokenizer(vocab_file=path)
    assert load_rwkv_vocab(path) == load_rwkv_vocab(DEFAULT_VOCAB_PATH)
    assert t.decode_bytes(range(1, 65530)) == tok.decode_bytes(range(1, 65530))


def test_decode_out_of_range(tok):
    with pytest.raises(ValueError):
        tok.decode_bytes([70000])
    with pytest.raises(ValueError):
        tok.decode_bytes([-1])
    assert tok.decode_bytes([65535]) == b""  # unused embedding row
