"""The step functions the engine runs, behind one small interface.

`BatchedSteps` is the design of neoxja.generation: one KV cache whose rows are slots, `prefill(model, ids,
slot, start_pos)` and `decode_one_token(model, tokens, positions)` over slots 0..B-1.
`PerSlotSteps` is a fallback for a neoxja.generation without those functions: each slot keeps its own
past keys/values and a decode step runs each slot alone (correct, batch-invariant, slower).
`make_steps(model, ...)` picks the first available.
"""

from __future__ import annotations

import torch


class BatchedSteps:
    def __init__(self, model, max_num_seqs: int, max_model_len: int, prefill_fn, decode_fn):
        self.model = model
        self._prefill, self._decode = prefill_fn, decode_fn
        model.setup_caches(max_batch_size=max_num_seqs, max_seq_length=max_model_len)

    def prefill(self, ids: torch.Tensor, slot: int, start_pos: int) -> torch.Tensor:
        return self._prefill(self.model, ids, slot, start_pos)  # (1, V)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._decode(self.model, tokens, positions)  # (B, V)

    def free(self, slot: int) -> None:
        pass  # a slot's rows are written over by its next request

    def close(self) -> None:
        self.model.clear_caches()


class PerSlotSteps:
    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.past: list[tuple | None] = [None] * max_num_seqs

    def _forward(self, ids: torch.Tensor, slot: int, start_pos: int) -> torch.Tensor:
        past = self.past[slot]
        if start_pos == 0:
            past = None
        elif past is not None and past[0][0].shape[2] > start_pos:
            past = tuple((k[:, :, :start_pos], v[:, :, :start_pos]) for k, v in past)
        out = self.model(ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        self.past[slot] = out.past_key_values
        return out.logits[:, -1]  # (1, V)

    def prefill(self, ids: torch.Tensor, slot: int, start_pos: int) -> torch.Tensor:
        return self._forward(ids, slot, start_pos)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = []
        for slot, (token, position) in enumerate(zip(tokens.tolist(), positions.tolist())):
            past = self.past[slot]
            if past is None or past[0][0].shape[2] < position:  # a free or mid-prefill row: nothing to do
                rows.append(None)
                continue
            rows.append(self._forward(torch.tensor([[token]], device=tokens.device), slot, position)[0])
        V = self.model.config.vocab_size
        filler = torch.zeros(V, device=tokens.device)
        return torch.stack([r if r is not None else filler for r in rows])  # (B, V)

    def free(self, slot: int) -> None:
        self.past[slot] = None

    def close(self) -> None:
        self.past = [None] * len(self.past)


def make_steps(model, max_num_seqs: int, max_model_len: int):
    from neoxja import generation

    prefill_fn = getattr(generation, "prefill", None)
    decode_fn = getattr(generation, "decode_one_token", None)
    if prefill_fn is not None and decode_fn is not None:
        return BatchedSteps(model, max_num_seqs, max_model_len, prefill_fn, decode_fn)
    return PerSlotSteps(model, max_num_seqs, max_model_len)
