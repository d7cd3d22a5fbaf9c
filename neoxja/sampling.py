"""Logits processing and sampling: per-request parameters for a batch of rows (serving, generate()), and
the composable transformers-order processors they are built from.

Per-row API (used by `generate()` and by the serving engine; names are stable):

- `SamplingParams`: one request's parameters, with vLLM/OpenAI names, validated on construction
  (`ValueError` naming the field).
- `SamplingBatch(params, eos_token_ids, generators=..., vocab_limit=...)`: the per-row parameters of the
  rows of a decode step, as tensors. `batch.sample(logits (B, V), history)` runs the logits pipeline and the
  sampler and returns `SampleOutput(tokens (B,), logprobs | None)`, all on the logits' device and without a
  host sync. `history` (a `History`) holds each row's prompt + generated tokens.
  Pipeline order: vocab_limit mask, min_tokens (EOS and stop_token_ids forbidden), repetition_penalty
  (prompt + output, transformers/CTRL), presence/frequency_penalty (output only, OpenAI), no_repeat_ngram;
  then for sampled rows temperature, top_k, top_p (transformers' order); greedy rows take the argmax.
  Draws: with one shared `torch.Generator` (or None: torch's default), one batched multinomial over all rows,
  as transformers draws (generate()); with a list of per-row generators, each row draws alone with its own,
  so a seeded row draws the same whatever shares its batch (serving).
  Logprobs (`params.logprobs = N`, N <= 20): as vLLM by default, of the model's raw distribution
  (log_softmax of the unprocessed logits): the chosen token's and the top N; `logprobs_mode="processed"`
  gives those of the distribution actually sampled from (after every processor, temperature included).
- `StopRules(params, eos_token_ids, max_length)`: `check(next_tokens, num_generated, seq_lengths)` gives per
  row FINISH_NONE / FINISH_STOP (EOS unless ignore_eos, or a stop_token_id; only once min_tokens are out) /
  FINISH_LENGTH (max_tokens reached, or the sequence fills max_length positions). Stop *strings* are text:
  the serving detokenizer (or generate()'s stop-string checker) matches them; SamplingParams only carries them.

Composable processors (mlx-lm style): a *logits processor* is a callable ``(input_ids, logits) -> logits``
(``input_ids`` the (B, T) history, ``logits`` the (B, V) next-token scores); a *sampler* maps logits to
next tokens (B,). `make_logits_processors` builds them in transformers' order (repetition penalty,
no-repeat-ngram, min-new-tokens, then -- only when sampling -- temperature, top-k, top-p).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------
# Per-row parameters: SamplingParams, SamplingBatch, StopRules

MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs


class ParamError(ValueError):
    """An invalid SamplingParams field; `param` names it (the server's 400 reports it as `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


@dataclass
class SamplingParams:
    """One request's generation parameters (vLLM/OpenAI names). Validated on construction.

    max_tokens: new tokens at most (None: until the context is full). temperature: 0 means greedy (as
    OpenAI/vLLM); `do_sample` overrides that choice (False: greedy whatever the temperature, as
    transformers' do_sample=False; True: sample, temperature must be > 0). top_k 0 or -1: off. top_p 1: off.
    min_tokens: EOS and stop_token_ids are forbidden before that many new tokens. repetition_penalty
    (transformers/CTRL: over prompt and output), presence_penalty and frequency_penalty (OpenAI: over the
    output), no_repeat_ngram_size (transformers). stop: strings, matched on text by the caller's detokenizer;
    stop_token_ids end the sequence like EOS; ignore_eos: EOS does not end it. seed: the row's own
    torch.Generator (see `make_generator`). logprobs: top-N log-probabilities to return (0..20; None: none).
    n: completions per prompt (the caller fans them out). skip_special_tokens: the detokenizer's choice
    (as vLLM's), for callers that turn tokens into text; sampling ignores it.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    n: int = 1
    no_repeat_ngram_size: int = 0
    do_sample: bool | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        def bad(name, requirement):
            raise ParamError(name, f"SamplingParams.{name} {requirement}, got {getattr(self, name)!r}")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 or None")
        if not _is_number(self.temperature) or self.temperature < 0 or self.temperature == float("inf"):
            bad("temperature", "must be a finite number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (0 or -1: off)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            bad("repetition_penalty", "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be a number in [-2, 2]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be a string or a list of non-empty strings")
        self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not _is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            bad("seed", "must be an integer (64-bit) or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", "must be an integer >= 0")
        if not isinstance(self.skip_special_tokens, bool):
            bad("skip_special_tokens", "must be a bool")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            bad("do_sample", "must be a bool or None")
        if self.do_sample and self.temperature == 0:
            bad("temperature", "must be > 0 when do_sample=True (for greedy decoding use do_sample=False)")

    @property
    def greedy(self) -> bool:
        """Argmax instead of a draw: do_sample=False, or do_sample unset and temperature 0."""
        return self.do_sample is False or (self.do_sample is None and self.temperature == 0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A row's own torch.Generator seeded with `seed` (None for an unseeded row: torch's default RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % 2**64)


@dataclass
class History:
    """The tokens of each row so far, for penalties: row b's text is tokens[b, start[b]:end[b]], its prompt
    tokens[b, start[b]:prompt_end[b]]. start None: 0 (the engine's slot layout, column = position); end an
    int: the same for every row (generate()'s left-padded layout, where start is the padding, passes a
    (B,) tensor of start + position)."""

    tokens: torch.Tensor  # (B, L) long
    prompt_end: torch.Tensor  # (B,) long
    end: torch.Tensor | int  # (B,) long or int
    start: torch.Tensor | None = None  # (B,) long


@dataclass
class Logprobs:
    """Log-probabilities for each row's chosen token and its top N (N = the largest `logprobs` asked)."""

    token: torch.Tensor  # (B,) float32: log p(chosen token)
    top_ids: torch.Tensor  # (B, N) long, most likely first
    top: torch.Tensor  # (B, N) float32


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) long
    logprobs: Logprobs | None = None


class SamplingBatch:
    """The per-row parameters of a batch of rows as tensors, and the logits pipeline + sampler over them
    (see the module docstring). Build one per batch composition; `sample` per step."""

    def __init__(self, params: Sequence[SamplingParams], eos_token_ids: Sequence[int] = (),
                 generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
                 vocab_limit: int | None = None, device: torch.device | str = "cpu",
                 logprobs_mode: str = "raw"):
        params = list(params)
        if not params or any(not isinstance(p, SamplingParams) for p in params):
            raise TypeError("SamplingBatch needs a non-empty list of SamplingParams")
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if vocab_limit is not None and (not _is_int(vocab_limit) or vocab_limit < 1):
            raise ValueError(f"vocab_limit must be a positive integer (e.g. len(tokenizer)), got {vocab_limit!r}")
        if isinstance(generators, (list, tuple)) and len(generators) != len(params):
            raise ValueError(f"{len(generators)} generators for {len(params)} rows")
        self.params, self.generators, self.vocab_limit = params, generators, vocab_limit
        self.logprobs_mode = logprobs_mode
        B = len(params)
        as_col = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device).view(B, 1)
        self.greedy = [p.greedy for p in params]
        self.all_greedy, self.any_greedy = all(self.greedy), any(self.greedy)
        self.greedy_rows = torch.tensor(self.greedy, device=device)  # (B,)

        self.repetition = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.repetition = as_col([float(p.repetition_penalty) for p in params])  # (B, 1)
        self.presence = self.frequency = None
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self.presence = as_col([float(p.presence_penalty) for p in params])
            self.frequency = as_col([float(p.frequency_penalty) for p in params])
        # min_tokens: per row the ids it may not produce yet (EOS unless ignored, and stop_token_ids)
        self.min_tokens = None
        if any(p.min_tokens for p in params):
            banned = [sorted({*([] if p.ignore_eos else eos_token_ids), *p.stop_token_ids}) if p.min_tokens else []
                      for p in params]
            width = max(1, max(len(b) for b in banned))
            self.min_tokens = as_col([p.min_tokens for p in params], torch.long)
            self.min_banned = torch.tensor([b + [-1] * (width - len(b)) for b in banned], dtype=torch.long,
                                           device=device)  # (B, K), -1 pads
        self.ngram_sizes = sorted({p.no_repeat_ngram_size for p in params} - {0})
        self.ngram_rows = {n: torch.tensor([p.no_repeat_ngram_size == n for p in params], device=device)
                           for n in self.ngram_sizes}
        sampled = [p for p, g in zip(params, self.greedy) if not g]
        self.temperature = self.top_k = self.top_p = None
        if any(p.temperature != 1.0 for p in sampled):
            self.temperature = as_col([1.0 if g else float(p.temperature) for p, g in zip(params, self.greedy)])
        if any(p.top_k > 0 for p in sampled):
            self.top_k_max = max(p.top_k for p in sampled)
            self.top_k = as_col([0 if g else max(p.top_k, 0) for p, g in zip(params, self.greedy)], torch.long)
        if any(p.top_p < 1.0 for p in sampled):
            self.top_p = as_col([0.0 if g else 1.0 - float(p.top_p) for p, g in zip(params, self.greedy)])
        self.num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)

    @property
    def needs_history(self) -> bool:
        """Whether `process` reads the history (penalties, min_tokens, no_repeat_ngram); if not, it may be None."""
        return (self.repetition is not None or self.presence is not None or self.min_tokens is not None
                or bool(self.ngram_sizes))

    def process(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        """The processed scores (B, V) float32 that greedy rows take the argmax of and sampled rows draw from."""
        logits = logits.float()
        B, V = logits.shape
        device = logits.device
        if self.needs_history:  # only these read the history (built here: greedy rows pay nothing)
            if history is None:
                raise ValueError("these sampling parameters read the history: pass a History")
            tokens = history.tokens
            columns = torch.arange(tokens.shape[1], device=device)  # (L,)
            end = (history.end if isinstance(history.end, torch.Tensor)
                   else torch.full((B,), history.end, device=device))
            start = history.start if history.start is not None else torch.zeros(B, dtype=torch.long, device=device)
        if self.vocab_limit is not None and self.vocab_limit < V:
            logits = logits.clone()
            logits[:, self.vocab_limit:] = float("-inf")
        if self.min_tokens is not None:
            early = (end - history.prompt_end).view(B, 1) < self.min_tokens  # (B, 1)
            banned = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
            banned.scatter_(1, torch.where(early & (self.min_banned >= 0) & (self.min_banned < V),
                                           self.min_banned, V), True)
            logits = logits.masked_fill(banned[:, :V], float("-inf"))
        if self.repetition is not None:
            in_text = (columns >= start[:, None]) & (columns < end[:, None])  # (B, L)
            seen_ids = torch.where(in_text, tokens.clamp(0, V), V)  # column V absorbs the rest
            padded = torch.nn.functional.pad(logits, (0, 1))
            seen = padded.gather(1, seen_ids)
            seen = torch.where(seen < 0, seen * self.repetition, seen / self.repetition)
            logits = padded.scatter(1, seen_ids, seen)[:, :V]
        if self.presence is not None:
            in_output = (columns >= history.prompt_end[:, None]) & (columns < end[:, None])
            out_ids = torch.where(in_output, tokens.clamp(0, V), V)
            counts = torch.zeros(B, V + 1, device=device).scatter_add_(1, out_ids, torch.ones_like(out_ids,
                                                                                                  dtype=torch.float))
            counts = counts[:, :V]
            logits = logits - self.frequency * counts - self.presence * (counts > 0).float()
        for n in self.ngram_sizes:
            logits = self._no_repeat_ngram(logits, tokens, start, end, n, self.ngram_rows[n])
        if self.all_greedy:
            return logits
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.top_k is not None:
            top = torch.topk(logits, min(self.top_k_max, V), dim=-1).values  # (B, k_max), descending
            kth = top.gather(1, (self.top_k.clamp(1, top.shape[1]) - 1))  # (B, 1)
            kth = torch.where(self.top_k > 0, kth, float("-inf"))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, sorted_indices = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative <= self.top_p  # (B, V); top_p holds 1 - top_p per row
            remove_sorted[..., -1:] = False
            logits = logits.masked_fill(remove_sorted.scatter(1, sorted_indices, remove_sorted), float("-inf"))
        return logits

    @staticmethod
    def _no_repeat_ngram(logits, tokens, start, end, n, rows):
        """Ban, in rows `rows` (B,) bool, every token that would complete an n-gram of the row's own text."""
        B, V = logits.shape
        L = tokens.shape[1]
        if L < n:
            return logits
        device = logits.device
        prefix_cols = (end[:, None] - (n - 1) + torch.arange(n - 1, device=device)).clamp(0, L - 1)  # (B, n-1)
        prefix = tokens.gather(1, prefix_cols)  # (B, n-1): the row's n-1 newest tokens
        windows = tokens.unfold(1, n, 1)  # (B, W, n)
        starts = torch.arange(windows.shape[1], device=device)  # (W,)
        valid = (starts[None, :] >= start[:, None]) & (starts[None, :] + n <= end[:, None])  # (B, W)
        valid &= (end - start >= n)[:, None] & rows[:, None]
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & valid  # (B, W)
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(0, V), V), True)
        return logits.masked_fill(banned[:, :V], float("-inf"))

    def sample(self, logits: torch.Tensor, history: History | None) -> SampleOutput:
        """Next tokens (B,) from raw logits (B, V), and the logprobs when some row asked for them."""
        scores = self.process(logits, history)
        if self.all_greedy:
            tokens = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1)
            if isinstance(self.generators, (list, tuple)):  # each row its own draw: batch-invariant
                drawn = torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g).view(1)
                                   if not greedy else scores.new_zeros(1, dtype=torch.long)
                                   for b, (g, greedy) in enumerate(zip(self.generators, self.greedy))])
            else:  # one draw over every row, as transformers does
                drawn = torch.multinomial(probs, 1, generator=self.generators).squeeze(1)
            tokens = torch.where(self.greedy_rows, scores.argmax(dim=-1), drawn) if self.any_greedy else drawn
        if self.num_logprobs is None:
            return SampleOutput(tokens)
        source = logits.float() if self.logprobs_mode == "raw" else scores
        logp = torch.log_softmax(source, dim=-1)  # (B, V)
        empty = logp.new_zeros(logp.shape[0], 0)
        top_ids, top = empty.long(), empty
        if self.num_logprobs:
            # always the top 20, then cut: a row's order among equal logprobs must not depend on the N that
            # other rows of the batch asked for (topk(k) may order ties differently for different k)
            best = torch.topk(logp, min(MAX_LOGPROBS, logp.shape[1]), dim=-1)
            top_ids, top = best.indices[:, :self.num_logprobs], best.values[:, :self.num_logprobs]
        return SampleOutput(tokens, Logprobs(logp.gather(1, tokens[:, None]).squeeze(1), top_ids, top))


FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
FINISH_REASONS = (None, "stop", "length")  # OpenAI's finish_reason by code


class StopRules:
    """Per-row stop rules, vectorised: see the module docstring. max_length: the positions a sequence may
    take (config.max_position_embeddings, or less: the cache length)."""

    def __init__(self, params: Sequence[SamplingParams], eos_token_ids: Sequence[int], max_length: int,
                 device: torch.device | str = "cpu"):
        params = list(params)
        B = len(params)
        stop_ids = [sorted({*([] if p.ignore_eos else eos_token_ids), *p.stop_token_ids}) for p in params]
        width = max(1, max((len(s) for s in stop_ids), default=0))
        self.stop_ids = torch.tensor([s + [-1] * (width - len(s)) for s in stop_ids], dtype=torch.long,
                                     device=device)  # (B, K), -1 pads
        self.min_tokens = torch.tensor([p.min_tokens for p in params], dtype=torch.long, device=device)
        big = 2**62
        self.max_tokens = torch.tensor([big if p.max_tokens is None else p.max_tokens for p in params],
                                       dtype=torch.long, device=device)
        self.max_length = max_length
        assert self.stop_ids.shape[0] == B

    def check(self, next_tokens: torch.Tensor, num_generated: torch.Tensor,
              seq_lengths: torch.Tensor) -> torch.Tensor:
        """(B,) int codes for each row, after `next_tokens` (B,) was appended: num_generated (B,) new tokens
        so far (it included) and seq_lengths (B,) positions taken (prompt + generated)."""
        stop = (next_tokens[:, None] == self.stop_ids).any(dim=1) & (num_generated >= self.min_tokens)
        length = (num_generated >= self.max_tokens) | (seq_lengths >= self.max_length)
        return torch.where(stop, FINISH_STOP, torch.where(length, FINISH_LENGTH, FINISH_NONE))
