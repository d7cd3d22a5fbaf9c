"""neoxja's tokenizer against transformers' GPTNeoXJapaneseTokenizer on the real abeja vocabulary.

Equal everywhere except three defects of the port, each asserted explicitly:
1. the comma: the port encodes "," as <|byte44|>, we use the comma token;
2. decoding: the port decodes byte tokens one by one and strips whitespace, we decode byte runs
   as UTF-8 and strip nothing, so that decode(encode(s)) == normalize(s);
3. the price pattern of do_clean_text: we match what the original pattern matches (the oracle
   here is the port with the original pattern put back; see also test_tokenizer_clean.py).
"""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPTNeoXJapaneseTokenizer as PortTokenizer  # the oracle (test-only dependency)

from neoxja import _tokenizer_clean as clean
from neoxja import tokenizer as tokmod
from neoxja.tokenizer import TAG_TEXT, GPTNeoXJapaneseTokenizer

EXAMPLE = "吾輩は猫である🐯。実は慶応(慶應)大学出身"
EXAMPLE_IDS = [30014, 26883, 26638, 27228, 25, 26650, 31732, 31679, 27809, 26638, 17749, 31592, 17749, 31593, 321, 1281]
LONG_ASCII_NUMBER = re.compile(r"[0-9,]{10}")  # the original price pattern is exponential on these


@pytest.fixture(scope="module")
def ours(abeja_dir):
    return GPTNeoXJapaneseTokenizer.from_pretrained(abeja_dir)


@pytest.fixture(scope="module")
def ours_clean(abeja_dir):
    return GPTNeoXJapaneseTokenizer.from_pretrained(abeja_dir, do_clean_text=True)


@pytest.fixture(scope="module")
def port(abeja_dir):
    return PortTokenizer(str(abeja_dir / "vocab.txt"), str(abeja_dir / "emoji.json"))


@pytest.fixture(scope="module")
def port_clean_original_price(abeja_dir):
    """The port with do_clean_text and the original price pattern put back (short inputs only)."""
    tok = PortTokenizer(str(abeja_dir / "vocab.txt"), str(abeja_dir / "emoji.json"), do_clean_text=True)
    tok.subword_tokenizer.content_repatter6 = clean.ORIGINAL_PRICE
    return tok


@pytest.fixture(scope="module")
def snippets(aozora_path):
    """2,000 pieces of Aozora Bunko text, 1 to 200 characters, from random places of random works."""
    with gzip.open(aozora_path, "rt", encoding="utf-8") as f:
        works = [json.loads(line)["text"] for line in f]
    rng = random.Random(2)
    out = []
    for _ in range(2000):
        work = rng.choice(works)
        start = rng.randrange(len(work))
        out.append(work[start : start + rng.randint(1, 200)])
    return out


def as_port_ids(ours_tok, ids):
    """Defect 1 is the only difference of the ids: the port has <|byte44|> where we have the comma."""
    comma, byte44 = ours_tok.vocab[","], ours_tok.vocab["<|byte44|>"]
    return [byte44 if i == comma else i for i in ids]


def normalize(port_tok, text):
    """The documented many-to-one mappings, segment by segment as the port's encoder finds them:
    tags decode to their text, emoji tags to their class representative, heterographs to the first
    spelling of their vocab line, byte tokens as one UTF-8 sequence per run."""
    out = bytearray()
    lines = port_tok.ids_to_tokens
    for token in port_tok.tokenize(text):
        byte = re.fullmatch(r"<\|byte(\d+)\|>", token)
        if byte:
            out.append(int(byte.group(1)))
        elif token in TAG_TEXT:
            out += TAG_TEXT[token].encode()
        elif token.startswith("<|emoji"):
            out += port_tok.emoji["emoji_inv"][token].encode()
        else:
            out += lines[port_tok.vocab[token]][0].encode()
    return out.decode("utf-8", errors="replace")


# --- the documented example and the three deviations ----------------------------------------------


def test_documented_example(ours, port):
    assert ours(EXAMPLE)["input_ids"] == EXAMPLE_IDS == port(EXAMPLE)["input_ids"]
    assert ours.decode(EXAMPLE_IDS) == "吾輩は猫である🐯。実は慶応(慶応)大学出身"
    assert ours.tokenize(EXAMPLE) == port.tokenize(EXAMPLE)


def test_deviation_1_comma(ours, port):
    assert ours.encode("1,000円") == [31601, 31596, 31600, 31600, 31600, 27991]
    assert port.encode("1,000円") == [31601, 31785, 31600, 31600, 31600, 27991]
    assert ours.convert_ids_to_tokens(31596) == "," and port.convert_ids_to_tokens(31596) == ""
    assert ours.decode(ours.encode("1,000円")) == "1,000円"


def test_deviation_2_decoding(ours, port):
    for text in ["Ω", "é", "淪叮柢", " 猫 ", "\n吾輩\n"]:
        ids = ours.encode(text)
        assert ids == port.encode(text)
        assert ours.decode(ids) == text != port.decode(ids)


def test_deviation_3_price(ours_clean, port_clean_original_price, abeja_dir):
    port_possessive = PortTokenizer(str(abeja_dir / "vocab.txt"), str(abeja_dir / "emoji.json"), do_clean_text=True)
    text = "0,000円と１０円"
    assert ours_clean.tokenize(text) == ["0", ",", "<PRICE>", "と", "１", "０", "<PRICE>"]
    assert port_possessive.tokenize(text) == ["<PRICE>", "と", "<PRICE>"]
    assert as_port_ids(ours_clean, ours_clean.encode(text)) == port_clean_original_price.encode(text)


# --- vocabulary API ----------------------------------------------------------------------------------


def test_vocabulary_api_matches(ours, port):
    assert ours.vocab_size == port.vocab_size and len(ours) == len(port)
    assert ours.get_vocab() == port.get_vocab()
    assert ours.all_special_ids == port.all_special_ids
    for name in ["eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"]:
        assert getattr(ours, name) == getattr(port, name), name
    all_ids = list(range(len(ours.ids_to_tokens)))
    comma = ours.vocab[","]
    assert [t for i, t in zip(all_ids, ours.convert_ids_to_tokens(all_ids)) if i != comma] == [
        t for i, t in zip(all_ids, port.convert_ids_to_tokens(all_ids)) if i != comma
    ]
    words = [w for w in ours.vocab if w != ","]
    assert ours.convert_tokens_to_ids(words) == port.convert_tokens_to_ids(words)


def test_saved_directory_loads_in_transformers(ours, port, tmp_path):
    ours.save_pretrained(tmp_path)
    reloaded_port = PortTokenizer.from_pretrained(str(tmp_path))
    reloaded = GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)
    text = EXAMPLE + "\n１,０００円 Ωです。"
    assert reloaded_port(text)["input_ids"] == port(text)["input_ids"]
    assert reloaded.encode(text) == ours.encode(text)
    assert reloaded_port.eos_token_id == ours.eos_token_id


# --- the corpus ----------------------------------------------------------------------------------


def test_aozora_ids_tokens_and_decoding(ours, port, snippets):
    with_comma = with_bytes = 0
    for text in snippets:
        ids = ours.encode(text)
        port_ids = port(text)["input_ids"]
        assert as_port_ids(ours, ids) == port_ids, text
        assert ours.decode(ids) == normalize(port, text), text
        if any(ours.ids_to_tokens[i][0].startswith("<|byte") for i in ids):
            with_bytes += 1
        elif text == text.strip():
            assert ours.decode(ids) == port.decode(port_ids), text  # no bytes, no edge whitespace: same text
        with_comma += ours.vocab[","] in ids
    assert with_comma > 0 and with_bytes > 0  # both deviations were exercised


def test_aozora_with_clean_text(ours_clean, port_clean_original_price, snippets):
    skipped = 0
    for text in snippets:
        if LONG_ASCII_NUMBER.search(text):
            skipped += 1  # the original price pattern would take exponential time
            continue
        assert as_port_ids(ours_clean, ours_clean.encode(text)) == port_clean_original_price(text)["input_ids"], text
    assert skipped < 20


def test_compiled_and_python_agree_on_aozora(abeja_dir, ours, snippets):
    if tokmod._CScanner is None:
        pytest.skip("the C extension is not built (pure-Python path is the one in use)")
    slow = GPTNeoXJapaneseTokenizer.from_pretrained(abeja_dir, use_compiled=False)
    long_text = "".join(snippets[:1000])
    assert ours.encode(long_text) == slow.encode(long_text)


# --- property tests over arbitrary Unicode ----------------------------------------------------------

PIECES = [
    # emoji sequences: ZWJ, flags, skin tones, variation selectors, keycaps, tag sequences, emoticons
    "👨‍👩‍👧‍👦", "🏳️‍🌈", "🏴‍☠️", "👩‍❤️‍💋‍👨", "🇯🇵", "🇺🇸", "🇯", "👍🏽", "👋🏿", "🏿", "❤️", "❤", "☺︎", "#️⃣", "1️⃣",
    "🐯", "😀", "🤕", "(^_^)", "(>_<)", "\ufe0f", "\u200d", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    # half-width katakana, full-width ASCII, combining marks
    "ｶﾞｷﾞｸﾞﾊﾟｰｯ｡､ｧ", "ＡＢＣａｂｃ０１２！？＄", "e\u0301", "か\u3099", "\u0300", "a\u20dd",
    # control, private use, astral
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\u200b", "\ufeff", "\u2028", "\ue000", "\U000f0000", "𠮟", "𩸽", "𝔸",
    # literal tag text
    "<SP>", "<BR>", "<TAB>", "<|endoftext|>", "<|startoftext|>", "<|byte7|>", "<|byte227|>", "<|byte255|>",
    "<", "<|", ">", "<|emoji4|>", "<KIGOU>", "<U2000U2BFF>", "<BLOCK>", "<PRICE>",
    # whitespace, dashes, symbols, fall-back characters
    " ", "\u3000", "\r\n", "\r", "\n", "\t", "—", "−", "¡", "¿", "ʹ", "※", "─", "█", "Ω", "€", "©", "淪", ",",
    # Japanese text and numbers
    "吾輩は猫である", "慶應", "慶応", "1,000円", "１０円", "http://x.jp", "a@b.cd", "2020/1/2",
]  # fmt: skip


@pytest.fixture(scope="module")
def texts(ours):
    """Strategy: concatenations of arbitrary short text, the pieces above and heterograph spellings."""
    heterographs = sorted({w for spellings in ours.ids_to_tokens if len(spellings) > 1 for w in spellings})
    piece = st.one_of(st.text(max_size=4), st.sampled_from(PIECES), st.sampled_from(heterographs))
    return st.lists(piece, max_size=12).map("".join)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_arbitrary_text_matches_port_and_round_trips(ours, port, texts, data):
    text = data.draw(texts)
    ids = ours.encode(text)
    assert as_port_ids(ours, ids) == port(text)["input_ids"]
    assert ours.decode(ids) == normalize(port, text)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_arbitrary_text_with_clean_text(ours_clean, port_clean_original_price, texts, data):
    text = data.draw(texts)
    ids = ours_clean.encode(text)
    assert isinstance(ours_clean.decode(ids), str)
    if not LONG_ASCII_NUMBER.search(text):
        assert as_port_ids(ours_clean, ids) == port_clean_original_price(text)["input_ids"]


@pytest.mark.parametrize("kwargs", [
    dict(max_length=5),  # truncation=None with max_length and no padding truncates, as in transformers
    dict(truncation=None, max_length=5),
    dict(truncation="do_not_truncate", max_length=5),
    dict(return_attention_mask=None),
    dict(padding="max_length", max_length=20, padding_side="left"),
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding="max_length", max_length=4),  # padding asked for: max_length does not truncate
    dict(padding="max_length", max_length=4, truncation=True),
    dict(return_token_type_ids=True, padding=True),
    dict(return_token_type_ids=False),
])
def test_call_arguments_behave_as_in_transformers(ours, port, kwargs):
    import numpy as np

    texts = ["吾輩は猫である。名前はまだ無い。", "どこで生れたか", "猫"]
    for text in (texts[0], texts):
        assert dict(ours(text, **kwargs)) == dict(port(text, **kwargs)), (text, kwargs)
    if "padding" not in kwargs and "return_token_type_ids" not in kwargs:
        assert ours.encode(texts[0], **kwargs) == port.encode(texts[0], **kwargs)
    assert ours(texts[0], truncation=True, max_length=np.int64(3)) == port(texts[0], truncation=True, max_length=3)
    assert ours.encode(texts[0], return_tensors="pt").tolist() == port.encode(texts[0], return_tensors="pt").tolist()
    with pytest.raises(ValueError, match="truncation"):
        ours.encode(texts[0], truncation="bogus", max_length=3)
