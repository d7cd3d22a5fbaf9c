"""`do_clean_text` of the GPT-NeoX-Japanese encoder, in time linear in the input.

The original encoder (Japanese-BPEEncoder_V2) replaces URLs, e-mail addresses, phone numbers,
dates and prices with tags, using six regular expressions applied one after the other with
`re.sub`.  Three of them backtrack badly in Python's `re`:

* e-mail `[A-Za-z0-9._+]*@...` rescans a long run of letters from every start position (quadratic);
* date `([12]\\d{3}[/\\-年])*(month)...` rescans a long chain of years from every year (quadratic);
* price: `(amount*億)*(amount*万)*(amount*千)*amount*unit+tax*` is exponential on digits and commas.

For these three, this module finds exactly the spans that `re.sub` with the original pattern
replaces (leftmost-first, scanning on after each match), with scanners whose correctness rests
on the arguments in their docstrings and on the differential tests in tests/test_tokenizer_clean.py,
which compare them with the original backtracking patterns on random short strings.  The other
three patterns cannot backtrack far and are used as they are.  The `ORIGINAL_*` patterns are
kept here as the definition (and the tests' oracle); they are never run on user text.
"""

from __future__ import annotations

import re

_TAIL = r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*"
_UNIT = r"(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)"
_TAX = r"(\(税込\)|\(税抜\)|\+tax)"
_AMOUNT = r"(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)"

URL = re.compile(r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)")
ORIGINAL_EMAIL = re.compile(r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*")
TEL = re.compile(r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}")
ORIGINAL_DATE = re.compile(r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*" + _TAIL)
ERA_DATE = re.compile(
    r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月(0?[1-9]|[12][0-9]|3[01])日" + _TAIL
)
# The original price pattern (exponential on long runs of digits and commas: oracle only).
ORIGINAL_PRICE = re.compile(
    rf"({_AMOUNT}*億)*({_AMOUNT}*万)*({_AMOUNT}*千)*{_AMOUNT}*{_UNIT}+{_TAX}*"
)

_KEISEN = "─━│┃┄┅┆┇┈┉┊┋┌┍┎┏┐┑┒┓└┕┖┗┘┙┚┛├┝┞┟┠┡┢┣┤┥┦┧┨┩┪┫┬┭┮┯┰┱┲┳┴┵┶┷┸┹┺┻┼┽┾┿╀╁╂╃╄╅╆╇╈╉╊╋╌╍╎╏═║╒╓╔╕╖╗╘╙╚╛╜╝╞╟╠╡╢╣╤╥╦╧╨╩╪╫╬╭╮╯╰╱╲╳╴╵╶╷╸╹╺╻╼╽╾╿"
_BLOCKS = "▀▁▂▃▄▅▆▇█▉▊▋▌▍▎▏▐░▒▓▔▕▖▗▘▙▚▛▜▝▞▟"
_TO_BLOCK = str.maketrans(dict.fromkeys(_KEISEN + _BLOCKS, "<BLOCK>"))
_BLOCK_CHAR = re.compile("[" + re.escape(_KEISEN + _BLOCKS) + "]")
_BLOCK_RUN = re.compile(r"(?:<BLOCK>){2,}")


def clean_text(text: str) -> str:
    """The original encoder's clean_text: the same result, in linear time."""
    text = URL.sub("<URL>", text)
    text = sub_spans(text, email_spans(text), "<EMAIL>")
    text = TEL.sub("<TEL>", text)
    text = sub_spans(text, date_spans(text), "<DATE>")
    text = ERA_DATE.sub("<DATE>", text)
    text = sub_spans(text, price_spans(text), "<PRICE>")
    if _BLOCK_CHAR.search(text):
        text = text.translate(_TO_BLOCK)
    # The original halves runs with str.replace until none is left: one tag per run.
    return _BLOCK_RUN.sub("<BLOCK>", text) if "<BLOCK><BLOCK>" in text else text


def sub_spans(text: str, spans: list[tuple[int, int]], tag: str) -> str:
    """Replace each (start, end) span (sorted, disjoint) with tag."""
    if not spans:
        return text
    pieces, last = [], 0
    for start, end in spans:
        pieces.append(text[last:start])
        pieces.append(tag)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


# --- e-mail -------------------------------------------------------------------------------------

_EMAIL_PIECES = re.compile(r"[A-Za-z0-9._+]+|@(?=[\-_0-9A-Za-z])")
_EMAIL_TAIL = re.compile(r"@[\-_0-9A-Za-z]+(?:\.[A-Za-z]+)*")


def email_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ORIGINAL_EMAIL.sub.

    The prefix class has no '@', so `X*@` from s matches only if the maximal X-run from s ends
    at an '@' that a domain character follows; every s in that run qualifies and the leftmost
    one (not before the end of the previous match) is the start.  The rest is greedy and always
    succeeds, so the match ends where _EMAIL_TAIL ends.
    """
    spans: list[tuple[int, int]] = []
    if "@" not in text:
        return spans
    pos = 0
    run_start = run_end = -1
    for m in _EMAIL_PIECES.finditer(text):
        start = m.start()
        if text[start] != "@":
            run_start, run_end = start, m.end()
            continue
        if start < pos:
            continue
        s = max(run_start, pos) if run_end == start else start
        end = _EMAIL_TAIL.match(text, start).end()
        spans.append((s, end))
        pos = end
    return spans


# --- dates --------------------------------------------------------------------------------------

_YEAR_AT = re.compile(r"(?=[12]\d{3}[/\-年])")
_MONTH_AT = re.compile(r"(?=(?:0?[1-9]|1[0-2])[/\-月])")


def date_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ORIGINAL_DATE.sub.

    A year `[12]ddd<sep>` has digits at offsets 1-3, so the month `(0?[1-9]|1[0-2])<sep>` (its
    separator at offset 1 or 2) never matches where a year starts: backing off the greedy year
    loop cannot help, and a match starts at s exactly when the month matches at the end q(s) of
    the chain of years from s.  q is shared along a chain and memoised, which makes the search
    linear; the rest of the pattern always succeeds, so the original pattern, run from a known
    start, finishes without backtracking.
    """
    spans: list[tuple[int, int]] = []
    if "/" not in text and "-" not in text and "月" not in text:
        return spans  # every date has a separator
    months = {m.start() for m in _MONTH_AT.finditer(text)}
    if not months:
        return spans
    years = {m.start() for m in _YEAR_AT.finditer(text)}
    chain_end: dict[int, int] = {}

    def end_of_years(s: int) -> int:
        path = []
        j = s
        while j in years and j not in chain_end:
            path.append(j)
            j += 5
        q = chain_end.get(j, j)
        for k in path:
            chain_end[k] = q
        return q

    pos = 0
    for s in sorted(months | years):
        if s < pos or end_of_years(s) not in months:
            continue
        end = ORIGINAL_DATE.match(text, s).end()
        spans.append((s, end))
        pos = end
    return spans


# --- prices -------------------------------------------------------------------------------------

_PRICE_PIECES = re.compile(r"[\d,億万千]+|円|ドル|ユーロ")
_PRICE_TAIL = re.compile(_UNIT + "+" + _TAX + "*")


class _NFA:
    """A small Thompson NFA over character classes, for the price prefix grammar."""

    def __init__(self):
        self.edges: list[list[tuple[frozenset, int]]] = []
        self.eps: list[list[int]] = []

    def state(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    # Each builder returns (entry, exit) of a fragment.
    def chars(self, classes):
        a, b = self.state(), self.state()
        self.edges[a].append((frozenset(classes), b))
        return a, b

    def empty(self):
        s = self.state()
        return s, s

    def cat(self, *frags):
        for (_, x), (y, _) in zip(frags, frags[1:]):
            self.eps[x].append(y)
        return frags[0][0], frags[-1][1]

    def alt(self, *frags):
        a, b = self.state(), self.state()
        for x, y in frags:
            self.eps[a].append(x)
            self.eps[y].append(b)
        return a, b

    def star(self, make):
        a, b = self.state(), self.state()
        x, y = make()
        self.eps[a] += [x, b]
        self.eps[y] += [x, b]
        return a, b

    def plus(self, make):
        return self.cat(make(), self.star(make))

    def reversed(self) -> "_NFA":
        rev = _NFA()
        for _ in self.edges:
            rev.state()
        for u, out in enumerate(self.edges):
            for classes, v in out:
                rev.edges[v].append((classes, u))
        for u, out in enumerate(self.eps):
            for v in out:
                rev.eps[v].append(u)
        return rev


# character classes of the prefix alphabet: ASCII 0, ASCII 1-9, other decimal digits, the rest literally
_ZERO, _NONZERO, _OTHER_DIGIT = "0", "1-9", "other-digit"
_DIGIT = (_ZERO, _NONZERO, _OTHER_DIGIT)


def _price_prefix_nfa():
    """NFA of (amount* 億)* (amount* 万)* (amount* 千)* amount*, amount := 0 | [1-9]\\d* | [1-9]\\d{0,2}(,\\d{3})+."""
    nfa = _NFA()

    def digit():
        return nfa.chars(_DIGIT)

    def amount():
        plain = nfa.cat(nfa.chars([_NONZERO]), nfa.star(digit))
        head = nfa.cat(nfa.chars([_NONZERO]), nfa.alt(nfa.empty(), digit(), nfa.cat(digit(), digit())))
        group = lambda: nfa.cat(nfa.chars([","]), digit(), digit(), digit())  # noqa: E731
        with_commas = nfa.cat(head, nfa.plus(group))
        return nfa.alt(nfa.chars([_ZERO]), plain, with_commas)

    def section(sep):
        return lambda: nfa.cat(nfa.star(amount), nfa.chars([sep]))

    start, end = nfa.cat(nfa.star(section("億")), nfa.star(section("万")), nfa.star(section("千")), nfa.star(amount))
    return nfa, start, end


class _ReverseDFA:
    """Lazily determinised reverse of the price prefix NFA: reads text right to left."""

    def __init__(self):
        nfa, start, end = _price_prefix_nfa()
        self.rev = nfa.reversed()
        self.entry = end  # reverse of the forward accept state
        self.accept = start
        self.steps: dict[tuple[frozenset, str], frozenset] = {}

    def closure(self, states) -> frozenset:
        stack, seen = list(states), set(states)
        while stack:
            for v in self.rev.eps[stack.pop()]:
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
        return frozenset(seen)

    def step(self, states: frozenset, cls: str) -> frozenset:
        key = (states, cls)
        nxt = self.steps.get(key)
        if nxt is None:
            moved = {v for u in states for classes, v in self.rev.edges[u] if cls in classes}
            nxt = self.steps[key] = self.closure(moved)
        return nxt


def _char_class(c: str) -> str:
    if c == "0":
        return _ZERO
    if "1" <= c <= "9":
        return _NONZERO
    if c.isdecimal():  # what Python's \d matches in str patterns
        return _OTHER_DIGIT
    return c


_CHAR_CLASSES: dict[str, str] = {}
_REVERSE_DFA: _ReverseDFA | None = None


def price_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ORIGINAL_PRICE.sub.

    The prefix only consumes digits, ',' and 億万千, and every unit ends in 円, ドル or ユーロ
    (its 千/万 head, if any, are prefix characters too).  So a match that starts at s uses the
    currency c at the end of the prefix-character run containing s, and the prefix must parse
    text[s:e] with e = c, or e = c-1 / c-2 when text[e:c] is 千, 万 or 千万.  Whichever e the
    backtracking search settles on, the units after it end at the same place, so the span is
    [leftmost such s, end of the greedy units and taxes from c).  The leftmost s comes from one
    right-to-left pass of a (lazily built) DFA for the reversed prefix grammar over the run.
    Every currency thus starts or ends a match: an unqualified 円 is a match by itself.
    """
    global _REVERSE_DFA
    spans: list[tuple[int, int]] = []
    if "円" not in text and "ドル" not in text and "ユーロ" not in text:
        return spans
    if _REVERSE_DFA is None:
        _REVERSE_DFA = _ReverseDFA()
    dfa = _REVERSE_DFA
    entry = dfa.closure([dfa.entry])
    accept, steps, classes = dfa.accept, dfa.steps, _CHAR_CLASSES
    pos = 0
    run_start = run_end = -1
    for m in _PRICE_PIECES.finditer(text):
        c = m.start()
        if text[c] not in "円ドユ":
            run_start, run_end = c, m.end()
            continue
        if c < pos:
            continue
        lo = max(run_start, pos) if run_end == c else c
        ends = {c}
        if c - 1 >= lo and text[c - 1] in "千万":
            ends.add(c - 1)
            if c - 2 >= lo and text[c - 2 : c] == "千万":
                ends.add(c - 2)
        start = c
        states: frozenset = frozenset()
        for i in range(c, lo - 1, -1):
            if i in ends:
                states = dfa.closure(states | entry)
            if accept in states:
                start = i
            if i == lo or (not states and i <= c - 2):
                break
            ch = text[i - 1]
            cls = classes.get(ch) or classes.setdefault(ch, _char_class(ch))
            nxt = steps.get((states, cls))
            states = nxt if nxt is not None else dfa.step(states, cls)
        end = _PRICE_TAIL.match(text, c).end()
        spans.append((start, end))
        pos = end
    return spans
