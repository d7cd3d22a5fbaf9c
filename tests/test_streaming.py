"""Streamers never emit half a character, and what they emit adds up to the decoded text."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neoxja.streaming import TextIteratorStreamer, TextStreamer


class ByteFallbackTokenizer:
    """A minimal tokenizer with the decoding contract of ours: ASCII letters are tokens, every other
    character is spelled as byte tokens; a run of byte tokens is decoded as one UTF-8 sequence with
    errors="replace"; the result is stripped, as GPT-NeoX-Japanese's tokenizer does."""

    eos_token_id = 0

    def __init__(self):
        self.tokens = ["<|endoftext|>"] + [chr(c) for c in range(32, 127)] + [f"<|byte{b}|>" for b in range(256)]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def encode(self, text: str) -> list[int]:
        out = []
        for ch in text:
            if ch in self.ids and len(ch) == 1 and ord(ch) < 127:
                out.append(self.ids[ch])
            else:
                out += [self.ids[f"<|byte{b}|>"] for b in ch.encode("utf-8")]
        return out

    def decode(self, ids, skip_special_tokens=False) -> str:
        words, run = [], bytearray()
        for i in ids:
            tok = self.tokens[i]
            if tok.startswith("<|byte"):
                run.append(int(tok[6:-2]))
                continue
            if run:
                words.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if skip_special_tokens and tok == "<|endoftext|>":
                continue
            words.append(tok)
        if run:
            words.append(run.decode("utf-8", errors="replace"))
        return "".join(words).strip()


class Recorder(TextStreamer):
    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.pieces: list[str] = []
        self.ended = 0

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ended += stream_end


def stream(tokenizer, ids, **kw):
    rec = Recorder(tokenizer, **kw)
    for t in ids:
        rec.put(torch.tensor([[t]]))
    rec.end()
    return rec


def test_multibyte_characters_are_held_back_until_complete():
    tok = ByteFallbackTokenizer()
    ids = tok.encode("aあ😀b")  # 'a', 3 bytes, 4 bytes, 'b'
    rec = stream(tok, ids)
    assert "".join(rec.pieces) == "aあ😀b"
    assert [p for p in rec.pieces if p] == ["a", "あ", "😀", "b"]
    assert rec.ended == 1


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x1FFFF, blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=30))
def test_stream_adds_up_to_decode_and_never_splits_a_character(text):
    tok = ByteFallbackTokenizer()
    ids = tok.encode(text)
    rec = stream(tok, ids)
    final = tok.decode(ids)
    assert "".join(rec.pieces) == final
    # valid UTF-8 throughout: no piece ever carries a replacement character
    assert all("\ufffd" not in p for p in rec.pieces)
    # each emitted prefix is a prefix of the final text (nothing is taken back)
    emitted = ""
    for p in rec.pieces:
        emitted += p
        assert final.startswith(emitted)


def test_bytes_that_never_complete_are_flushed_at_the_end():
    tok = ByteFallbackTokenizer()
    ids = [tok.ids["a"], tok.ids["<|byte227|>"], tok.ids["<|byte129|>"]]  # 'a' + the first 2 of 3 bytes
    rec = stream(tok, ids)
    assert rec.pieces[:-1] == ["a"] or "".join(rec.pieces[:-1]) == "a"
    assert "".join(rec.pieces) == "a\ufffd"


def test_invalid_bytes_followed_by_text_are_emitted_as_replacement():
    tok = ByteFallbackTokenizer()
    ids = [tok.ids["<|byte255|>"], tok.ids["x"], tok.ids["y"]]
    rec = stream(tok, ids)
    assert rec.pieces[0] == "\ufffdx"  # emitted as soon as a later token shows the bytes are final
    assert "".join(rec.pieces) == "\ufffdxy"


def test_skip_prompt_and_decode_kwargs():
    tok = ByteFallbackTokenizer()
    rec = Recorder(tok, skip_prompt=True, skip_special_tokens=True)
    rec.put(torch.tensor([tok.encode("prompt")]))
    for t in tok.encode("ok") + [tok.eos_token_id]:
        rec.put(torch.tensor([t]))
    rec.end()
    assert "".join(rec.pieces) == "ok"


def test_batch_larger_than_one_is_refused():
    with pytest.raises(ValueError, match="batch size 1"):
        TextStreamer(ByteFallbackTokenizer()).put(torch.zeros(2, 3, dtype=torch.long))


def test_text_streamer_prints_to_stdout(capsys):
    tok = ByteFallbackTokenizer()
    s = TextStreamer(tok)
    for t in tok.encode("hi 日本"):
        s.put(torch.tensor([t]))
    s.end()
    assert capsys.readouterr().out == "hi 日本\n"


def test_iterator_streamer_from_another_thread():
    tok = ByteFallbackTokenizer()
    ids = tok.encode("yes, 日本語です")
    streamer = TextIteratorStreamer(tok, timeout=10)

    def producer():
        for t in ids:
            streamer.put(torch.tensor([[t]]))
        streamer.end()

    thread = threading.Thread(target=producer)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == "yes, 日本語です"
    assert all("\ufffd" not in p for p in pieces)


def test_iterator_streamer_documented_pattern_with_generate(bundled_dir):
    """The docstring's pattern: generate() on the caller's thread, the iterating on another; the pieces add
    up to the generated text (and never split a character)."""
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("吾輩は猫である。")])
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    pieces = []
    printer = threading.Thread(target=lambda: pieces.extend(streamer))
    printer.start()
    model.generate(ids, max_new_tokens=24, do_sample=False, streamer=streamer)
    printer.join(timeout=60)
    assert not printer.is_alive()
    assert "".join(pieces) == tok.decode(expected)
    assert all("\ufffd" not in p for p in pieces)


def test_real_tokenizer_byte_fallback_tokens_are_held_back(abeja_dir):
    """With the abeja vocabulary, characters outside it (here rare kanji, Hangul and a supplementary-plane
    character) become runs of byte tokens; streaming them token by token never emits a half character."""
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(abeja_dir)
    text = "吉野家の龘靐齉と한국어、𝔘。"
    ids = tok.encode(text)
    # the premise: byte fallback happens (a lone byte token decodes to U+FFFD)
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 20
    rec = stream(tok, ids)
    assert "".join(rec.pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in rec.pieces)
    # at least one token was held back: there are fewer non-empty pieces than tokens
    assert len([p for p in rec.pieces if p]) < len(ids)
