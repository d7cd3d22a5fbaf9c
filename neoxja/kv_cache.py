"""A static key/value cache for one attention layer (gpt-fast style).

The cache is allocated once for (max_batch_size, max_seq_length); each decoding step writes its keys and
values into explicit slots `input_pos` and attends over the slots written so far. Buffers are
non-persistent, so they never appear in a state dict or a checkpoint.
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
        shape = (max_batch_size, num_heads, max_seq_length, head_size)  # (B, nh, T_max, hs)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_length(self) -> int:
        return self.k_cache.shape[2]

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) into slots input_pos (T,); return the buffers (B, nh, T_max, hs), or
        their first `length` slots (B, nh, length, hs) when given: the slots written so far, all a step
        needs to attend to (so early steps of a long generation do not read the empty rest)."""
        k_all, v_all = self.k_cache, self.v_cache  # one attribute lookup each: this runs per layer per step
        B, nh, T, hs = k.shape
        if v.shape != k.shape or input_pos.shape != (T,):
            raise ValueError(f"KVCache.update: k {tuple(k.shape)}, v {tuple(v.shape)} and input_pos "
                             f"{tuple(input_pos.shape)} must be (B, nh, T, hs), (B, nh, T, hs) and (T,)")
        max_batch, cache_nh, max_length, cache_hs = k_all.shape
        if B > max_batch or nh != cache_nh or hs != cache_hs:
            raise ValueError(f"KVCache.update: k of shape {tuple(k.shape)} does not fit the cache of shape "
                             f"{tuple(k_all.shape)}")
        if length is not None and not 0 < length <= max_length:
            raise ValueError(f"KVCache.update: length must be in [1, {max_length}], got {length}")
        if B < max_batch:  # a smaller batch uses the first rows
            k_all, v_all = k_all[:B], v_all[:B]
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        if length is not None and length < max_length:
            return k_all.narrow(2, 0, length), v_all.narrow(2, 0, length)  # (B, nh, length, hs) views
        return k_all, v_all
