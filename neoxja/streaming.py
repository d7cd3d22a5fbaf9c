"""Streamers for generate(): print (TextStreamer) or yield (TextIteratorStreamer) text as it is produced.

The API is transformers' (`put(tokens)`, `end()`, `on_finalized_text(text, stream_end)`), so the same
calling code works. The difference is the rule for what may be emitted: everything decoded so far except
a trailing run of U+FFFD. The tokenizer decodes a run of byte-fallback tokens as one UTF-8 sequence with
errors="replace", so a character whose bytes have only partly been generated shows up as a trailing
U+FFFD; holding it back until the bytes complete means a half character is never emitted. (Text that is
invalid UTF-8 for good is emitted, as U+FFFD, once a later token follows it, or at the end.)
"""

from __future__ import annotations

import sys
from queue import Queue
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class TextStreamer:
    """Decode tokens as generate() produces them and print the text to stdout.

    >>> streamer = TextStreamer(tokenizer, skip_prompt=True)
    >>> model.generate(input_ids, max_new_tokens=20, streamer=streamer)

    `decode_kwargs` (e.g. skip_special_tokens=True) are passed to `tokenizer.decode`. Only one
    sequence can be streamed at a time (batch size 1), as in transformers.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0  # characters of decode(token_cache) already emitted
        self.next_tokens_are_prompt = True

    def put(self, value) -> None:
        """Receive the prompt (first call) or newly generated token(s): a tensor of shape (1, T) or (T,), or a list."""
        tokens = _as_token_list(value)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(tokens)
        # Re-decode the whole stream: the tokenizer strips and joins byte runs, so only the full
        # decode is exact; the cost is linear in the stream length per token and is negligible next to a forward.
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        complete = len(text.rstrip(REPLACEMENT_CHARACTER))  # hold back an unfinished UTF-8 byte run
        if complete > self.print_len:
            printable = text[self.print_len : complete]
            self.print_len = complete
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush whatever is left (including U+FFFD for bytes that never completed) and end the stream."""
        printable = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len :]
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Print new text to stdout; a newline after the end of the stream. Override to send it elsewhere."""
        print(text, flush=True, end="\n" if stream_end else "", file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over from another thread while generate() runs:

    >>> streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    >>> thread = threading.Thread(target=model.generate, args=(input_ids,), kwargs=dict(streamer=streamer))
    >>> thread.start()
    >>> for piece in streamer: print(piece, end="")

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
