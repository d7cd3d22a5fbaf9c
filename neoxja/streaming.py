"""Incremental detokenizing: turn a growing list of token ids into text that is safe to show now.

`IncrementalDetokenizer` (shared by TextStreamer and the server, `neoxja serve`) releases text under
two rules:

- never half a character: the tokenizer decodes a run of byte-fallback tokens as one UTF-8 sequence
  with errors="replace", so a character whose bytes have only partly been generated would show up as a
  trailing U+FFFD; such text is held until the bytes complete (text that is invalid UTF-8 for good is
  released, as U+FFFD, once a later token follows it, or at the end);
- never part of a stop string: with `stop` strings, a suffix that could still grow into one of them is
  held until it cannot, and the text ends just before the first stop string found (which is not
  returned).

The joined releases equal `tokenizer.decode(ids)` cut before the first stop string. With this
project's tokenizer (it exposes each id's UTF-8 bytes) the work per token is constant, so a stream is
linear in its length; with another tokenizer the ids are re-decoded in full on each token.

The streamers' API is transformers' (`put(tokens)`, `end()`, `on_finalized_text(text, stream_end)`),
so the same calling code works.
"""

from __future__ import annotations

import codecs
import sys
from queue import Queue
from typing import Any, Iterable, Sequence

REPLACEMENT_CHARACTER = "\ufffd"


class _ByteSource:
    """Text of the ids so far through an incremental UTF-8 decoder: constant work per token.

    For tokenizers whose decode is the concatenation of per-id UTF-8 bytes decoded with
    errors="replace" (this project's; `_id_bytes` is that table)."""

    def __init__(self, id_bytes: Sequence[bytes], skip_ids: frozenset[int]):
        self.id_bytes = id_bytes
        self.skip_ids = skip_ids
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Iterable[int]) -> str:
        table, skip = self.id_bytes, self.skip_ids
        data = b"".join([table[i] for i in ids if i not in skip])
        return self.decoder.decode(data) if data else ""

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class _RedecodeSource:
    """Any tokenizer with `decode(ids, **kwargs)`: re-decode all ids, release what grew (quadratic)."""

    def __init__(self, tokenizer: Any, decode_kwargs: dict):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self.released = 0  # characters of decode(ids) already returned

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        # the unfinished tail of a byte run decodes as U+FFFD: return only what is before it
        complete = len(text.rstrip(REPLACEMENT_CHARACTER))
        if complete <= self.released:
            return ""
        new = text[self.released : complete]
        self.released = complete
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs) if self.ids else ""
        new = text[self.released :]
        self.released = len(text)
        return new


def _make_source(tokenizer: Any, skip_special_tokens: bool, decode_kwargs: dict):
    id_bytes = getattr(tokenizer, "_id_bytes", None)
    if isinstance(id_bytes, list) and set(decode_kwargs) <= {"skip_special_tokens"}:
        skip = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        return _ByteSource(id_bytes, skip)
    return _RedecodeSource(tokenizer, {**decode_kwargs, "skip_special_tokens": skip_special_tokens}
                           if skip_special_tokens else decode_kwargs)


class IncrementalDetokenizer:
    """Ids in, safe text out.

    >>> detok = IncrementalDetokenizer(tokenizer, stop=["。"])
    >>> for token in tokens:
    ...     print(detok.add([token]), end="")
    ...     if detok.stopped: break
    >>> print(detok.finish())

    `add(ids)` returns the text that became safe; `finish()` returns the rest (an unfinished byte run
    as U+FFFD). After a stop string is found, `stopped` is True, `stop_string` names it, and later
    ids are ignored. `text` is everything returned so far.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = False,
                 **decode_kwargs: Any):
        stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = stop
        self.source = _make_source(tokenizer, skip_special_tokens, decode_kwargs)
        self.pending = ""  # decoded text not yet returned: a trailing U+FFFD run or a possible stop prefix
        self.text = ""
        self.stopped = False
        self.stop_string: str | None = None
        self.finished = False

    def add(self, ids: Iterable[int] | int) -> str:
        if self.stopped or self.finished:
            return ""
        if isinstance(ids, int):
            ids = (ids,)
        self.pending += self.source.push(ids)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped or self.finished:
            self.finished = True
            return ""
        self.finished = True
        self.pending += self.source.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        pending = self.pending
        if self.stop:
            # every stop string that could end in `pending` starts in it: nothing returned could begin one
            first, which = -1, None
            for s in self.stop:
                i = pending.find(s)
                if i >= 0 and (first < 0 or i < first):
                    first, which = i, s
            if first >= 0:
                self.stopped, self.stop_string = True, which
                out, self.pending = pending[:first], ""
                self.text += out
                return out
        keep = 0
        if not final:
            keep = len(pending) - len(pending.rstrip(REPLACEMENT_CHARACTER))
            if self.stop:
                keep = max(keep, _longest_stop_prefix_suffix(pending, self.stop))
        cut = len(pending) - keep
        out, self.pending = pending[:cut], pending[cut:]
        self.text += out
        return out


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStreamer:
    """Decode tokens as generate() produces them and print the text to stdout.

    >>> streamer = TextStreamer(tokenizer, skip_prompt=True)
    >>> model.generate(input_ids, max_new_tokens=20, streamer=streamer)

    `decode_kwargs` (e.g. skip_special_tokens=True) are passed to `tokenizer.decode`. Only one
    sequence can be streamed at a time (batch size 1), as in transformers. Text is released by an
    IncrementalDetokenizer: never half a character, time linear in the stream with this project's tokenizer.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.detokenizer: IncrementalDetokenizer | None = None
        self.next_tokens_are_prompt = True

    def _new_detokenizer(self) -> IncrementalDetokenizer:
        kwargs = dict(self.decode_kwargs)
        skip = bool(kwargs.pop("skip_special_tokens", False))
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens=skip, **kwargs)

    def put(self, value) -> None:
        """Receive the prompt (first call) or newly generated token(s): a tensor of shape (1, T) or (T,), or a list."""
        tokens = _as_token_list(value)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        if self.detokenizer is None:
            self.detokenizer = self._new_detokenizer()
        printable = self.detokenizer.add(tokens)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush whatever is left (including U+FFFD for bytes that never completed) and end the stream."""
        printable = self.detokenizer.finish() if self.detokenizer is not None else ""
        self.detokenizer = None
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Print new text to stdout; a newline after the end of the stream. Override to send it elsewhere."""
        print(text, flush=True, end="\n" if stream_end else "", file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over from another thread while generate() runs. Keep generate() on the thread
    that loaded the model and iterate on the other one:

    >>> streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    >>> printer = threading.Thread(target=lambda: [print(piece, end="") for piece in streamer], daemon=True)
    >>> printer.start()
    >>> model.generate(input_ids, streamer=streamer)
    >>> printer.join()

    (daemon=True: should generate() fail before it starts streaming, the printer does not keep the process alive.)

    The other way round (transformers' example: generate() on a new thread, the caller iterating) gives the
    same text, but torch runs 2-3x slower there whenever the caller's thread has run parallel torch work
    (loading the model does): each thread that enters a parallel region gets its own OpenMP team, and once
    libgomp manages more threads than CPUs its idle workers stop spinning, so every later parallel region
    waits for the kernel to wake one. The bundled model, 200 greedy tokens on 2 cores: 163-178 tok/s that
    way, 450-467 this way (docs/serving.md, "Performance").

    `timeout` (seconds) bounds each wait for the next piece; queue.Empty is raised when it passes.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


def _as_token_list(value) -> list[int]:
    if hasattr(value, "tolist"):
        shape = tuple(value.shape)
        if len(shape) > 1:
            if shape[0] != 1:
                raise ValueError(f"streamers support batch size 1 only, got tokens of shape {shape}")
            value = value[0]
        tokens = value.tolist()
        return tokens if isinstance(tokens, list) else [tokens]
    if isinstance(value, int):
        return [value]
    tokens = list(value)
    if tokens and isinstance(tokens[0], (list, tuple)):
        if len(tokens) != 1:
            raise ValueError(f"streamers support batch size 1 only, got {len(tokens)} sequences")
        tokens = list(tokens[0])
    return [int(t) for t in tokens]
