"""KVCache: explicit slots, whole buffers returned, non-persistent, checked arguments."""

from __future__ import annotations

import pytest
import torch

from neoxja.kv_cache import KVCache


def test_update_writes_slots_and_returns_whole_buffers():
    cache = KVCache(max_batch_size=3, max_seq_length=6, num_heads=2, head_size=4, dtype=torch.bfloat16)
    assert cache.k_cache.shape == (3, 2, 6, 4) and cache.k_cache.dtype == torch.bfloat16
    assert not cache.k_cache.any() and cache.state_dict() == {}
    k = torch.randn(2, 2, 3, 4)  # a smaller batch uses the first rows
    v = torch.randn(2, 2, 3, 4)
    k_all, v_all = cache.update(torch.tensor([1, 2, 4]), k, v)
    assert k_all.shape == (2, 2, 6, 4)
    torch.testing.assert_close(k_all[:, :, [1, 2, 4]], k.to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(v_all[:, :, [1, 2, 4]], v.to(torch.bfloat16), atol=0, rtol=0)
    assert not k_all[:, :, [0, 3, 5]].any() and not cache.k_cache[2].any()
    assert k_all.data_ptr() == cache.k_cache.data_ptr()  # views of the buffer, no copy


@pytest.mark.parametrize("bad", [
    dict(k=torch.zeros(1, 2, 3, 4), v=torch.zeros(1, 2, 3, 4), input_pos=torch.arange(2)),
    dict(k=torch.zeros(1, 2, 3, 4), v=torch.zeros(1, 2, 2, 4), input_pos=torch.arange(3)),
    dict(k=torch.zeros(4, 2, 1, 4), v=torch.zeros(4, 2, 1, 4), input_pos=torch.arange(1)),
    dict(k=torch.zeros(1, 3, 1, 4), v=torch.zeros(1, 3, 1, 4), input_pos=torch.arange(1)),
])
def test_update_rejects_shapes_that_do_not_fit(bad):
    cache = KVCache(3, 6, 2, 4)
    with pytest.raises(ValueError, match="KVCache.update"):
        cache.update(bad["input_pos"], bad["k"], bad["v"])


def test_sizes_must_be_positive_integers():
    with pytest.raises(ValueError, match="max_seq_length"):
        KVCache(1, 0, 2, 4)
    with pytest.raises(ValueError, match="max_batch_size"):
        KVCache(1.5, 4, 2, 4)


def test_update_with_length_returns_the_written_prefix():
    cache = KVCache(max_batch_size=2, max_seq_length=8, num_heads=2, head_size=4)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    k_pre, v_pre = cache.update(torch.arange(3), k, v, length=3)
    assert k_pre.shape == v_pre.shape == (2, 2, 3, 4)
    torch.testing.assert_close(k_pre, k, atol=0, rtol=0)
    torch.testing.assert_close(v_pre, v, atol=0, rtol=0)
    assert k_pre.data_ptr() == cache.k_cache.data_ptr()  # still a view of the buffer
    k1 = torch.randn(2, 2, 1, 4)
    k_pre, _ = cache.update(torch.tensor([3]), k1, k1, length=4)
    torch.testing.assert_close(k_pre[:, :, 3:], k1, atol=0, rtol=0)
    k_all, _ = cache.update(torch.tensor([7]), k1, k1, length=8)  # every slot: the whole buffers
    assert k_all.shape == (2, 2, 8, 4) and k_all.data_ptr() == cache.k_cache.data_ptr()
    torch.testing.assert_close(k_all[:, :, 7:], k1, atol=0, rtol=0)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="length"):
            cache.update(torch.tensor([0]), k1, k1, length=bad)
