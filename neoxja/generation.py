"""Text generation: `model.generate(...)` as in transformers, built on the model's static KV cache.

The loop (gpt-fast style): allocate every layer's KV cache once for the whole generation, run the
prompt through it in one forward (prefill), then one forward per step over only the newest token.
Each step: logits of the last position -> logits processors (sampling.py, transformers' order) ->
sampler -> append; rows that finish (EOS or a stop string) are padded with pad_token_id from then on.

Left-padded batches: the attention mask gives every row its own rotary positions (a row's first real
token is position 0) and a key padding mask keeps padding slots out of attention, so each row of a
greedy batch equals generating that prompt alone.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch

from neoxja.sampling import apply_logits_processors, make_logits_processors, make_sampler, vocab_limit_processor

# transformers' generation defaults (GenerationConfig), so that ported calls sample the same distribution
DEFAULT_MAX_LENGTH = 20  # when neither max_length nor max_new_tokens is given
DEFAULT_TOP_K = 50  # when sampling and top_k is None


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

        if top_k is None:
            top_k = DEFAULT_TOP_K  # what transformers samples with when top_k is not given; 0 turns it off
        input_ids, attention_mask = self._prepare_prompt(input_ids, attention_mask, pad_token_id, eos_ids)
        batch, prompt_length = input_ids.shape
        if streamer is not None and batch * num_return_sequences != 1:
            raise ValueError("a streamer shows one sequence: use batch size 1 and num_return_sequences=1")
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
            batch = input_ids.shape[0]
        padding_lengths = (attention_mask == 0).sum(dim=1)  # (B,) left padding per row
        # a row's positions end at max_position_embeddings: its last column is its padding + that limit
        row_ends = padding_lengths + cfg.max_position_embeddings  # (B,)
        total_length = self._total_length(prompt_length, max_length, max_new_tokens, row_ends)
        if vocab_limit is not None and (not isinstance(vocab_limit, int) or isinstance(vocab_limit, bool)
                                        or vocab_limit < 1):
            raise ValueError(f"vocab_limit must be a positive integer (e.g. len(tokenizer)), got {vocab_limit!r}")
        processors = make_logits_processors(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens, prompt_length=prompt_length, eos_token_ids=eos_ids,
            padding_lengths=padding_lengths if bool(padding_lengths.any()) else None,
        )
        if vocab_limit is not None and vocab_limit < cfg.vocab_size:
            processors.insert(0, vocab_limit_processor(vocab_limit))  # before any other processor sees the ids
        sample = make_sampler(do_sample, generator)

        if streamer is not None:
            streamer.put(input_ids.cpu())
        if total_length == prompt_length:
            if streamer is not None:
                streamer.end()
            return input_ids

        # ---- buffers for the whole generation: tokens, cache slots, padding mask, positions ----
        tokens = torch.full((batch, total_length), pad_token_id, dtype=torch.long, device=device)  # (B, T_total)
        tokens[:, :prompt_length] = input_ids
        slots = torch.arange(total_length, device=device)  # slot t holds column t of `tokens`
        key_padding_mask = None  # without left padding, the causal mask alone is right
        if bool(padding_lengths.any()):
            key_padding_mask = torch.ones(batch, total_length, dtype=torch.bool, device=device)  # (B, T_total)
            key_padding_mask[:, :prompt_length] = attention_mask.bool()
        # rotary position = index among the row's real tokens; padding gets 0 (it is masked anyway)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T_prompt)
        next_position = position_ids[:, -1:] + 1  # (B, 1)
        eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        stop_checker = (_StopStringChecker(tokenizer, stop_strings, prompt_length, padding_lengths)
                        if stop_strings else None)

        self.setup_caches(max_batch_size=batch, max_seq_length=total_length)
        try:
            # prefill: the whole prompt in one forward, logits for its last position only
            logits = self.forward_cached(input_ids, slots[:prompt_length], position_ids, key_padding_mask,
                                         kv_length=prompt_length)
            length = prompt_length
            while True:
                scores = apply_logits_processors(processors, tokens[:, :length], logits[:, -1].float())  # (B, V)
                next_tokens = sample(scores)  # (B,)
                next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
                tokens[:, length] = next_tokens
                length += 1
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                unfinished &= row_ends > length  # a row that reached max_position_embeddings stops
                if eos_tensor.numel():
                    unfinished &= ~torch.isin(next_tokens, eos_tensor)
                if stop_checker is not None:
                    unfinished &= ~stop_checker.found(tokens[:, :length], unfinished)
                if length == total_length or not bool(unfinished.any()):
                    break
                # one step: the newest token only, written to slot `length - 1`
                logits = self.forward_cached(tokens[:, length - 1 : length], slots[length - 1 : length],
                                             next_position, key_padding_mask, kv_length=length)
                next_position += 1
        finally:
            self.clear_caches()
            if streamer is not None:
                streamer.end()
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
