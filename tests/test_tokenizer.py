"""Unit tests of neoxja.tokenizer on small vocabularies written here (no shared data needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoxja import tokenizer as tokmod
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

# Specials first, so that ids differ from abeja's layout (nothing may depend on it).
SPECIALS = ["<|endoftext|>", "<|startoftext|>"]
WORDS = [
    "ab", "a", "b", "c", "abc", "bc", "x,xy", "慶応,慶應", "猫", "で", "であ", "ある", "は", ",", "0", "1", "円",
    "<", "<a", "<ab>", "|", "ー", "z", "zz", "zzz", "きぃ", "きぃ", "zzzz", "<longtag-extra>",
]  # fmt: skip
TAGS = ["<BR>", "<SP>", "<TAB>", "<URL>", "<EMAIL>", "<TEL>", "<DATE>", "<PRICE>", "<BLOCK>", "<KIGOU>", "<U2000U2BFF>"]
EMOJI = {
    "emoji": {"👍": "<|emoji1|>", "👍🏻": "<|emoji2|>", "🏻": "<|emoji3|>", "(>_<)": "<|emoji2|>", ">x": "<|emoji3|>"},
    "emoji_inv": {"<|emoji1|>": "👍", "<|emoji2|>": "(>_<)", "<|emoji3|>": "🏻"},
}


def write_files(directory, words=WORDS, emoji=EMOJI, *, specials=SPECIALS, with_bytes=True):
    lines = list(specials) + list(words) + TAGS + ["<|emoji1|>", "<|emoji2|>", "<|emoji3|>"]
    if with_bytes:
        lines += [f"<|byte{b}|>" for b in range(256)]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(lines) + "\n", encoding="utf-8")
    emoji_path = directory / "emoji.json"
    emoji_path.write_text(json.dumps(emoji, ensure_ascii=False), encoding="utf-8")
    return vocab, emoji_path


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


@pytest.fixture(scope="module")
def shared_toks(tmp_path_factory):
    """(compiled or None, pure Python) tokenizers for property tests (hypothesis reuses fixtures)."""
    files = write_files(tmp_path_factory.mktemp("vocab"))
    compiled = GPTNeoXJapaneseTokenizer(*files, use_compiled=True) if tokmod._CScanner is not None else None
    return compiled, GPTNeoXJapaneseTokenizer(*files, use_compiled=False)


@pytest.fixture(params=["compiled", "python"])
def tok(request, files):
    if request.param == "compiled" and tokmod._CScanner is None:
        pytest.skip("the C extension neoxja._tokenizer_scan is not built (pure-Python path still tested)")
    return GPTNeoXJapaneseTokenizer(*files, use_compiled=request.param == "compiled")


def ids_of(tok, *words):
    return [tok.vocab[w] for w in words]


# --- scan rules ------------------------------------------------------------------------------------


def test_lowest_id_among_candidates_wins(tok):
    # "ab" has a lower id than "abc", so "abc" is "ab" + "c"
    assert tok.encode("abc") == ids_of(tok, "ab", "c")
    assert tok.tokenize("abc") == ["ab", "c"]


def test_equal_ids_prefer_the_longer_candidate(tok):
    # "x" and "xy" are one token (heterographs): the longer spelling is consumed
    assert tok.tokenize("xyx") == ["xy", "x"]
    assert tok.encode("xy") == [tok.vocab["x"]]
    assert tok.decode(tok.encode("xyx")) == "xx"  # decodes to the first spelling


def test_angle_tag_longer_than_two_wins_at_once(tok):
    assert tok.tokenize("<ab>") == ["<ab>"]
    assert tok.tokenize("<abc") == ["<", "ab", "c"]  # no tag: '<' has a lower id than '<a'
    assert tok.tokenize("<longtag-extra>z") == ["<longtag-extra>", "z"]  # longer than 3 after '<'
    assert tok.tokenize("<") == ["<"]


def test_words_longer_than_three_are_never_candidates(tok):
    assert tok.tokenize("zzzz") == ["z", "z", "z", "z"]  # z has the lowest id among z, zz, zzz


def test_comma_line_is_the_comma(tok):
    assert tok.encode("1,0") == ids_of(tok, "1", ",", "0")
    assert tok.convert_ids_to_tokens(tok.vocab[","]) == ","


def test_repeated_line_keeps_the_last_id_and_counts_once(tok):
    first = SPECIALS.__len__() + WORDS.index("きぃ")
    assert tok.vocab["きぃ"] == first + 1
    assert tok.vocab_size == len(tok) == len(tok.ids_to_tokens) - 1
    assert tok.get_vocab()["慶応,慶應"] == tok.vocab["慶應"]


def test_fallback_tokens(tok):
    kigou, u2e = tok.vocab["<KIGOU>"], tok.vocab["<U2000U2BFF>"]
    for ch in ["\u00a1", "\u00bf", "\u01c0", "\u01c3", "\u02b9", "\u02ff", "\u0300", "\u0362"]:
        assert tok.encode(ch) == [kigou], hex(ord(ch))
    for ch in ["\u2000", "※", "\u2bff"]:
        assert tok.encode(ch) == [u2e], hex(ord(ch))
    for ch in ["\u00a0", "\u00c0", "\u0363", "\u1fff", "\u2c00", "Ω", "𠮟", "\x00"]:
        assert tok.encode(ch) == [tok.vocab[f"<|byte{b}|>"] for b in ch.encode("utf-8")], hex(ord(ch))
    assert tok.decode(tok.encode("¡※")) == "ǀ‖"


def test_whitespace_and_dashes_map_to_tags(tok):
    ids = tok.encode("a b\u3000c\r\nd\re\nf\tg—−")
    assert tok.convert_ids_to_tokens(ids) == list("a b c\nd\ne\nf\tgーー")
    assert tok.decode(ids) == "a b c\nd\ne\nf\tgーー"


def test_emoji_replacements_follow_the_file_order(tok):
    # "👍" comes before "👍🏻" in emoji.json, so the skin tone is left over and becomes its own class
    assert tok.encode("👍🏻") == ids_of(tok, "<|emoji1|>", "<|emoji3|>")
    # a replacement can create a later key: "<|emoji1|>" + "x" contains ">x"
    assert tok.tokenize("👍x")[-1] == "<|emoji3|>"
    assert tok.decode(tok.encode("(>_<)")) == "(>_<)"


def naive_emoji(text, emoji_map):
    for key, tag in emoji_map.items():
        if key in text:
            text = text.replace(key, tag)
    return text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["👍", "🏻", "(>_<)", ">", "x", "(", "<|emoji1|", "a", "_<)"]), max_size=12))
def test_emoji_map_equals_the_in_order_replace_chain(shared_toks, pieces):
    tok = shared_toks[1]
    text = "".join(pieces)
    assert tok._replace_emoji(text) == naive_emoji(text, EMOJI["emoji"])


def test_byte_runs_decode_as_utf8(tok):
    ids = tok.encode("aΩé𠮟b")
    assert tok.decode(ids) == "aΩé𠮟b"
    omega = [tok.vocab[f"<|byte{b}|>"] for b in "Ω".encode()]
    assert tok.decode(omega[:1]) == "\ufffd"  # an unfinished run holds a replacement character
    assert tok.decode(omega[:1] + ids_of(tok, "a")) == "\ufffda"
    assert tok.decode(ids_of(tok, "<|byte255|>") + omega) == "\ufffdΩ"


def test_decode_keeps_whitespace_and_skips_specials(tok):
    ids = tok.encode("  a  ")
    assert tok.decode(ids) == "  a  "
    eos, bos = tok.eos_token_id, tok.bos_token_id
    assert tok.decode([bos] + ids + [eos]) == "<|startoftext|>  a  <|endoftext|>"
    assert tok.decode([bos] + ids + [eos], skip_special_tokens=True) == "  a  "
    assert sorted(tok.all_special_ids) == sorted([eos, bos])
    assert tok.batch_decode([[bos], ids]) == ["<|startoftext|>", "  a  "]


def test_special_ids_come_from_the_vocab(tok):
    assert tok.eos_token_id == tok.pad_token_id == tok.unk_token_id == 0
    assert tok.bos_token_id == 1
    assert tok.convert_tokens_to_ids(["a", "never-seen"]) == [tok.vocab["a"], 0]


def reference_decode(tok, ids):
    """decode by its definition: each run of byte tokens is one UTF-8 sequence."""
    out, run = [], bytearray()
    for i in ids:
        word = tok.ids_to_tokens[i][0]
        if word.startswith("<|byte"):
            run.append(int(word[6:-2]))
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(tok.convert_ids_to_tokens(i))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=30))
def test_decode_matches_its_definition_on_any_ids(shared_toks, ids):
    tok = shared_toks[1]
    ids = [i % len(tok.ids_to_tokens) for i in ids]
    assert tok.decode(ids) == reference_decode(tok, ids)


ALPHABET = ["a", "b", "c", "x", "y", "z", "<", ">", "|", ",", "0", "1", "慶", "應", "応", "猫", "で", "あ", "る", " ",
            "\n", "\t", "👍", "🏻", "Ω", "¡", "※", "<SP>", "<|endoftext|>", "<|byte7|>", "<ab>", "\x00", "é"]  # fmt: skip


@pytest.mark.skipif(tokmod._CScanner is None, reason="the C extension is not built")
@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=25))
def test_compiled_and_python_scans_agree(shared_toks, pieces):
    text = "".join(pieces)
    fast, slow = shared_toks
    assert fast.encode(text) == slow.encode(text) == fast.convert_tokens_to_ids(fast.tokenize(text))


def test_pure_python_fallback_when_extension_missing(files, monkeypatch):
    monkeypatch.setattr(tokmod, "_CScanner", None)
    tok = GPTNeoXJapaneseTokenizer(*files)
    assert tok._c_scanner is None
    assert tok.encode("abc猫") == ids_of(tok, "ab", "c", "猫")
    with pytest.raises(RuntimeError, match="not built"):
        GPTNeoXJapaneseTokenizer(*files, use_compiled=True)


# --- call API --------------------------------------------------------------------------------------


def test_call_single_and_batch(tok):
    out = tok("abc")
    assert out["input_ids"] == ids_of(tok, "ab", "c") and out["attention_mask"] == [1, 1]
    assert out.input_ids == out["input_ids"]
    batch = tok(["abc", "a"])
    assert batch["input_ids"] == [ids_of(tok, "ab", "c"), ids_of(tok, "a")]
    assert "attention_mask" not in tok("a", return_attention_mask=False)


def test_padding_sides_and_truncation(tok):
    pad = tok.pad_token_id
    a, abc = ids_of(tok, "a"), ids_of(tok, "ab", "c")
    right = tok(["abc", "a"], padding=True)
    assert right["input_ids"] == [abc, a + [pad]] and right["attention_mask"] == [[1, 1], [1, 0]]
    tok.padding_side = "left"
    left = tok(["abc", "a"], padding="longest")
    assert left["input_ids"] == [abc, [pad] + a] and left["attention_mask"] == [[1, 1], [0, 1]]
    fixed = tok(["abc", "a"], padding="max_length", max_length=4)
    assert fixed["input_ids"] == [[pad, pad] + abc, [pad] * 3 + a]
    cut = tok(["abcabc", "a"], truncation=True, max_length=3, padding=True)
    assert cut["input_ids"] == [abc + ids_of(tok, "ab"), [pad, pad] + a]
    tok.truncation_side = "left"
    assert tok("abcab", truncation=True, max_length=2)["input_ids"] == ids_of(tok, "c", "ab")


def test_return_tensors(tok):
    torch = pytest.importorskip("torch")
    out = tok(["abc", "a"], padding=True, return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and tuple(out["input_ids"].shape) == (2, 2)
    assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]
    single = tok("abc", return_tensors="np")
    assert isinstance(single["input_ids"], np.ndarray) and single["input_ids"].shape == (1, 2)
    assert tok.decode(out["input_ids"][0]) == "abc"
    assert tok.batch_decode(out["input_ids"], skip_special_tokens=True) == ["abc", "a"]
    with pytest.raises(ValueError, match="padding"):
        tok(["abc", "a"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="tf")


# --- bad input -------------------------------------------------------------------------------------


def test_bad_text_types(tok):
    for bad in [None, 1, b"abc", ["a", 1]]:
        with pytest.raises(TypeError):
            tok(bad)
    with pytest.raises(TypeError):
        tok.encode(b"abc")


def test_lone_surrogate_names_its_position(tok):
    with pytest.raises(ValueError, match="position 3"):
        tok.encode("ab \ud83d")
    with pytest.raises(ValueError, match="position 0"):
        tok.tokenize("\udfffa")


def test_bad_ids(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([len(tok.ids_to_tokens)])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode(["a"])
    with pytest.raises(TypeError):
        tok.decode("abc")
    assert tok.decode(np.array([tok.vocab["a"]], dtype=np.int64)) == "a"
    assert tok.decode(tok.vocab["a"]) == "a"


def test_missing_files_name_the_path(tmp_path, files):
    vocab, emoji = files
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        GPTNeoXJapaneseTokenizer(tmp_path / "nope.txt", emoji)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        GPTNeoXJapaneseTokenizer(vocab, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="empty-dir"):
        (tmp_path / "empty-dir").mkdir()
        GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path / "empty-dir")


@pytest.mark.parametrize(
    "content, line",
    [(b"a\n\nb\n", 2), (b"a\nb,\n", 2), (b"a\n\xff\xfe\n", 2), (b"", 1), (b"a\nb\nc,,d\n", 3)],
)
def test_malformed_vocab_names_file_and_line(tmp_path, files, content, line):
    bad = tmp_path / "bad_vocab.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"bad_vocab\.txt, line {line}"):
        GPTNeoXJapaneseTokenizer(bad, files[1])


@pytest.mark.parametrize("content", ['{"emoji": {}, \n "emoji_inv": ', '[1, 2]', '{"emoji": {"a": 1}, "emoji_inv": {}}',
                                     '{"emoji": {"X": ""}, "emoji_inv": {}}',  # an empty tag
                                     '{"emoji": {}, "emoji_inv": {"<|emoji1|>": "\\ud83d"}}'])  # half a pair
def test_malformed_emoji_names_file(tmp_path, files, content):
    bad = tmp_path / "bad_emoji.json"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_emoji\.json"):
        GPTNeoXJapaneseTokenizer(files[0], bad)


def test_truncated_json_error_names_the_line(tmp_path, files):
    bad = tmp_path / "bad_emoji.json"
    bad.write_text('{"emoji": {},\n\n "emoji_inv": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_emoji\.json, line 3"):
        GPTNeoXJapaneseTokenizer(files[0], bad)


def test_vocab_without_fallback_or_unk_is_rejected(tmp_path):
    vocab, emoji = write_files(tmp_path, specials=[], with_bytes=False)
    with pytest.raises(ValueError, match="fallback"):
        GPTNeoXJapaneseTokenizer(vocab, emoji)


def test_bad_call_arguments(tok):
    with pytest.raises(ValueError, match="max_length"):
        tok(["a", "ab"], padding="max_length")
    with pytest.raises(ValueError):
        tok("a", padding="sideways")
    with pytest.raises(TypeError):
        tok("a", not_an_argument=1)
    tok.padding_side = "up"
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a", "ab"], padding=True)


# --- files -----------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tok, tmp_path):
    tok.padding_side = "left"
    saved = tok.save_pretrained(tmp_path / "saved")
    names = sorted(p.split("/")[-1] for p in saved)
    assert names == ["emoji.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPTNeoXJapaneseTokenizer" and config["eos_token"] == "<|endoftext|>"
    again = GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path / "saved")
    assert again.ids_to_tokens == tok.ids_to_tokens and again.emoji == tok.emoji
    assert again.padding_side == "left"
    text = "abc, 慶應👍🏻Ω"
    assert again.encode(text) == tok.encode(text)


def make_hub_cache(cache_dir, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files:
        (snapshot / path.name).write_bytes(path.read_bytes())
    return snapshot


def test_from_pretrained_hub_id_uses_the_cache_offline(tmp_path, files, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    make_hub_cache(tmp_path / "cache", "someone/tiny-neox-ja", files)
    tok = GPTNeoXJapaneseTokenizer.from_pretrained("someone/tiny-neox-ja", cache_dir=tmp_path / "cache")
    assert tok.encode("abc") == ids_of(tok, "ab", "c")
    assert tok.name_or_path == "someone/tiny-neox-ja"
    with pytest.raises(FileNotFoundError, match="not-cached"):
        GPTNeoXJapaneseTokenizer.from_pretrained("someone/not-cached", cache_dir=tmp_path / "cache")


def test_from_pretrained_hub_id_through_a_mocked_resolver(tmp_path, files, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        path = files[0].parent / filename
        if not path.exists():
            from huggingface_hub.utils import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tok = GPTNeoXJapaneseTokenizer.from_pretrained("org/model", revision="v1", do_clean_text=True)
    assert tok.do_clean_text
    assert ("org/model", "vocab.txt", "v1") in calls and ("org/model", "tokenizer_config.json", "v1") in calls


def test_random_text_never_crashes(files):
    tok = GPTNeoXJapaneseTokenizer(*files)
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(chr(rng.choice([rng.randrange(32, 0x2FFF), rng.randrange(0xE000, 0x10FFFF)])) for _ in range(20))
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            continue
        ids = tok.encode(text)
        assert all(0 <= i < len(tok.ids_to_tokens) for i in ids)
        assert isinstance(tok.decode(ids), str)


def test_symbol_ranges_equal_the_original_byte_tests():
    """The original tests UTF-8 byte values; the code point ranges used here must agree on every character."""

    def original_kigou(x):
        e = x.encode()
        if len(e) == 2:
            c = (e[0] << 8) + e[1]
            return 0xC2A1 <= c <= 0xC2BF or 0xC780 <= c <= 0xC783 or 0xCAB9 <= c <= 0xCBBF or 0xCC80 <= c <= 0xCDA2
        return False

    def original_u2e(x):
        e = x.encode()
        return len(e) == 3 and 0xE28080 <= (e[0] << 16) + (e[1] << 8) + e[2] <= 0xE2B07F

    for c in [*range(0xD800), *range(0xE000, 0x10000), 0x10000, 0x1F42F, 0x10FFFF]:
        assert tokmod._is_kigou(c) == original_kigou(chr(c)), hex(c)
        assert tokmod._is_u2e(c) == original_u2e(chr(c)), hex(c)


def test_clean_text_tags(files):
    tok = GPTNeoXJapaneseTokenizer(*files, do_clean_text=True)
    text = "a http://x.jp/a?b=1 b a.b@c.de 1,000円(税込) 2020/1/2 ─█"
    assert tok.tokenize(text) == ["a", "<SP>", "<URL>", "<SP>", "b", "<SP>", "<EMAIL>", "<SP>", "<PRICE>", "<SP>",
                                  "<DATE>", "<SP>", "<BLOCK>"]  # fmt: skip
    assert GPTNeoXJapaneseTokenizer(*files).tokenize("─█") == ["<U2000U2BFF>", "<U2000U2BFF>"]


def test_pickle_and_deepcopy(tok):
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert (clone._c_scanner is None) == (tok._c_scanner is None)
        assert clone.encode("abc慶應👍🏻Ω") == tok.encode("abc慶應👍🏻Ω")
