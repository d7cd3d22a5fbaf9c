"""do_clean_text: the linear-time scanners against the original backtracking patterns."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from neoxja import _tokenizer_clean as clean


def original_clean_text(text: str) -> str:
    """The original encoder's clean_text, with its backtracking patterns (short inputs only)."""
    text = clean.URL.sub("<URL>", text)
    text = clean.ORIGINAL_EMAIL.sub("<EMAIL>", text)
    text = clean.TEL.sub("<TEL>", text)
    text = clean.ORIGINAL_DATE.sub("<DATE>", text)
    text = clean.ERA_DATE.sub("<DATE>", text)
    text = clean.ORIGINAL_PRICE.sub("<PRICE>", text)
    text = text.translate(clean._TO_BLOCK)
    while "<BLOCK><BLOCK>" in text:
        text = text.replace("<BLOCK><BLOCK>", "<BLOCK>")
    return text


def spans(pattern: re.Pattern, text: str):
    return [m.span() for m in pattern.finditer(text)]


def pieces(*alphabet, max_size=14):
    return st.lists(st.sampled_from(alphabet), max_size=max_size).map("".join)


# Fragments that exercise every branch: ASCII and other decimal digits (１, ٣), commas, the
# three section characters, all units and their heads, taxes, and near misses.
PRICE_TEXT = pieces(
    *"0123456789", "１", "٣", ",", ",", "億", "万", "千", "円", "ドル", "ユーロ", "ド", "ユー", "ル",
    "(税込)", "(税抜)", "+tax", "(税", "x", "千万", "千円",
)  # fmt: skip
EMAIL_TEXT = pieces(*"ab9._+-@Z", "@", "@", ".com", " ", "あ", "@-")
DATE_TEXT = pieces(
    *"0123456789", "1", "2", "/", "-", "年", "月", "日", "時", "分", ":", "(日)", "(土)", "㈰", "１", "2000/", "12月",
    max_size=16,
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(PRICE_TEXT)
@example("1,000円")
@example("0,000円")
@example("5千万円(税込)+tax")
@example("1,0000円千円")
@example("12,345,67円")
@example("1１円")
def test_price_spans_equal_the_original_pattern(text):
    assert clean.price_spans(text) == spans(clean.ORIGINAL_PRICE, text)


@settings(max_examples=500, deadline=None)
@given(EMAIL_TEXT)
@example("a@b@c")
@example("x@-b@c.de.f")
@example("a@@b")
def test_email_spans_equal_the_original_pattern(text):
    assert clean.email_spans(text) == spans(clean.ORIGINAL_EMAIL, text)


@settings(max_examples=500, deadline=None)
@given(DATE_TEXT)
@example("2000/2001/12/31日12時(日)")
@example("1999年1000年1月")
@example("10/")
def test_date_spans_equal_the_original_pattern(text):
    assert clean.date_spans(text) == spans(clean.ORIGINAL_DATE, text)


MIXED_TEXT = pieces(
    "http://a.b/c", "ftp", "://", "a@b.c", "@", "03-1234-5678", "(03)1234", "2020/", "1/", "12月", "3日",
    "明治", "1年", "1,000", "円", "ドル", "千", "(税込)", "─", "█", "<BLOCK>", " ", "あ", "1", "0", ",",
    max_size=10,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(MIXED_TEXT)
def test_clean_text_equals_the_original(text):
    assert clean.clean_text(text) == original_clean_text(text)


def substitute(kind: str, text: str) -> str:
    find = {"price": clean.price_spans, "email": clean.email_spans, "date": clean.date_spans}[kind]
    return clean.sub_spans(text, find(text), f"<{kind.upper()}>")


@pytest.mark.parametrize(
    "kind, text, expected",
    [
        ("price", "1,0" * 333_333 + "円", "1,0" * 333_332 + "1,<PRICE>"),  # no amount ends in ',': from the last 0
        ("price", "9" * 1_000_000 + "ドル(税抜)", "<PRICE>"),
        ("price", "1,000" * 100_000 + "億" + "1,000" * 100_000 + "円", "<PRICE>"),
        ("email", "a" * 200_000, "a" * 200_000),  # e-mail prefix without '@'
        ("email", "a" * 200_000 + "@b.cd", "<EMAIL>"),
        ("email", "a." * 100_000 + "@", "a." * 100_000 + "@"),
        ("date", "2000/" * 40_000 + "1/31日", "<DATE>"),  # a chain of years, then a month
        ("date", "1000年" * 40_000, "1000年" * 40_000),  # years without a month
    ],
    ids=["commas", "digits-dollars", "oku", "letters", "email", "at-end", "years", "no-month"],
)
def test_long_inputs_are_linear(kind, text, expected):
    # Each input makes the original pattern backtrack quadratically or exponentially.
    assert substitute(kind, text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("1," * 500_000, "1," * 500_000), ("1,000" * 200_000 + "円", "<PRICE>")],
    ids=["digits-commas", "one-price"],
)
def test_megabyte_of_digits_and_commas_cleans(text, expected):
    assert clean.clean_text(text) == expected


def test_port_price_pattern_differs_from_the_original():
    """Defect 3: transformers' possessive rewrite matches other spans; here the original's are used."""
    from transformers.models.gpt_neox_japanese.tokenization_gpt_neox_japanese import SubWordJapaneseTokenizer

    port = SubWordJapaneseTokenizer(vocab={"a": 0}, ids_to_tokens={0: ["a"]}, emoji={"emoji": {}, "emoji_inv": {}})
    for text, ours in [("0,000円", "0,<PRICE>"), ("１０円", "１０<PRICE>"), ("１万円", "１<PRICE>")]:
        assert clean.ORIGINAL_PRICE.sub("<PRICE>", text) == clean.clean_text(text) == ours
        assert port.clean_text(text) == "<PRICE>" != ours


@pytest.mark.parametrize(
    "unit",
    ["明治1年1月1日。", "090-1234-5678。", "(03)1234-5678。", "1999年12月31日(金)。", "a.b@c.de。", "1,000円(税込)。",
     "https://x.jp/?a=1。", "──。", "1月2日3時。", "１０円。"],
)  # fmt: skip
def test_repeated_items_clean_independently(unit):
    # Every pattern stops at '。', so a long repetition cleans like one unit, repeated.
    assert clean.clean_text(unit * 20_000) == clean.clean_text(unit) * 20_000
    assert clean.clean_text(unit) == original_clean_text(unit)
