"""The continuous-batching engine: requests are scheduled onto the rows ("slots") of one KV cache.

Each `step()`:
1. retires aborted requests (their slots are free from this step on);
2. admits waiting requests into the lowest free slots;
3. prefills: at most `prefill_chunk` prompt tokens in all per step (each request's chunks cut at multiples
   of prefill_chunk from its own start), all of a step's chunks in one neoxja.generation
   `prefill_segments` call (each chunk as `prefill(model, ids, slot, start_pos, kv_length)` computes it; the
   weight products take every chunk's tokens at once), so a long prompt is admitted over several steps while
   the others keep decoding;
4. decodes: one `decode_one_token(model, tokens, positions, kv_length)` (the step generate() runs before its
   choice; `compile=True`: its torch.compile'd form, a graph of its own, not generate()'s compiled
   decode_and_select) over slots 0..B-1, B = 1 + the highest decoding slot
   (rows in that range that are not decoding get a dummy token at their current length); prefill, and decode
   when eager, attend over the cache's first positions rounded up to a multiple of KV_BUCKET (`_kv_length`);
5. samples the rows with neoxja.sampling's `SamplingBatch` (each request its own parameters and its own
   torch.Generator, so a row draws the same whatever shares its batch) and `StopRules` (EOS, stop_token_ids,
   max_tokens, the context), matches stop strings through an IncrementalDetokenizer and reports each
   request's new text.

So generate() and the engine share the model steps, the logits pipeline, the sampler and the stop rules;
the engine adds only scheduling, slots and text.

The engine is synchronous and single-threaded; `AsyncEngine` (async_engine.py) runs it in a thread.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from neoxja.generation import PREFILL_CHUNK, compile_decode, decode_one_token, prefill_segments
from neoxja.sampling import (FINISH_REASONS, History, SamplingBatch, SamplingParams, StopRules,
                             make_generator)
from neoxja.streaming import IncrementalDetokenizer

KV_BUCKET = 64  # decode attends over the cache's first positions, rounded up to a multiple of this


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class RequestRefused(ValueError):
    """A request that cannot run (too long for the context, empty, ...): the message says why."""


@dataclass
class StepOutput:
    """What one request got in one step; `finish_reason` is set on its last output."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # so far


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[StepOutput], None]
    arrival_time: float = field(default_factory=time.monotonic)
    # scheduling state
    slot: int | None = None
    num_prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None
    scheduled_time: float | None = None
    aborted: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    serial: int = -1  # unique per add_request: keys the cached SamplingBatch

    @property
    def length(self) -> int:
        """Tokens written to this request's slot so far."""
        return self.num_prefilled + max(len(self.output_ids) - 1, 0)


class Engine:
    """Schedules requests onto `max_num_seqs` cache slots of `max_model_len` positions each."""

    def __init__(self, model, tokenizer, max_num_seqs: int = 16, max_model_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, metrics=None, compile: bool = False):
        cfg = model.config
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.eos_token_ids = _id_list(cfg.eos_token_id)
        self.bos_token_id = cfg.bos_token_id
        self.vocab_size = cfg.vocab_size
        # a vocabulary padded past the tokenizer's is never sampled from (as `neoxja generate`)
        self.vocab_limit = len(tokenizer) if 0 < len(tokenizer) < cfg.vocab_size else None
        self.device = model.device
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_num_seqs
        self.requests: dict[str, Request] = {}
        self._serials = itertools.count()
        self._seed_source = itertools.count(int.from_bytes(os.urandom(6), "little"))
        self.compiled = compile
        self._decode_fn = compile_decode(model) if compile else decode_one_token
        self._batch_key: tuple | None = None  # the rows the cached SamplingBatch / StopRules were built for
        model.setup_caches(max_batch_size=max_num_seqs, max_seq_length=max_model_len)

    # ---- requests ----

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """Validate a prompt against the context; return the max_tokens to use (None: what is left)."""
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in prompt_ids):
            bad = next(t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size)
            raise RequestRefused(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        n = max(len(prompt_ids), 1)  # an empty prompt starts from BOS
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        if n + max_tokens > self.max_model_len or max_tokens < 1 and n >= self.max_model_len:
            raise RequestRefused(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or of max_tokens.")
        return max_tokens

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise RequestRefused(f"request id {request.request_id!r} is already running")
        if not request.prompt_ids:
            if self.bos_token_id is None:
                raise RequestRefused("the prompt is empty and the model has no bos_token_id to start from")
            request.prompt_ids = [self.bos_token_id]
        request.params.max_tokens = self.check_prompt(request.prompt_ids, request.params.max_tokens)
        seed = request.params.seed
        # every request draws with its own generator (unseeded: a fresh seed), never a shared one
        request.generator = make_generator(seed if seed is not None else next(self._seed_source) % 2**63,
                                           self.device)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer, stop=request.params.stop or (),
                                                     skip_special_tokens=request.params.skip_special_tokens)
        request.serial = next(self._serials)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Mark a request aborted; its slot is freed at the start of the next step."""
        request = self.requests.get(request_id)
        if request is not None:
            request.aborted = True

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # ---- one step ----

    @torch.no_grad()
    def step(self) -> None:
        self._retire_aborted()
        self._admit()
        just_prefilled = self._prefill()
        self._decode(exclude=just_prefilled)
        if self.metrics is not None:
            self.metrics.set_queue(self.num_running, self.num_waiting)

    def _retire_aborted(self) -> None:
        for request in [r for r in self.waiting if r.aborted]:
            self.waiting.remove(request)
            self._finish(request, "abort")
        for request in self.slots:
            if request is not None and request.aborted:
                self._finish(request, "abort")

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            slot = self.slots.index(None)  # the lowest free slot
            self.slots[slot] = request
            request.slot = slot
            request.scheduled_time = time.monotonic()
            if self.metrics is not None:
                self.metrics.queue_time(request.scheduled_time - request.arrival_time)

    def _prefill(self) -> set[int]:
        """Prompt chunks, oldest admitted requests first, at most `prefill_chunk` tokens in all; returns the
        slots that finished their prompt (and sampled their first token) in this step.

        A request's chunks are cut at multiples of prefill_chunk from its own start, whatever else is
        prefilling: the cut changes the products' shapes, hence a row's last bits, so it must be a function of
        the request alone (batch invariance). A chunk that does not fit the step's remaining budget waits."""
        budget = self.prefill_chunk
        chosen, chunks = [], []
        for request in sorted((r for r in self.slots if r is not None and r.num_prefilled < len(r.prompt_ids)),
                              key=lambda r: r.scheduled_time):
            start = request.num_prefilled
            end = min(len(request.prompt_ids), start + self.prefill_chunk)
            if end - start > budget:
                break
            ids = torch.tensor([request.prompt_ids[start:end]], dtype=torch.long, device=self.device)  # (1, T)
            chosen.append((request, end))
            chunks.append((ids, request.slot, start, self._kv_length(end)))
            budget -= end - start
        if not chunks:
            return set()
        # the step's chunks in one call: the weight products take all their tokens at once (a row's bits do
        # not depend on how many rows share a product: neoxja.batch_invariant), attention stays per chunk
        logits = prefill_segments(self.model, chunks)  # (len(chunks), V)
        done = set()
        for i, (request, end) in enumerate(chosen):
            request.num_prefilled = end
            if end == len(request.prompt_ids):
                self._sample_and_emit([request], logits[i:i + 1])
                done.add(request.slot)
        return done

    def _decode(self, exclude: set[int]) -> None:
        rows = [r for r in self.slots if r is not None and r.output_ids and not r.finished and r.slot not in exclude
                and r.num_prefilled == len(r.prompt_ids)]
        if not rows:
            return
        B = max(r.slot for r in rows) + 1
        tokens = torch.zeros(B, dtype=torch.long)
        positions = torch.zeros(B, dtype=torch.long)
        for slot in range(B):
            request = self.slots[slot]
            if request is None:
                continue  # a free row: a dummy token at position 0
            if request in rows:
                tokens[slot] = request.output_ids[-1]
                positions[slot] = request.length  # the newest token goes right after the written ones
            else:
                positions[slot] = request.num_prefilled  # mid-prefill: written over by its next chunk
        # compiled: the whole cache, one static shape (an int argument would recompile)
        kv_length = None if self.compiled else self._kv_length(int(positions.max()) + 1)
        logits = self._decode_fn(self.model, tokens.to(self.device), positions.to(self.device), kv_length)  # (B, V)
        self._sample_and_emit(rows, logits[[r.slot for r in rows]] if len(rows) < B else logits)

    def _kv_length(self, end: int) -> int:
        """The cache positions a call attends over when its last written position is end - 1: rounded up to a
        multiple of KV_BUCKET, not the whole context. The bits do not depend on it (neoxja.model's
        _cached_attention); the time does: a 32-token prefill of the 2.7B width over 2,048 positions took
        314-420 ms, over 64 positions 134-138 ms."""
        return min(self.max_model_len, -(-end // KV_BUCKET) * KV_BUCKET)

    def _sampling(self, rows: list[Request]) -> tuple[SamplingBatch, StopRules]:
        """The SamplingBatch and StopRules of these rows, rebuilt only when the rows change."""
        key = tuple(r.serial for r in rows)
        if key != self._batch_key:
            params = [r.params for r in rows]
            self._sampler = SamplingBatch(params, self.eos_token_ids, generators=[r.generator for r in rows],
                                          vocab_limit=self.vocab_limit, device=self.device)
            self._stop_rules = StopRules(params, self.eos_token_ids, self.max_model_len, device=self.device)
            self._batch_key = key
        return self._sampler, self._stop_rules

    def _history(self, rows: list[Request]) -> History:
        """Each row's prompt + output tokens, for the penalties and min_tokens."""
        texts = [r.prompt_ids + r.output_ids for r in rows]
        width = max(len(t) for t in texts)
        tokens = torch.tensor([t + [0] * (width - len(t)) for t in texts], dtype=torch.long, device=self.device)
        return History(tokens, prompt_end=torch.tensor([len(r.prompt_ids) for r in rows], device=self.device),
                       end=torch.tensor([len(t) for t in texts], device=self.device))

    def _sample_and_emit(self, rows: list[Request], logits: torch.Tensor) -> None:
        """logits (len(rows), V) in the order of `rows`: sample, apply stop rules, report."""
        sampler, stop_rules = self._sampling(rows)
        out = sampler.sample(logits, self._history(rows) if sampler.needs_history else None)
        num_generated = torch.tensor([len(r.output_ids) + 1 for r in rows], device=self.device)
        seq_lengths = torch.tensor([len(r.prompt_ids) + len(r.output_ids) + 1 for r in rows], device=self.device)
        reasons = stop_rules.check(out.tokens, num_generated, seq_lengths).tolist()
        tokens = out.tokens.tolist()  # the step's one host sync
        logprobs = None
        if out.logprobs is not None:
            logprobs = (out.logprobs.token.tolist(), out.logprobs.top_ids.tolist(), out.logprobs.top.tolist())
        now = time.monotonic()
        for i, request in enumerate(rows):
            token = tokens[i]
            request.output_ids.append(token)
            if self.metrics is not None:
                if request.first_token_time is None:
                    self.metrics.first_token(now - request.arrival_time)
                else:
                    self.metrics.inter_token(now - request.last_token_time)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now

            finish = FINISH_REASONS[reasons[i]]
            text = ""
            if finish != "stop":  # a stopping token's (EOS, stop_token_ids) text is not returned
                text = request.detokenizer.add(token)
                if request.detokenizer.stopped:
                    finish = "stop"
            if finish is not None and not request.detokenizer.stopped:
                text += request.detokenizer.finish()
            logprob = None
            if logprobs is not None and request.params.logprobs is not None:
                n = request.params.logprobs
                logprob = TokenLogprob(token, logprobs[0][i], list(zip(logprobs[1][i][:n], logprobs[2][i][:n])))
            request.on_output(StepOutput(request.request_id, text, [token], [logprob] if logprob else None,
                                         finish, len(request.prompt_ids), len(request.output_ids)))
            if finish is not None:
                self._finish(request, finish, notify=False)

    def _finish(self, request: Request, reason: str, notify: bool = True) -> None:
        request.finished = True
        if request.slot is not None:
            self.slots[request.slot] = None  # its cache row is written over by the next request
            request.slot = None
        self.requests.pop(request.request_id, None)
        if self.metrics is not None:
            self.metrics.finished(request, reason)
        if notify:
            request.on_output(StepOutput(request.request_id, "", [], None, reason, len(request.prompt_ids),
                                         len(request.output_ids)))

    @torch.no_grad()
    def warm_up(self) -> None:
        """With compile=True, compile the decode step now, before any request waits for it, for every row count
        up to max_num_seqs: dynamo specializes one row; on a second count it makes the count dynamic, and the
        cache's "fewer rows than slots" branch (neoxja.kv_cache) splits that into 2..max_num_seqs-1 and all the
        slots. So three calls: 1, 2 and max_num_seqs rows. Free slots only take dummy tokens at position 0,
        which a prefill overwrites before anything reads them. Without compile: nothing to do."""
        if not self.compiled:
            return
        if any(slot is not None for slot in self.slots):
            raise RuntimeError("warm_up() is for an idle engine: it writes dummy tokens into the first slots")
        for rows in sorted({1, min(2, self.max_num_seqs), self.max_num_seqs}):
            tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
            positions = torch.zeros(rows, dtype=torch.long, device=self.device)  # not `tokens`: dynamo guards aliasing
            self._decode_fn(self.model, tokens, positions, None)

    def close(self) -> None:
        """Free the KV cache."""
        self.model.clear_caches()


def _id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
