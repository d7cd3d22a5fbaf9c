"""Text generation: step functions (gpt-fast style) and `model.generate(...)` as in transformers, built on them.

Step functions (plain functions over a model with caches from `model.setup_caches(max_batch_size,
max_seq_length)`; each cache row is a slot holding one sequence from position 0, see neoxja.kv_cache):

- `prefill(model, input_ids (1, T), slot, start_pos) -> logits (1, V)`: write T prompt tokens into cache row
  `slot` at positions start_pos.. and return the logits after the last one. Chunked prefill calls it
  repeatedly with growing start_pos; `prefill_chunks` does that in chunks of PREFILL_CHUNK tokens.
- `decode_one_token(model, tokens (B,), positions (B,)) -> logits (B, V)`: one token for each of cache rows
  0..B-1, row b's token at position positions[b], attending to that row's positions 0..positions[b].
  A row in that range that is not decoding (free, finished, mid-prefill) is given a dummy token at its
  current length (or any position >= it): the write is overwritten before anything reads it; or, in a row
  whose cache is never read again (generate()'s finished rows), at position 0.
  Attention covers the whole cache, masked, so the shapes depend on B only (torch.compile takes it whole);
  `kv_length` (a host int >= every position + 1) narrows it to the cache's first positions.
- `select_tokens(sampler, stop_rules, logits, ...)`: generate()'s choice after a step: the per-row logits
  pipeline and sampler (neoxja.sampling), then the stop rules. `decode_and_select(model, ...)`: one
  decode_one_token and the select_tokens after it, as one function, so that a compiled generate() runs no
  small op eagerly between two tokens (the host loop only writes the token and asks every STOP_CHECK_EVERY
  steps whether every row has finished). `decode_steps(model, ..., steps)`: that many decode_and_select calls
  in a row, writing the tokens between them, so that a compiled call covers several tokens.
- `compile_decode(model, fn=decode_one_token)`: fn compiled with torch.compile, cached per model;
  generate(compile=True) compiles decode_steps and decode_and_select, the serving engine decode_one_token. It
  pays off for long generations and servers, not for one short call (compiling takes seconds).

Batch invariance: what a row gets from these functions does not depend on the other rows of the call when the
model's products are row-count invariant; see neoxja.batch_invariant (`make_batch_invariant(model)`).

generate(): each prompt row (left padding stripped) is prefilled into its own slot from position 0, then every
step is one decode_one_token over all rows, then per-row processing, sampling and stop rules (neoxja.sampling:
SamplingBatch, StopRules). On a small model (steps_per_call) the steps go STEPS_PER_CALL at a time through
decode_steps, compiled or not, and the host streams and checks stop strings on each call's tokens afterwards.
Rows that finish are padded with pad_token_id; the output is left-padded as the input was, as transformers
returns it. Whether every row has finished is asked of the device every STOP_CHECK_EVERY steps (every step
with a streamer or stop strings; before each call of decode_steps), and the output is trimmed to the step at
which the last row finished, so the result equals checking every step.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Iterable, Sequence

import torch

from neoxja.sampling import (FINISH_NONE, History, SamplingBatch, SamplingParams, StopRules,
                             validate_sampling_args)

# transformers' generation defaults (GenerationConfig), so that ported calls sample the same distribution
DEFAULT_MAX_LENGTH = 20  # when neither max_length nor max_new_tokens is given
DEFAULT_TOP_K = 50  # when sampling and top_k is None
PREFILL_CHUNK = 256  # prompt tokens per prefill call (the serving engine's chunk size too)
STOP_CHECK_EVERY = 4  # decode steps between host checks of "has every row finished?"
STEPS_PER_CALL = 8  # decode steps per call of decode_steps in generate(), on a small model: steps_per_call
SMALL_MODEL_WEIGHTS = 32 << 20  # weights (numbers, whatever their dtype) of a model that steps_per_call calls small


# ---- step functions ----

def prefill(model, input_ids: torch.Tensor, slot: int, start_pos: int, kv_length: int | None = None) -> torch.Tensor:
    """Write input_ids (1, T) into cache row `slot` at positions start_pos..start_pos+T-1; logits (1, V) of
    the last one. Positions below start_pos must already hold this sequence's tokens."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"prefill: input_ids must be (1, T) with T >= 1, got {tuple(input_ids.shape)}")
    if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
        raise ValueError(f"prefill: start_pos must be an integer >= 0, got {start_pos!r}")
    T = input_ids.shape[1]
    input_pos = torch.arange(start_pos, start_pos + T, device=input_ids.device).unsqueeze(0)  # (1, T)
    return model.forward_cached(input_ids, input_pos, first_row=slot, kv_length=kv_length)[:, -1]  # (1, V)


def prefill_segments(model, chunks: list[tuple[torch.Tensor, int, int, int]]) -> torch.Tensor:
    """Several prefill calls in one: each (input_ids (1, T_i), slot, start_pos, kv_length) as
    prefill(model, input_ids, slot, start_pos, kv_length) would do it, with the weight products of all the
    chunks' tokens at once; logits (len(chunks), V) of each chunk's last token."""
    if not chunks:
        raise ValueError("prefill_segments: no chunks given")
    segments, start = [], 0
    for ids, slot, start_pos, kv_length in chunks:
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"prefill_segments: each chunk must be (1, T) with T >= 1, got {tuple(ids.shape)}")
        segments.append((slot, start, start + ids.shape[1], kv_length))
        start += ids.shape[1]
    input_ids = torch.cat([ids for ids, *_ in chunks], dim=1)  # (1, N)
    input_pos = torch.cat([torch.arange(p, p + ids.shape[1], device=ids.device) for ids, _, p, _ in chunks])[None]
    return model.forward_segments(input_ids, input_pos, segments)  # (len(chunks), V)


def prefill_chunks(model, input_ids: torch.Tensor, slot: int, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """The whole prompt (1, T) into `slot` from position 0, `chunk` tokens per prefill call; logits (1, V)."""
    for start in range(0, input_ids.shape[1], chunk):
        logits = prefill(model, input_ids[:, start:start + chunk], slot, start)
    return logits


def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor,
                     kv_length: int | None = None) -> torch.Tensor:
    """One step over cache rows 0..B-1: tokens (B,) at positions (B,); logits (B, V)."""
    return model.forward_cached(tokens.unsqueeze(1), positions.unsqueeze(1), 0, kv_length)[:, -1]  # (B, V)


# inductor options for the decode step when the caller gives neither `mode` nor `options`: inductor's
# decomposition of memory-bound products (its CPU rule: one row, weights of at most 2048 x 2048) turns a
# one-row product with a small weight into a fused multiply-and-sum that inductor generates itself, instead
# of a call into oneDNN/MKL whose fixed cost (15-20 us in bfloat16) exceeds the arithmetic. The bundled
# model's compiled decode runs 1.7-2x faster with it; weights above 2048 (the 2.7B width, the LM heads)
# keep the library call. Inductor leaves CUDA products of one row alone.
# fallback_random: random ops run as eager torch runs them (inductor would draw from its own generator), so a
# seeded sampled generate() draws from the same random numbers compiled or not (the compiled softmax differs
# in the last bits, so a draw that lands on a boundary between two tokens may still differ).
DECODE_COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "fallback_random": True}
# on a CPU also cpp_wrapper: the compiled step's wrapper (the code that calls its kernels) is C++, not Python;
# and emulate_precision_casts: a cast to bfloat16/float16 inside a fused kernel rounds there, as the eager op
# does (inductor otherwise keeps the float32 value it computes in): without it the compiled bfloat16 step's
# greedy tokens left the eager step's after 20-35 tokens on small random models and the 2.7B width (both int4
# kernels too); with it they stayed equal, at no cost measurable on the bundled model (tests/test_compile.py).
# CPU only: on CUDA it also turns off FMA fusion in every Triton kernel and switches Triton's math library,
# which no GPU here has measured.
DECODE_COMPILE_OPTIONS_CPU = {"cpp_wrapper": True, "emulate_precision_casts": True}


def select_tokens(sampler: SamplingBatch, stop_rules: StopRules, logits: torch.Tensor, positions: torch.Tensor,
                  unfinished: torch.Tensor, end_column: torch.Tensor, history: History,
                  pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """generate()'s choice after a step's logits (B, V): each row's next token (pad_token_id in a row that has
    finished), then the stop rules. positions (B,): where each row's new token goes (its length so far);
    history: generate()'s left-padded output buffer (start: the padding, prompt_end: the prompt's width);
    end_column (B,): past each row's last token once it finishes. Returns (next tokens, unfinished,
    end_column), new tensors."""
    start = history.start
    text = (History(history.tokens, history.prompt_end, end=start + positions, start=start)
            if sampler.needs_history else None)
    next_tokens = sampler.sample(logits, text).tokens  # (B,)
    next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
    generated = positions + 1 - (history.prompt_end - start)  # (B,): new tokens, this one included
    reasons = stop_rules.check(next_tokens, generated, positions + 1)
    finishing = unfinished & (reasons != FINISH_NONE)
    end_column = torch.where(finishing, start + positions + 1, end_column)
    return next_tokens, unfinished & ~finishing, end_column


def decode_and_select(model, sampler: SamplingBatch, stop_rules: StopRules, tokens: torch.Tensor,
                      positions: torch.Tensor, unfinished: torch.Tensor, end_column: torch.Tensor,
                      history: History, pad_token_id: int):
    """One decode step of generate() and the choice after it, as one function (torch.compile takes it whole:
    no small op runs eagerly between two tokens, except a draw with the caller's own torch.Generator, which
    dynamo cannot trace and runs eagerly between two graphs): each row's newest token (B,) at positions (B,) (a row that
    has finished gets token 0 at position 0: its cache row is not read again), then select_tokens for the
    position after. Returns (next tokens, unfinished, end_column, positions + 1)."""
    logits = decode_one_token(model, torch.where(unfinished, tokens, 0), torch.where(unfinished, positions, 0))
    positions = positions + 1
    return (*select_tokens(sampler, stop_rules, logits, positions, unfinished, end_column, history, pad_token_id),
            positions)


def decode_steps(model, sampler: SamplingBatch, stop_rules: StopRules, tokens: torch.Tensor,
                 positions: torch.Tensor, unfinished: torch.Tensor, end_column: torch.Tensor, history: History,
                 pad_token_id: int, steps: int):
    """`steps` decode_and_select calls in a row, as one function: torch.compile unrolls them into one graph,
    so dynamo's guards, the call into the graph and generate()'s host loop are paid once per `steps` tokens,
    not per token. Each chosen token but the last is written into history.tokens at its column
    (start + position), as generate()'s host loop writes it; returns what the last decode_and_select returns.
    On the bundled model (bfloat16, 2 threads, 2-core EPYC) 8 steps per call decoded 1.36-1.56x as fast as
    one compiled step per call, and compiling took ~3x as long (docs/bf16.md)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)  # (B,)
    for i in range(steps):
        tokens, unfinished, end_column, positions = decode_and_select(
            model, sampler, stop_rules, tokens, positions, unfinished, end_column, history, pad_token_id)
        if i < steps - 1:
            history.tokens[rows, history.start + positions] = tokens
    return tokens, unfinished, end_column, positions


def model_weights(model) -> int:
    """The numbers in a model's weights: its parameters (a tied one once) and, for a layer that keeps its
    weight in another form (neoxja.quantization's int8 and int4 layers), in_features x out_features. Buffers
    (KV caches, rotary tables) do not count."""
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    hidden = sum(m.in_features * m.out_features for m in model.modules()
                 if hasattr(m, "in_features") and hasattr(m, "out_features")
                 and next(m.parameters(recurse=False), None) is None)
    return params + hidden


def steps_per_call(model) -> int:
    """Decode steps per call in generate(): STEPS_PER_CALL on a model of at most SMALL_MODEL_WEIGHTS weights
    (32 Mi: 64 MiB in bfloat16), else 1. What several steps per call save is fixed per call (~0.3 ms on a
    2-core CPU: dynamo's guards, the compiled graph's wrappers, the host loop), while compiling them takes
    several times as long (~3x for 8 steps on the bundled model): it pays where a step is that short (the
    bundled model's compiled step: ~0.7 ms), not where a step streams hundreds of MB (the 2.7B width: ~40 ms).
    The eager path takes the same steps per call, so that compiled or not a generate() draws the same random
    numbers (the caller's generator is left in the same state) and streams the same way."""
    return STEPS_PER_CALL if model_weights(model) <= SMALL_MODEL_WEIGHTS else 1


def compile_decode(model, fn=decode_one_token, **compile_kwargs):
    """`fn(model, ...)` (decode_one_token, or generate()'s decode_and_select and decode_steps) compiled with
    torch.compile, cached on the model: compiled once per function and options. decode_one_token's shapes
    change only with the row count and the cache size, so a server compiles it a few times (Engine.warm_up);
    decode_and_select and decode_steps also compile anew for each sampling setup (and output width). Extra
    keywords go to torch.compile (e.g. mode="reduce-overhead" for CUDA graphs on a GPU); without `mode` or
    `options`, DECODE_COMPILE_OPTIONS apply, and on a CPU DECODE_COMPILE_OPTIONS_CPU too."""
    key = (fn, tuple(sorted(compile_kwargs.items())))
    owner, cache = model.__dict__.get("_neoxja_compiled_decode", (None, None))
    if owner is None or owner() is not model:  # none yet, or copied along by copy.deepcopy(model): the
        cache = {}                             # copy's steps must run the copy, not the original
        model.__dict__["_neoxja_compiled_decode"] = (weakref.ref(model), cache)
    if key not in cache:
        kwargs = dict(compile_kwargs)
        if "mode" not in kwargs and "options" not in kwargs:
            kwargs["options"] = dict(DECODE_COMPILE_OPTIONS)
            if next(model.parameters()).device.type == "cpu":
                kwargs["options"].update(DECODE_COMPILE_OPTIONS_CPU)
        cache[key] = torch.compile(fn, **kwargs)
    return cache[key]


RECOMPILE_LIMIT = 64  # graphs of one compiled step function that dynamo keeps in a process (its default: 8)
_RECOMPILE_LIMIT_LOCK = threading.Lock()


def _may_recompile_first(compiled):
    """A compiled step for one generate() call, whose first call may compile a new graph past dynamo's limit
    per function (torch._dynamo.config.recompile_limit, 8 by default): every model, sampling setup and
    cache size compiles decode_and_select anew, and past the limit dynamo would quietly run the step
    eagerly, 2-3x slower. Only the first call of a generate() meets new guards (the later ones get the
    same objects, and tensors of the same shapes), so only it runs with the higher limit; dynamo's own
    total (accumulated_recompile_limit) still applies."""
    first = True

    def step(*args):
        nonlocal first
        if first:
            first = False
            # the patch sets a process-wide value: two threads' first steps must not interleave their
            # set-and-restore (one would restore the other's raised limit while it compiles)
            with _RECOMPILE_LIMIT_LOCK:
                limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return compiled(*args)
        return compiled(*args)

    return step


class GenerationMixin:
    """Adds `generate()` to a causal LM that provides `config`, `setup_caches`, `clear_caches`
    and `forward_cached` (see neoxja.model)."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
        streamer=None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer=None,
        inputs: torch.Tensor | None = None,
        vocab_limit: int | None = None,
        num_beams: int = 1,
        compile: bool = False,
    ) -> torch.LongTensor:
        """Continue each row of `input_ids` (B, T); return prompt + new tokens, (B * num_return_sequences, T').

        Lengths: `max_new_tokens` new tokens, or a total of `max_length` (prompt included); with neither,
        max_length=20 as in transformers. Generation stops early when every row has produced an EOS
        (`eos_token_id`, default config.eos_token_id) or one of `stop_strings` (needs `tokenizer`).
        Greedy unless `do_sample`; sampling applies repetition_penalty, no_repeat_ngram_size,
        temperature, top_k, top_p in transformers' order, drawing with `generator` when given.
        As in transformers, top_k=None samples from the 50 most likely tokens; top_k=0 turns that off.
        `streamer` (TextStreamer-like, batch size 1) receives the prompt, then each new token.
        `vocab_limit`: when set (e.g. `len(tokenizer)`), ids >= vocab_limit are never generated (their logits
        are masked), for a model whose vocabulary is padded past its tokenizer's. generate() alone does not
        know the tokenizer, so by default (None) it masks nothing and may return any id < config.vocab_size;
        the `neoxja generate` command passes len(tokenizer).
        `compile=True` runs each decode step and the choice after it through
        `compile_decode(self, decode_and_select)` (torch.compile, cached on the model), on a small model
        (steps_per_call) STEPS_PER_CALL of them per compiled call (decode_steps; the eager path takes as many
        per call, so both draw alike): worth it for long or repeated generations, not for one short call.
        Seeded draws use the eager ones' random numbers (inductor's fallback_random); the logits differ from
        eager in the last bits (fused small ops; in float32 greedy tokens are equal in the tests), so a draw on
        a boundary between two tokens may differ.
        """
        cfg = self.config
        device = self.device

        # ---- arguments ----
        if num_beams != 1:
            raise NotImplementedError(f"num_beams={num_beams!r}: beam search is not implemented in neoxja; use greedy "
                                      "decoding (num_beams=1) or sampling (do_sample=True)")
        if inputs is not None:  # transformers' name for the prompt
            if input_ids is not None:
                raise ValueError("pass the prompt as input_ids or as inputs, not both")
            input_ids = inputs
        if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
        if num_return_sequences > 1 and not do_sample:
            raise ValueError("num_return_sequences > 1 needs do_sample=True: greedy decoding would repeat one sequence")
        if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        eos_ids = _as_id_list(cfg.eos_token_id if eos_token_id is None else eos_token_id, "eos_token_id")
        if pad_token_id is None:
            pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=[...], tokenizer=tokenizer)")
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        if vocab_limit is not None and (not isinstance(vocab_limit, int) or isinstance(vocab_limit, bool)
                                        or vocab_limit < 1):
            raise ValueError(f"vocab_limit must be a positive integer (e.g. len(tokenizer)), got {vocab_limit!r}")

        if top_k is None:
            top_k = DEFAULT_TOP_K  # what transformers samples with when top_k is not given; 0 turns it off
        validate_sampling_args(do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size)
        params = SamplingParams(
            max_tokens=None, do_sample=bool(do_sample), temperature=float(temperature) if do_sample else 1.0,
            top_k=top_k if do_sample else 0, top_p=float(top_p) if do_sample and top_p is not None else 1.0,
            min_tokens=min_new_tokens if eos_ids else 0, repetition_penalty=float(repetition_penalty),
            no_repeat_ngram_size=no_repeat_ngram_size)
        input_ids, attention_mask = self._prepare_prompt(input_ids, attention_mask, pad_token_id, eos_ids)
        batch, prompt_length = input_ids.shape
        if streamer is not None and batch * num_return_sequences != 1:
            raise ValueError("a streamer shows one sequence: use batch size 1 and num_return_sequences=1")
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
            batch = input_ids.shape[0]
        pads = (attention_mask == 0).sum(dim=1).tolist()  # left padding per row (one sync, on the host from here)
        # a row's positions end at max_position_embeddings: its last column is its padding + that limit
        row_ends = torch.tensor(pads) + cfg.max_position_embeddings  # (B,)
        total_length = self._total_length(prompt_length, max_length, max_new_tokens, row_ends)

        if streamer is not None:
            streamer.put(input_ids.cpu())
        if total_length == prompt_length:
            if streamer is not None:
                streamer.end()
            return input_ids

        # ---- per-row state: output (left-padded as the input), cache positions, sampling, stop rules ----
        tokens = torch.full((batch, total_length), pad_token_id, dtype=torch.long, device=device)  # (B, T_total)
        tokens[:, :prompt_length] = input_ids
        real_lengths = [prompt_length - p for p in pads]
        new_max = total_length - prompt_length
        cache_length = min(max(real_lengths) + new_max, cfg.max_position_embeddings)
        pad_tensor = torch.tensor(pads, device=device)  # (B,)
        positions = torch.tensor(real_lengths, device=device)  # (B,): where each row's next token goes
        # each row's text is tokens[b, pad:end]; select_tokens sets end per step (start + positions)
        history = History(tokens, prompt_end=torch.full((batch,), prompt_length, device=device),
                          end=pad_tensor + positions, start=pad_tensor)
        sampler = SamplingBatch([params] * batch, eos_ids, generators=generator, vocab_limit=vocab_limit,
                                device=device)
        stop_rules = StopRules([params] * batch, eos_ids, cfg.max_position_embeddings, device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        end_column = torch.full((batch,), total_length, device=device)  # (B,): past each row's last token
        stop_checker = (_StopStringChecker(tokenizer, stop_strings, prompt_length, torch.tensor(pads))
                        if stop_strings else None)
        check_every = 1 if streamer is not None or stop_checker is not None else STOP_CHECK_EVERY
        step = _may_recompile_first(compile_decode(self, decode_and_select)) if compile else decode_and_select
        # on a small model, `per_call` steps at a time (compiled or not: the same draws, the same streaming)
        per_call = steps_per_call(self)
        steps = None if per_call == 1 else (
            _may_recompile_first(compile_decode(self, decode_steps)) if compile else decode_steps)

        self.setup_caches(max_batch_size=batch, max_seq_length=cache_length)
        try:
            # prefill: each row into its own slot from position 0, in PREFILL_CHUNK pieces
            logits = torch.cat([prefill_chunks(self, input_ids[b:b + 1, pads[b]:], b) for b in range(batch)])
            next_tokens, unfinished, end_column = select_tokens(sampler, stop_rules, logits, positions, unfinished,
                                                                end_column, history, pad_token_id)
            length = prompt_length
            new = 1  # tokens the last call chose (decode_steps wrote all but the last into `tokens` itself)
            while True:
                first, length = length, length + new
                tokens[:, length - 1] = next_tokens
                for seen in range(first + 1, length + 1):  # the host's work per new token (column seen - 1)
                    if streamer is not None and (bool(unfinished[0]) or seen <= int(end_column[0])):
                        streamer.put(tokens[:, seen - 1].cpu())  # its text, up to its EOS (batch 1)
                    if stop_checker is not None:
                        # rows that had not finished at this token (decode_steps may have run a row on past
                        # its EOS: its later tokens are padding, end_column says where it ended)
                        checking = unfinished | (seen < end_column)
                        hits = checking & stop_checker.found(tokens[:, :seen], checking)
                        end_column = torch.where(hits, seen, end_column)
                        unfinished = unfinished & ~hits
                        tokens[hits, seen:length] = pad_token_id  # what the call chose past the stop
                if length == total_length:
                    break
                if steps is not None and total_length - length >= per_call:
                    # `per_call` steps in one call; whether every row has finished is asked before each call
                    if not bool(unfinished.any()):
                        break
                    next_tokens, unfinished, end_column, positions = steps(
                        self, sampler, stop_rules, next_tokens, positions, unfinished, end_column, history,
                        pad_token_id, per_call)
                    new = per_call
                    continue
                if (length - prompt_length) % check_every == 0 and not bool(unfinished.any()):
                    break
                # one step: each row's newest token at its position, and the choice of the next
                next_tokens, unfinished, end_column, positions = step(
                    self, sampler, stop_rules, next_tokens, positions, unfinished, end_column, history, pad_token_id)
                new = 1
        finally:
            self.clear_caches()
            if streamer is not None:
                streamer.end()
        if not bool(unfinished.any()):  # every row finished: the output ends where the last one did
            length = min(length, int(end_column.max()))
        return tokens[:, :length]

    # ---- helpers ----

    def _prepare_prompt(self, input_ids, attention_mask, pad_token_id: int, eos_ids: list[int]):
        """Validated (B, T) input_ids and 0/1 attention_mask on the model's device; empty prompts get BOS."""
        cfg = self.config
        device = self.device
        if input_ids is None:
            input_ids = torch.zeros(1, 0, dtype=torch.long)
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids, dtype=torch.long)
            except (TypeError, ValueError) as e:
                raise TypeError(f"input_ids must be a LongTensor (batch, seq) or nested lists of ints: {e}") from None
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has no rows")
        input_ids = input_ids.to(device=device, dtype=torch.long)
        if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= cfg.vocab_size)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][:5].tolist()
            raise ValueError(f"input_ids holds ids outside the vocabulary [0, {cfg.vocab_size}): e.g. {bad}")

        if attention_mask is None:
            # as transformers: padding can only be told apart from text when pad differs from EOS
            if pad_token_id not in eos_ids:
                attention_mask = (input_ids != pad_token_id).long()
                if input_ids.shape[1] and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                    raise ValueError(f"input_ids has pad_token_id={pad_token_id} after a text token: right padding, "
                                     "or that id inside the text; pad on the left and pass attention_mask")
            else:
                attention_mask = torch.ones_like(input_ids)
        else:
            attention_mask = torch.as_tensor(attention_mask).to(device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            if attention_mask.numel() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 and 1")
            attention_mask = attention_mask.long()
            if input_ids.shape[1] and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("generate() needs left padding: a row of attention_mask has a 0 after a 1 "
                                 "(set tokenizer.padding_side = 'left')")

        # an empty prompt (or an all-padding row) starts from <|startoftext|>
        empty_rows = attention_mask.sum(dim=1) == 0  # (B,)
        if bool(empty_rows.any()):
            bos = cfg.bos_token_id
            if bos is None:
                raise ValueError("the prompt is empty and config.bos_token_id is not set, so there is nothing to start from")
            if input_ids.shape[1] == 0:
                input_ids = torch.full((input_ids.shape[0], 1), bos, dtype=torch.long, device=device)
                attention_mask = torch.ones_like(input_ids)
            else:
                input_ids = input_ids.clone()
                attention_mask = attention_mask.clone()
                input_ids[empty_rows, -1] = bos
                attention_mask[empty_rows, -1] = 1

        longest = int(attention_mask.sum(dim=1).max())  # left padding takes no position
        if longest > cfg.max_position_embeddings:
            raise ValueError(f"the prompt has {longest} tokens, more than the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}; shorten it")
        return input_ids, attention_mask

    def _total_length(self, prompt_length: int, max_length: int | None, max_new_tokens: int | None,
                      row_ends: torch.Tensor) -> int:
        """Columns of the output (prompt width included): what was asked for, but no more than the longest
        row may take; `row_ends` (B,) is the column at which each row reaches max_position_embeddings."""
        limit = self.config.max_position_embeddings
        if max_new_tokens is not None:
            if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
            total = prompt_length + max_new_tokens  # takes precedence over max_length, as in transformers
        else:
            if max_length is None:
                max_length = DEFAULT_MAX_LENGTH
            if not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
            if max_length <= prompt_length:
                warnings.warn(f"max_length={max_length} leaves no room after the {prompt_length}-token prompt; "
                              "nothing is generated (use max_new_tokens to set the number of new tokens)",
                              stacklevel=4)
            total = max(max_length, prompt_length)
        shortest_end = int(row_ends.min())
        if total > shortest_end:
            padding = shortest_end - limit  # of the row that runs out first
            warnings.warn(f"the requested length ({total - padding} tokens) exceeds max_position_embeddings={limit}: "
                          f"generation stops at {limit} tokens", stacklevel=4)
            total = min(total, int(row_ends.max()))
        return total


class _StopStringChecker:
    """Finds rows whose text now holds one of the stop strings, ending in what was generated.

    A match may begin in the prompt, as in transformers (a prompt ending in "\n" and a generated "User:"
    complete "\nUser:"); a stop string wholly inside the prompt does not count. A row stops at its first
    match, so any match in the text of its newest tokens is a new one: decoding a tail long enough to hold
    the longest stop string (every token is at least one character, a byte token a quarter of one) keeps
    each step's cost independent of the length generated so far.
    """

    def __init__(self, tokenizer, stop_strings: list[str], prompt_length: int, padding_lengths: torch.Tensor):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.prompt_length = prompt_length
        self.padding_lengths = padding_lengths.tolist()  # the padding is no text
        self.tail_tokens = 4 * max(len(s) for s in stop_strings) + 4

    def found(self, tokens: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
        hits = torch.zeros_like(unfinished)
        start = max(0, tokens.shape[1] - self.tail_tokens)
        tails = tokens[:, start:].tolist()
        for row in unfinished.nonzero().flatten().tolist():
            row_start = max(start, self.padding_lengths[row])
            tail = tails[row][row_start - start:]
            text = self.tokenizer.decode(tail)
            in_prompt = self.prompt_length - row_start  # tokens of the tail that are prompt
            boundary = len(self.tokenizer.decode(tail[:in_prompt])) if in_prompt > 0 else 0
            # a match must end past the boundary: it starts at boundary - len(s) + 1 or later
            hits[row] = any(text.find(s, max(0, boundary - len(s) + 1)) >= 0 for s in self.stop_strings)
        return hits


def _as_id_list(value, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = [value] if isinstance(value, int) else list(value) if isinstance(value, Iterable) else None
    if values is None or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
        raise ValueError(f"{name} must be a token id or a list of token ids, got {value!r}")
    return values
