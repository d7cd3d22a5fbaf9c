"""Per-request sampling for the engine: the parameters (vLLM/OpenAI names) and one row's sampling.

Order, as vLLM: min_tokens (EOS and stop_token_ids blocked), repetition_penalty (prompt and output
tokens), presence and frequency penalties (output tokens), then temperature (0: greedy), top_k, top_p and a
draw with the request's own torch.Generator. Logprobs are those of the model's raw distribution.
Each row is sampled on its own, so a request's tokens never depend on the other rows of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

MAX_LOGPROBS = 20


class ParamError(ValueError):
    """An out-of-range sampling parameter; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-N alternatives per token (0: only the chosen token's)
    skip_special_tokens: bool = True

    def __post_init__(self):
        def number(name, low=None, high=None, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ParamError(name, f"must be a number, got {value!r}")
            if low is not None and (value <= low if low_open else value < low):
                raise ParamError(name, f"must be {'>' if low_open else '>='} {low}, got {value}")
            if high is not None and value > high:
                raise ParamError(name, f"must be <= {high}, got {value}")

        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ParamError(name, f"must be an integer >= {low}, got {value!r}")

        if self.max_tokens is not None:
            integer("max_tokens", 1)
        number("temperature", 0.0, 2.0)
        number("top_p", 0.0, 1.0, low_open=True)
        if self.top_k == -1:
            self.top_k = 0
        integer("top_k", 0)
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        number("repetition_penalty", 0.0, low_open=True)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ParamError("stop", f"must be non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", f"must be token ids, got {self.stop_token_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ParamError("seed", f"must be a 64-bit integer, got {self.seed!r}")
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) \
                    or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ParamError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def sample_row(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
               output_ids: Sequence[int], generator: torch.Generator | None,
               blocked: Sequence[int] = ()) -> tuple[int, TokenLogprob | None]:
    """One token from one row's logits (V,) float32; with params.logprobs, its logprob and the top-N."""
    raw = logits
    scores = logits
    if blocked:
        scores = scores.clone()
        scores[list(blocked)] = float("-inf")
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=scores.device)
        picked = scores[seen]
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        scores = scores.clone() if scores is raw else scores
        scores[seen] = picked
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(output_ids, dtype=torch.long, device=scores.device)
        counts = torch.zeros_like(scores).index_add_(0, ids, torch.ones_like(ids, dtype=scores.dtype))
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)

    if params.greedy:
        token = int(scores.argmax())
    else:
        scores = scores / params.temperature
        if params.top_k and params.top_k < scores.numel():
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - params.top_p
            remove[-1] = False  # keep at least the most likely token
            scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))

    if params.logprobs is None:
        return token, None
    logprobs = torch.log_softmax(raw, dim=-1)
    top = []
    if params.logprobs:
        values, indices = torch.topk(logprobs, params.logprobs)
        top = list(zip(indices.tolist(), values.tolist()))
    return token, TokenLogprob(token, float(logprobs[token]), top)
