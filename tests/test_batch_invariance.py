"""Batch invariance on the bundled model (float32): what a row gets does not depend on the other rows of a
decode step, so a request's output is the same alone and under load (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neoxja
from neoxja.batch_invariant import RowInvariantLinear, make_batch_invariant
from neoxja.generation import decode_one_token, prefill, prefill_chunks
from neoxja.sampling import FINISH_NONE, History, SamplingBatch, SamplingParams, StopRules, make_generator


@pytest.fixture(scope="module")
def model(bundled_dir):
    m = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    return make_batch_invariant(m)


def random_prompts(n: int, seed: int, vocab: int = 7990, longest: int = 20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, int(torch.randint(1, longest, (1,), generator=g))), generator=g)
            for _ in range(n)]


def test_the_transform_shares_parameters_and_leaves_the_model_equal(model, bundled_dir):
    assert isinstance(model.embed_out, RowInvariantLinear)
    assert model.embed_out.weight is model.gpt_neox_japanese.embed_in.weight  # the tie survives
    assert make_batch_invariant(model) is model  # idempotent
    plain = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 7990, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=2e-5, rtol=0)
    with torch.enable_grad():  # training falls back to F.linear, with gradients
        lin = RowInvariantLinear.wrap(nn.Linear(4, 3))
        lin(torch.randn(2, 4)).sum().backward()
        assert lin.weight.grad is not None


def test_decode_one_token_gives_each_row_its_bits_whatever_the_row_count(model):
    """B = 1..33 rows, with random other rows: each row's logits equal bitwise that row in the 33-row step,
    and the lone row's equal a step over that prompt alone in a cache of another size."""
    n = 33
    prompts = random_prompts(n, seed=0)
    tokens = torch.randint(0, 7990, (n,), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([p.shape[1] for p in prompts])
    model.setup_caches(max_batch_size=n, max_seq_length=64)
    try:
        for slot, p in enumerate(prompts):
            prefill(model, p, slot, 0)
        full = decode_one_token(model, tokens, lengths)  # (33, V)
        for B in range(1, n + 1):
            assert torch.equal(decode_one_token(model, tokens[:B], lengths[:B]), full[:B]), f"B={B}"
        model.setup_caches(max_batch_size=1, max_seq_length=lengths[5].item() + 1)  # alone, a tight cache
        prefill(model, prompts[5], 0, 0)
        assert torch.equal(decode_one_token(model, tokens[5:6], lengths[5:6])[0], full[5])
    finally:
        model.clear_caches()


def run_rows(model, prompts, params, eos, together: bool, max_len: int = 64):
    """An engine-like loop: every row in its own slot, one decode step over all running rows, per-row
    sampling with the row's own generator and per-row stop rules. Returns each row's new tokens."""
    order = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    results = {}
    for rows in order:
        B = len(rows)
        model.setup_caches(max_batch_size=B, max_seq_length=max_len)
        hist = torch.zeros(B, max_len, dtype=torch.long)
        lengths = torch.tensor([prompts[r].shape[1] for r in rows])
        for slot, r in enumerate(rows):
            hist[slot, :lengths[slot]] = prompts[r][0]
        ps = [params[r] for r in rows]
        sampler = SamplingBatch(ps, eos, generators=[make_generator(p.seed) for p in ps])
        stops = StopRules(ps, eos, max_len)
        logits = torch.cat([prefill_chunks(model, prompts[r], slot) for slot, r in enumerate(rows)])
        prompt_end, generated = lengths.clone(), torch.zeros(B, dtype=torch.long)
        running = torch.ones(B, dtype=torch.bool)
        while True:
            out = sampler.sample(logits, History(hist, prompt_end, lengths)).tokens
            hist[torch.arange(B), lengths.clamp(max=max_len - 1)] = torch.where(running, out, hist[:, 0])
            generated += running.long()
            lengths = torch.where(running, lengths + 1, lengths)
            running &= stops.check(out, generated, lengths) == FINISH_NONE
            if not running.any():
                break
            logits = decode_one_token(model, torch.where(running, out, 0), lengths.clamp(max=max_len - 1) - 1)
        for slot, r in enumerate(rows):
            results[r] = hist[slot, prompt_end[slot]:lengths[slot]].tolist()
        model.clear_caches()
    return [results[i] for i in range(len(prompts))]


def test_greedy_and_seeded_rows_are_the_same_alone_and_under_load(model):
    n = 12
    prompts = random_prompts(n, seed=3)
    g = torch.Generator().manual_seed(4)
    params = []
    for i in range(n):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=int(torch.randint(2, 12, (1,), generator=g)), temperature=0))
        else:
            params.append(SamplingParams(max_tokens=int(torch.randint(2, 12, (1,), generator=g)), seed=100 + i,
                                         temperature=[0.7, 1.0, 1.3][i % 3], top_k=[0, 20][i % 2],
                                         top_p=[1.0, 0.9][(i // 2) % 2], repetition_penalty=[1.0, 1.2][i % 2],
                                         frequency_penalty=[0.0, 0.5][(i // 3) % 2], min_tokens=i % 2))
    eos = [model.config.eos_token_id]
    alone = run_rows(model, prompts, params, eos, together=False)
    together = run_rows(model, prompts, params, eos, together=True)
    assert together == alone
    assert len({len(t) for t in alone}) > 1  # rows of different lengths: finished rows left the batch early
    # greedy rows equal generate() on that prompt alone
    for i in range(0, n, 3):
        out = model.generate(prompts[i], max_new_tokens=params[i].max_tokens)
        assert out[0, prompts[i].shape[1]:].tolist() == alone[i][:out.shape[1] - prompts[i].shape[1]]


def test_generate_batch_rows_equal_each_prompt_alone(model):
    prompts = random_prompts(5, seed=7)
    width = max(p.shape[1] for p in prompts)
    eos = model.config.eos_token_id
    ids = torch.full((5, width), eos, dtype=torch.long)
    mask = torch.zeros(5, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - p.shape[1]:] = p[0]
        mask[r, width - p.shape[1]:] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=15, eos_token_id=[])
    for r, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=15, eos_token_id=[])
        assert torch.equal(batch[r, width - p.shape[1]:], alone[0])


def test_prepacked_weights_give_the_same_bits_and_follow_weight_changes():
    """prepack=True (oneDNN-blocked copies of the weights) gives the unpacked path's bits at every row count, and
    a weight changed in place, or replaced, is repacked before its next use (never a stale product)."""
    torch.manual_seed(0)
    plain = nn.Linear(64, 48)
    packed = make_batch_invariant(nn.Sequential(nn.Linear(64, 48)), prepack=True)[0]
    unpacked = make_batch_invariant(nn.Sequential(nn.Linear(64, 48)), prepack=False)[0]
    for m in (packed, unpacked):
        m.weight, m.bias = plain.weight, plain.bias
    assert packed.prepack and not unpacked.prepack
    x = torch.randn(9, 64)
    with torch.no_grad():
        for rows in (1, 2, 5, 9):
            assert torch.equal(packed(x[:rows]), unpacked(x[:rows]))
        before = packed(x)
        plain.weight.mul_(2)  # in place: the version counter moves
        assert torch.equal(packed(x), unpacked(x)) and not torch.equal(packed(x), before)
        packed.weight = nn.Parameter(torch.randn(48, 64))  # replaced
        assert torch.equal(packed(x), torch.ops.mkldnn._linear_pointwise(x, packed.weight, packed.bias, "none",
                                                                           [None], ""))
    with pytest.raises(ValueError, match="prepack"):
        make_batch_invariant(nn.Linear(2, 2), prepack="yes")


def test_compiled_prepacked_products_give_the_same_bits_and_follow_weight_changes(monkeypatch):
    """Under torch.compile the custom op finds the weight's blocked copy itself (a graph cannot make one): the
    eager bits at every row count, and a weight changed in place between two calls of a graph is repacked."""
    torch.manual_seed(0)
    layer = make_batch_invariant(nn.Sequential(nn.Linear(64, 48)), prepack=True)[0]
    if layer.op is None:
        pytest.skip("no oneDNN linear in this torch build")
    import neoxja.batch_invariant as bi

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(9, 64)
    looked_up = []
    real = bi.blocked_copy
    monkeypatch.setattr(bi, "blocked_copy", lambda w, *a: (looked_up.append(w is layer.weight), real(w, *a))[1])
    with torch.no_grad():
        for rows in (1, 2, 5, 9):
            looked_up.clear()
            y = compiled(x[:rows])
            assert looked_up == [True]  # the compiled product used the blocked copy of this very weight
            assert torch.equal(y, layer(x[:rows]))
        before = compiled(x[:2])
        layer.weight.mul_(-2)  # in place, between two calls of the same graph
        after = compiled(x[:2])
        assert not torch.equal(after, before) and torch.equal(after, layer(x[:2]))
        assert torch.equal(after, torch.ops.mkldnn._linear_pointwise(x[:2], layer.weight, layer.bias, "none",
                                                                       [None], ""))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_in_a_batch_of_forty(dtype):
    """Beyond 32 rows, oneDNN's bfloat16 products block the sum differently (measured on a Xeon with AMX at
    2,560 inputs): bf16 products run in blocks of at most 32 rows, so a row's bits do not depend on whether
    2, 16 or 40 rows share the call."""
    torch.manual_seed(0)
    layer = make_batch_invariant(nn.Sequential(nn.Linear(2560, 256)).to(dtype))[0]
    x = torch.randn(40, 2560).to(dtype)
    with torch.no_grad():
        together = layer(x)
        for rows in (slice(0, 1), slice(0, 2), slice(5, 21), slice(33, 40), slice(0, 33)):
            assert torch.equal(layer(x[rows]), together[rows]), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_segments_equals_one_prefill_per_chunk(bundled_dir, dtype):
    """The engine prefills a step's chunks in one call: the same logits, bit for bit, and the same cache
    contents as one prefill() per chunk, for chunks of different lengths, slots and start positions."""
    from neoxja.generation import prefill_segments

    model = make_batch_invariant(neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=dtype).eval())
    g = torch.Generator().manual_seed(3)
    history = torch.randint(0, 7990, (1, 40), generator=g)
    chunks = [(torch.randint(0, 7990, (1, n), generator=g), slot, start, kv)
              for n, slot, start, kv in [(37, 2, 0, 64), (1, 0, 0, 64), (20, 5, 40, 64), (9, 1, 0, 16)]]
    caches = []
    with torch.no_grad():
        for together in (False, True):
            model.setup_caches(max_batch_size=6, max_seq_length=128)
            prefill(model, history, 5, 0)  # slot 5 already holds 40 tokens: its chunk continues them
            if together:
                logits = prefill_segments(model, chunks)
            else:
                logits = torch.cat([prefill(model, ids, slot, start, kv) for ids, slot, start, kv in chunks])
            caches.append((logits, [layer.attention.kv_cache.k_cache.clone()
                                    for layer in model.gpt_neox_japanese.layers]))
            model.clear_caches()
    (alone, k_alone), (together, k_together) = caches
    assert together.shape == (4, model.config.vocab_size)
    assert torch.equal(alone, together)
    assert all(torch.equal(a, b) for a, b in zip(k_alone, k_together))

    model.setup_caches(max_batch_size=2, max_seq_length=16)
    try:
        with pytest.raises(ValueError, match="slot < 2"):
            prefill_segments(model, [(torch.ones(1, 3, dtype=torch.long), 2, 0, 16)])
        with pytest.raises(ValueError, match="must be \\(1, T\\)"):
            prefill_segments(model, [(torch.ones(1, 0, dtype=torch.long), 0, 0, 16)])
        with pytest.raises(ValueError, match="no chunks"):
            prefill_segments(model, [])
    finally:
        model.clear_caches()


@pytest.mark.parametrize("prepack", [True, False])
def test_bfloat16_where_onednn_has_no_bfloat16_kernel(monkeypatch, prepack):
    """On a CPU where oneDNN has no bfloat16 kernel (AVX2-only; simulated here on any CPU), bfloat16 products go
    through float32's row-invariant product and are rounded once: a row's bits still do not depend on the
    batch, and they are float32's product rounded to bfloat16."""
    from neoxja import batch_invariant, kernels

    monkeypatch.setattr(kernels, "onednn_dtypes", lambda: frozenset({torch.float32}))
    monkeypatch.setattr(batch_invariant, "onednn_dtypes", lambda: frozenset({torch.float32}))
    torch.manual_seed(0)
    layer = make_batch_invariant(nn.Sequential(nn.Linear(256, 64)).to(torch.bfloat16), prepack=prepack)[0]
    x = torch.randn(40, 256).to(torch.bfloat16)
    with torch.no_grad():
        together = layer(x)
        for rows in (slice(0, 1), slice(0, 2), slice(5, 21), slice(33, 40)):
            assert torch.equal(layer(x[rows]), together[rows]), rows
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    assert together.dtype == torch.bfloat16
    torch.testing.assert_close(together.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_a_batch_invariant_model_can_be_deep_copied():
    """copy.deepcopy of a transformed model (compile_decode's per-model cache expects copies) gives a model with
    the same bits and its own weights: the custom op is not an attribute of the modules."""
    import copy

    torch.manual_seed(0)
    model = make_batch_invariant(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)), prepack=True)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        twin[0].weight.mul_(2)
        assert not torch.equal(twin(x), model(x))
    assert twin[0].op is model[0].op
    from neoxja import kernels

    assert any(k[0] == id(model[0].weight) for k in kernels._BLOCKED)
    model.to(torch.float64)  # new data: the copies of the old are released with it, not kept until a next call
    assert not any(k[0] in (id(model[0].weight), id(model[1].weight)) for k in kernels._BLOCKED)
