"""A static key/value cache for one attention layer, with per-slot positions (gpt-fast style, for serving).

The cache is allocated once: per layer two buffers (max_batch_size, nh, max_seq_length, hs). Each cache row
is a *slot* that holds one sequence: its first token at position 0, its n-th at position n-1 (no left
padding inside the cache), so a slot's positions are also its rotary positions. Slots have their own lengths.

`update(input_pos, k, v, first_row)` writes a call's keys and values for the contiguous rows
[first_row, first_row + B), each row at its own positions `input_pos` (B, T), and returns views of those
rows (never a copy of other rows). Attention then reads, for a query at position p, keys 0..p of its own
row only (the model builds that mask from input_pos); positions past a slot's length hold stale values
from an earlier sequence or a dummy write and are never read, so a freed slot is reused without clearing.
Buffers are non-persistent, so they never appear in a state dict or a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_length: int, num_heads: int, head_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_length", max_seq_length),
                            ("num_heads", num_heads), ("head_size", head_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {value!r}")
        shape = (max_batch_size, num_heads, max_seq_length, head_size)  # (B_max, nh, T_max, hs)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # index tensors for update's index_put_: row b (B_max, 1, 1) and head h (1, nh, 1) of each written vector
        self.register_buffer("_rows", torch.arange(max_batch_size, device=device).view(-1, 1, 1), persistent=False)
        self.register_buffer("_heads", torch.arange(num_heads, device=device).view(1, -1, 1), persistent=False)

    @property
    def max_seq_length(self) -> int:
        return self.k_cache.shape[2]

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_row: int = 0,
               kv_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) of cache rows [first_row, first_row + B) at positions input_pos (B, T)
        (row b at its own positions); return views of those rows, (B, nh, kv_length or T_max, hs).

        Positions must lie in [0, kv_length) (not checked: that would cost a device sync per step)."""
        k_all, v_all = self.k_cache, self.v_cache  # one attribute lookup each: this runs per layer per step
        B, nh, T, hs = k.shape
        if v.shape != k.shape or input_pos.shape != (B, T):
            raise ValueError(f"KVCache.update: k {tuple(k.shape)}, v {tuple(v.shape)} and input_pos "
                             f"{tuple(input_pos.shape)} must be (B, nh, T, hs), (B, nh, T, hs) and (B, T)")
        max_batch, cache_nh, max_length, cache_hs = k_all.shape
        if (not isinstance(first_row, int) or first_row < 0 or first_row + B > max_batch
                or nh != cache_nh or hs != cache_hs):
            raise ValueError(f"KVCache.update: k of shape {tuple(k.shape)} at first_row={first_row!r} does not fit "
                             f"the cache of shape {tuple(k_all.shape)}")
        if kv_length is not None and not 0 < kv_length <= max_length:
            raise ValueError(f"KVCache.update: kv_length must be in [1, {max_length}], got {kv_length}")
        if B < max_batch:  # rows [first_row, first_row + B): a view
            k_all, v_all = k_all.narrow(0, first_row, B), v_all.narrow(0, first_row, B)
        # k_all[b, h, input_pos[b, t]] = k[b, h, t]: whole hs-vectors copied, each row at its own positions
        # (index_put_ rather than scatter_ along dim 2, whose bfloat16 CPU kernel took 0.4 ms for a batch-8 step
        # and 113 ms for a batch-32 one over a 1,024-position cache; index_put_ takes 0.02-0.05 ms)
        index = (self._rows[:B], self._heads, input_pos.view(B, 1, T))  # broadcast to (B, nh, T)
        k_all.index_put_(index, k.to(k_all.dtype))
        v_all.index_put_(index, v.to(v_all.dtype))
        if kv_length is not None and kv_length < max_length:
            return k_all.narrow(2, 0, kv_length), v_all.narrow(2, 0, kv_length)  # (B, nh, kv_length, hs) views
        return k_all, v_all
