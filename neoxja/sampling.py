"""Logits processors and samplers (composable, in the style of mlx-lm).

A *logits processor* is a callable ``(input_ids, logits) -> logits``: ``input_ids`` is the
(B, T) history so far (prompt + generated tokens), ``logits`` the (B, V) scores for the next
token. A *sampler* is a callable ``logits -> next_tokens`` of shape (B,).

`make_logits_processors` builds the list in transformers' order (repetition penalty,
no-repeat-ngram, min-new-tokens, then -- only when sampling -- temperature, top-k, top-p),
so that the distribution sampled from is the one transformers samples from.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[torch.Tensor], torch.Tensor]


def validate_sampling_args(
    do_sample: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    no_repeat_ngram_size: int | None,
) -> None:
    """Raise ValueError for arguments no sampler can honour (checked whether or not they are used)."""
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if no_repeat_ngram_size is not None and (not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0):
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {no_repeat_ngram_size!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if do_sample and (temperature is None or not temperature > 0):
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature}; for greedy decoding use do_sample=False"
        )


# ---------------------------------------------------------------------------------------------
# Processors that also apply to greedy decoding


def vocab_limit_processor(vocab_limit: int) -> LogitsProcessor:
    """Forbid every id >= `vocab_limit`: a model whose vocabulary is padded past its tokenizer's
    (e.g. 8192 rows for 8000 tokens) must never produce an id the tokenizer cannot decode."""

    def process(input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] <= vocab_limit:
            return logits
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
        return logits

    return process



def repetition_penalty_processor(penalty: float, ignore_prefix: torch.Tensor | None = None) -> LogitsProcessor:
    """Penalise every token already in the history (CTRL paper): divide positive logits by
    `penalty`, multiply negative ones. `ignore_prefix` (B,) is the number of left-padding
    positions per row, which are not part of the text and so are not penalised."""

    def process(input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        vocab_size = logits.shape[-1]
        history = input_ids.clamp(max=vocab_size)
        if ignore_prefix is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            history = history.masked_fill(positions[None, :] < ignore_prefix[:, None], vocab_size)
        # one spare column past the vocab absorbs ignored positions
        padded = torch.nn.functional.pad(logits, (0, 1))
        seen = padded.gather(1, history)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return padded.scatter(1, history, seen)[:, :vocab_size]

    return process


def no_repeat_ngram_processor(ngram_size: int, ignore_prefix: torch.Tensor | None = None) -> LogitsProcessor:
    """Forbid any token that would complete an n-gram already present in the history. `ignore_prefix` (B,)
    is the number of left-padding positions per row: n-grams that reach into them are not text and ban
    nothing (transformers counts them, so a padded row could differ from the same prompt alone)."""

    def process(input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length < ngram_size:
            return logits
        # the n-1 newest tokens; every earlier window that starts with them bans its last token
        prefix = input_ids[:, length + 1 - ngram_size :]  # (B, n-1)
        windows = input_ids.unfold(1, ngram_size, 1)  # (B, W, n)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (B, W)
        if ignore_prefix is not None:
            starts = torch.arange(windows.shape[1], device=input_ids.device)  # (W,)
            matches &= starts[None, :] >= ignore_prefix[:, None]
        vocab_size = logits.shape[-1]
        banned = torch.zeros(logits.shape[0], vocab_size + 1, dtype=torch.bool, device=logits.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
        return logits.masked_fill(banned[:, :vocab_size], float("-inf"))

    return process


def min_new_tokens_processor(prompt_length: int, min_new_tokens: int, eos_token_ids: Sequence[int]) -> LogitsProcessor:
    """Forbid the end-of-sequence token(s) until `min_new_tokens` tokens have been generated (an EOS id
    outside the vocabulary can never be generated, so it needs no forbidding)."""

    def process(input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - prompt_length >= min_new_tokens:
            return logits
        logits = logits.clone()
        logits[:, [e for e in eos_token_ids if e < logits.shape[-1]]] = float("-inf")
        return logits

    return process


# ---------------------------------------------------------------------------------------------
# Warpers: only when sampling


def temperature_processor(temperature: float) -> LogitsProcessor:
    return lambda input_ids, logits: logits / temperature


def top_k_processor(top_k: int, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    """Keep the `top_k` highest logits (ties with the k-th are kept, as in transformers)."""
    keep = max(top_k, min_tokens_to_keep)

    def process(input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(logits, min(keep, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    return process


def top_p_processor(top_p: float, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `top_p`."""

    def process(input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)  # the tail whose total mass is at most 1 - top_p
        remove_sorted[..., -min_tokens_to_keep:] = False
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        return logits.masked_fill(remove, float("-inf"))

    return process


def make_logits_processors(
    *,
    do_sample: bool = False,
    temperature: float | None = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = 1.0,
    no_repeat_ngram_size: int | None = 0,
    min_new_tokens: int = 0,
    prompt_length: int = 0,
    eos_token_ids: Sequence[int] = (),
    padding_lengths: torch.Tensor | None = None,
) -> list[LogitsProcessor]:
    """The processors transformers' generate() would apply, in its order."""
    validate_sampling_args(do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size)
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(repetition_penalty_processor(float(repetition_penalty), padding_lengths))
    if no_repeat_ngram_size:
        processors.append(no_repeat_ngram_processor(no_repeat_ngram_size, padding_lengths))
    if min_new_tokens > 0 and len(eos_token_ids) > 0:
        processors.append(min_new_tokens_processor(prompt_length, min_new_tokens, eos_token_ids))
    if do_sample:
        if temperature != 1.0:
            processors.append(temperature_processor(float(temperature)))
        if top_k:
            processors.append(top_k_processor(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(top_p_processor(float(top_p)))
    return processors


def apply_logits_processors(
    processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    for process in processors:
        logits = process(input_ids, logits)
    return logits


# ---------------------------------------------------------------------------------------------
# Samplers


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def make_sampler(do_sample: bool, generator: torch.Generator | None = None) -> Sampler:
    """Greedy argmax, or a draw from softmax(logits) (the processors have already warped them).

    The draw uses `generator` when given, so a seeded generator reproduces the output."""
    if not do_sample:
        return greedy

    def categorical(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return categorical
