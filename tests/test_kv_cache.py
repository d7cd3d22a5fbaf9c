"""KVCache: per-row positions, row ranges as views, non-persistent, checked arguments."""

from __future__ import annotations

import pytest
import torch

from neoxja.kv_cache import KVCache


def test_update_writes_each_row_at_its_own_positions_and_returns_views():
    cache = KVCache(max_batch_size=3, max_seq_length=6, num_heads=2, head_size=4, dtype=torch.bfloat16)
    assert cache.k_cache.shape == (3, 2, 6, 4) and cache.k_cache.dtype == torch.bfloat16
    assert not cache.k_cache.any() and cache.state_dict() == {}
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    pos = torch.tensor([[1, 2, 4], [0, 1, 2]])  # row 0 and row 1 at different positions
    k_all, v_all = cache.update(pos, k, v)  # rows 0..1
    assert k_all.shape == (2, 2, 6, 4)
    for row in range(2):
        torch.testing.assert_close(k_all[row][:, pos[row]], k[row].to(torch.bfloat16), atol=0, rtol=0)
        torch.testing.assert_close(v_all[row][:, pos[row]], v[row].to(torch.bfloat16), atol=0, rtol=0)
    assert not k_all[0][:, [0, 3, 5]].any() and not k_all[1][:, 3:].any() and not cache.k_cache[2].any()
    assert k_all.data_ptr() == cache.k_cache.data_ptr()  # views of the buffer, no copy


def test_first_row_selects_a_contiguous_range_without_touching_other_rows():
    cache = KVCache(max_batch_size=4, max_seq_length=5, num_heads=1, head_size=2)
    cache.k_cache.fill_(7.0)
    k = torch.randn(2, 1, 1, 2)
    k_rows, _ = cache.update(torch.tensor([[3], [0]]), k, k, first_row=1, kv_length=4)
    assert k_rows.shape == (2, 1, 4, 2)
    assert k_rows.data_ptr() == cache.k_cache[1].data_ptr()  # a view starting at row 1
    torch.testing.assert_close(cache.k_cache[1, :, 3], k[0, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(cache.k_cache[2, :, 0], k[1, :, 0], atol=0, rtol=0)
    assert bool((cache.k_cache[0] == 7).all()) and bool((cache.k_cache[3] == 7).all())
    with pytest.raises(ValueError, match="first_row"):
        cache.update(torch.tensor([[0], [0]]), k, k, first_row=3)


@pytest.mark.parametrize("bad", [
    dict(k=torch.zeros(1, 2, 3, 4), v=torch.zeros(1, 2, 3, 4), input_pos=torch.arange(3)),  # (T,) positions
    dict(k=torch.zeros(1, 2, 3, 4), v=torch.zeros(1, 2, 2, 4), input_pos=torch.zeros(1, 3, dtype=torch.long)),
    dict(k=torch.zeros(4, 2, 1, 4), v=torch.zeros(4, 2, 1, 4), input_pos=torch.zeros(4, 1, dtype=torch.long)),
    dict(k=torch.zeros(1, 3, 1, 4), v=torch.zeros(1, 3, 1, 4), input_pos=torch.zeros(1, 1, dtype=torch.long)),
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


def test_kv_length_returns_the_first_positions():
    cache = KVCache(max_batch_size=2, max_seq_length=8, num_heads=2, head_size=4)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    k_pre, v_pre = cache.update(torch.arange(3).expand(2, 3), k, v, kv_length=3)
    assert k_pre.shape == v_pre.shape == (2, 2, 3, 4)
    torch.testing.assert_close(k_pre, k, atol=0, rtol=0)
    torch.testing.assert_close(v_pre, v, atol=0, rtol=0)
    assert k_pre.data_ptr() == cache.k_cache.data_ptr()  # still a view of the buffer
    k1 = torch.randn(2, 2, 1, 4)
    k_all, _ = cache.update(torch.tensor([[7], [7]]), k1, k1, kv_length=8)  # every position: the whole buffers
    assert k_all.shape == (2, 2, 8, 4) and k_all.data_ptr() == cache.k_cache.data_ptr()
    torch.testing.assert_close(k_all[:, :, 7:], k1, atol=0, rtol=0)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="kv_length"):
            cache.update(torch.tensor([[0], [0]]), k1, k1, kv_length=bad)
