"""Differential tests of the model against transformers' GPTNeoXJapanese (the oracle), random-init small configs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseModel  # noqa: E402

ATOL = 2e-5

CONFIGS = {
    # full rotary, tied embeddings, even heads
    "rot1-tied": dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, rotary_pct=1.0,
                      tie_word_embeddings=True),
    # partial rotary, untied, odd head count (3 heads of 16 dims, 4 rotary dims)
    "rot025-untied-3heads": dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                 rotary_pct=0.25, tie_word_embeddings=False),
    # 5 heads, half rotary, linear rope scaling, other base
    "rot05-5heads-linear": dict(vocab_size=89, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                rotary_pct=0.5, rotary_emb_base=500, tie_word_embeddings=False,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def reference_config(kw: dict):
    kw = dict(kw)
    rope = {"rope_type": "default"}
    if kw.get("rope_scaling"):
        rope = dict(kw.pop("rope_scaling"))
    rope.update(rope_theta=float(kw.pop("rotary_emb_base", 10000)), partial_rotary_factor=kw.pop("rotary_pct"))
    return transformers.GPTNeoXJapaneseConfig(**kw, rope_parameters=rope, bos_token_id=0, eos_token_id=1)


def make_pair(name: str, seed: int = 0):
    """(transformers model, our model) with the same random weights, incl. non-trivial LayerNorms and dense_bias."""
    kw = CONFIGS[name]
    torch.manual_seed(seed)
    ref = transformers.GPTNeoXJapaneseForCausalLM(reference_config(kw)).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "layernorm" in pname or "layer_norm" in pname or "dense_bias" in pname:
                p.add_(torch.randn_like(p) * 0.5)  # dense_bias of the last layer becomes non-zero
            else:
                p.normal_(0.0, 0.1)
    ours = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**kw, bos_token_id=0, eos_token_id=1)).eval()
    result = ours.load_state_dict(ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    last = ours.gpt_neox_japanese.layers[-1].attention.dense_bias
    assert last is not None and last.abs().max() > 0.1
    assert all(layer.attention.dense_bias is None for layer in ours.gpt_neox_japanese.layers[:-1])
    return ref, ours


def make_batch(vocab_size: int, padding: str, B: int = 3, T: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = [T, T - 4, T - 7]
    for row, n in enumerate(lengths[:B]):
        if padding == "right":
            mask[row, n:] = 0
        elif padding == "left":
            mask[row, : T - n] = 0
    if padding == "none":
        mask = None
    return ids, mask


def real(mask, B, T):
    return torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32(name, padding):
    ref, ours = make_pair(name)
    ids, mask = make_batch(ref.config.vocab_size, padding)
    B, T = ids.shape
    # compared everywhere except at left-padding positions (see test_left_padding_positions_see_only_themselves)
    keep = real(mask, B, T) if padding == "left" else torch.ones(B, T, dtype=torch.bool)
    # labels: -100 on padding and where the predicting position is left padding, plus a random one
    labels = ids.clone()
    labels[~real(mask, B, T)] = -100
    labels[:, 1:][~keep[:, :-1]] = -100
    labels[0, 3] = -100

    kwargs = dict(attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True,
                  use_cache=True)
    with torch.no_grad():
        r = ref(ids, **kwargs)
        o = ours(ids, **kwargs)
    torch.testing.assert_close(o.logits[keep], r.logits[keep], atol=ATOL, rtol=0)
    assert o.logits.abs().max() > 1.0  # logits of order 1 to 10, so 2e-5 is a tight bound
    torch.testing.assert_close(o.loss, r.loss, atol=ATOL, rtol=0)
    assert len(o.hidden_states) == len(r.hidden_states) == ref.config.num_hidden_layers + 1
    for ho, hr in zip(o.hidden_states, r.hidden_states):
        torch.testing.assert_close(ho[keep], hr[keep], atol=ATOL, rtol=0)
    assert len(o.attentions) == ref.config.num_hidden_layers
    for ao, ar in zip(o.attentions, r.attentions):
        torch.testing.assert_close(ao.transpose(1, 2)[keep], ar.transpose(1, 2)[keep], atol=ATOL, rtol=0)
    assert len(o.past_key_values) == ref.config.num_hidden_layers
    for i, (k, v) in enumerate(o.past_key_values):
        layer = r.past_key_values.layers[i]
        torch.testing.assert_close(k.transpose(1, 2)[keep], layer.keys.transpose(1, 2)[keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(v.transpose(1, 2)[keep], layer.values.transpose(1, 2)[keep], atol=ATOL, rtol=0)

    # the SDPA path (no attention weights asked for) gives the same numbers
    with torch.no_grad():
        fast = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(fast.logits[keep], r.logits[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(fast.loss, r.loss, atol=ATOL, rtol=0)


def test_left_padding_positions_see_only_themselves():
    """Intended deviation: a left-padding position has no real key to its left. transformers adds finfo.min to
    every key, which averages uniformly over all positions, the future included; here it attends to itself only.
    Real positions never attend to padding in either implementation (checked by test_parity_float32)."""
    _, ours = make_pair("rot025-untied-3heads")
    ids, mask = make_batch(ours.config.vocab_size, "left")
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        for row, col in [(2, 0), (2, 5), (1, 2)]:
            assert mask[row, col] == 0
            alone = ours.gpt_neox_japanese(ids[row: row + 1, col: col + 1],
                                           position_ids=torch.tensor([[col]])).last_hidden_state
            torch.testing.assert_close(out[row, col], alone[0, 0], atol=ATOL, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("padding", ["none", "left"])
def test_incremental_decoding_equals_full_forward(padding):
    ref, ours = make_pair("rot025-untied-3heads")
    ids, mask = make_batch(ref.config.vocab_size, padding)
    B, T = ids.shape
    keep = real(mask, B, T)
    full_mask = mask if mask is not None else torch.ones(B, T, dtype=torch.long)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        out = ours(ids[:, :4], attention_mask=full_mask[:, :4])
        pieces, past = [out.logits], out.past_key_values
        for t in range(4, T, 3):  # chunks of up to 3 tokens
            out = ours(ids[:, t: t + 3], attention_mask=full_mask[:, : t + 3], past_key_values=past)
            pieces.append(out.logits)
            past = out.past_key_values
        # the reference, fed the same way, agrees too
        r = ref(ids[:, :4], attention_mask=full_mask[:, :4])
        ref_pieces, ref_past = [r.logits], r.past_key_values
        for t in range(4, T, 3):
            r = ref(ids[:, t: t + 3], attention_mask=full_mask[:, : t + 3], past_key_values=ref_past)
            ref_pieces.append(r.logits)
            ref_past = r.past_key_values
    incremental = torch.cat(pieces, dim=1)
    assert past[0][0].shape == (B, 3, T, 16)
    torch.testing.assert_close(incremental[keep], full[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(incremental[keep], torch.cat(ref_pieces, 1)[keep], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["rot1-tied", "rot05-5heads-linear"])
def test_forward_cached_equals_forward(name):
    """Each row of a left-padded batch, without its padding, in its own cache slot from position 0: a
    chunked prefill and then steps that decode every row at once, each at its own position."""
    _, ours = make_pair(name)
    ids, mask = make_batch(ours.config.vocab_size, "left")
    B, T = ids.shape
    lengths = mask.sum(1).tolist()  # [11, 7, 4]
    with torch.no_grad():
        alone = [ours(ids[b:b + 1, T - n:]).logits[0] for b, n in enumerate(lengths)]  # (n, V) each

    T_max = T + 5
    ours.setup_caches(max_batch_size=B + 1, max_seq_length=T_max)
    cache = ours.gpt_neox_japanese.layers[0].attention.kv_cache
    assert cache.k_cache.shape == (B + 1, ours.config.num_attention_heads, T_max, ours.config.head_size)
    assert "k_cache" not in str(list(ours.state_dict()))  # non-persistent
    prompt = 3  # each row's first 3 tokens: a prefill in two chunks (2 + 1 tokens) into slot b
    got = [[] for _ in range(B)]
    for b, n in enumerate(lengths):
        row = ids[b:b + 1, T - n:]
        got[b].append(ours.forward_cached(row[:, :2], torch.arange(2)[None], first_row=b, last_only=False)[0])
        got[b].append(ours.forward_cached(row[:, 2:3], torch.tensor([[2]]), first_row=b, kv_length=T_max)[0])
    for t in range(prompt, max(lengths)):  # one step over rows 0..B-1; rows already done get a dummy token
        step_ids = torch.stack([ids[b, T - n + min(t, n - 1)] for b, n in enumerate(lengths)])[:, None]
        positions = torch.tensor([[min(t, n - 1)] for n in lengths])  # (B, 1)
        logits = ours.forward_cached(step_ids, positions)
        assert logits.shape == (B, 1, ours.config.vocab_size)
        for b, n in enumerate(lengths):
            if t < n:
                got[b].append(logits[b])
    for b in range(B):
        torch.testing.assert_close(torch.cat(got[b]), alone[b], atol=ATOL, rtol=0)

    ours.clear_caches()
    assert ours.gpt_neox_japanese.layers[0].attention.kv_cache is None
    with pytest.raises(RuntimeError, match="setup_caches"):
        ours.forward_cached(ids, torch.arange(T).expand(B, T))


def test_cached_path_arguments_are_checked():
    _, ours = make_pair("rot1-tied")
    ours.setup_caches(2, 8)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="input_pos"):
        ours.forward_cached(ids, torch.arange(3))  # one row of positions for two rows of tokens
    with pytest.raises(ValueError, match="max_batch_size"):
        ours.forward_cached(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="first_row"):
        ours.forward_cached(ids, torch.zeros(2, 3, dtype=torch.long), first_row=1)
    with pytest.raises(ValueError, match="max_seq_length"):
        ours.setup_caches(2, 0)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="kv_length"):
            ours.forward_cached(ids, torch.zeros(2, 3, dtype=torch.long), kv_length=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_attention_copies_the_keys_in_pieces_with_the_same_bits(monkeypatch, dtype):
    """In bfloat16/float16 on a CPU, _cached_attention's float32 scores come from float32 copies of the keys a
    few heads at a time (KEY_COPY_BYTES; a copy of the whole cache is fresh memory at every step): any piece
    size gives the bits of one whole copy, for one query (computed as two) and for several."""
    from neoxja import model as model_module

    gen = torch.Generator().manual_seed(0)
    for B, T, S in ((3, 1, 40), (2, 5, 24), (1, 1, 7)):
        q, k, v = (torch.randn(B, 4, n, 16, generator=gen).to(dtype) for n in (T, S, S))
        mask = torch.zeros(B, 1, T, S)
        mask[0, :, :, S // 2:] = float("-inf")
        outs, calls = [], []
        real_bmm = torch.bmm
        keys = max(S, 16) * 16 * 4  # one head's float32 keys (fewer than 16 positions are padded to 16)
        for piece in (1 << 40, keys, 3 * keys + 5):  # whole, one head per copy, three
            monkeypatch.setattr(model_module, "KEY_COPY_BYTES", piece)
            counted = []
            monkeypatch.setattr(torch, "bmm", lambda *a: counted.append(1) or real_bmm(*a))
            outs.append(model_module._cached_attention(q, k, v, mask, 0.25))
            monkeypatch.setattr(torch, "bmm", real_bmm)
            calls.append(len(counted))
        assert calls == [2, B * 4 + 1, -(-B * 4 // 3) + 1]  # the scores' pieces, then one product with v
        assert outs[0].dtype == dtype and outs[0].shape == (B, 4, T, 16)
        for out in outs[1:]:
            assert torch.equal(out, outs[0])
        reference = ((q.float() @ k.float().transpose(-1, -2)) * 0.25 + mask).softmax(-1).to(dtype).float() @ v.float()
        torch.testing.assert_close(outs[0].float(), reference, atol=2e-2, rtol=2e-2)


def test_forward_cached_reads_only_each_rows_own_written_positions():
    """Garbage in every other position of the cache (other slots, stale positions past a row's length)
    changes nothing, and kv_length (the first positions only) gives bitwise the logits of the whole cache."""
    _, ours = make_pair("rot025-untied-3heads")
    ids = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids).logits  # (2, 7, V)
    results = []
    for kv_length in (None, 7):
        ours.setup_caches(3, 12)
        for layer in ours.gpt_neox_japanese.layers:
            layer.attention.kv_cache.k_cache.fill_(1e4)
            layer.attention.kv_cache.v_cache.fill_(-1e4)
        out = [ours.forward_cached(ids[:, :4], torch.arange(4).expand(2, 4), first_row=1, kv_length=kv_length,
                                   last_only=False)]
        for t in range(4, 7):
            out.append(ours.forward_cached(ids[:, t:t + 1], torch.full((2, 1), t), first_row=1, kv_length=kv_length))
        results.append(torch.cat(out, dim=1))
        torch.testing.assert_close(results[-1], full, atol=ATOL, rtol=0)
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)  # the same bits: see _cached_attention
    ours.clear_caches()


def test_bfloat16_relative_error_and_float16_stays_finite():
    ref, ours = make_pair("rot025-untied-3heads")
    ids, mask = make_batch(ref.config.vocab_size, "right")
    keep = mask.bool()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits[keep]
        for dtype in (torch.bfloat16, torch.float16):
            half = GPTNeoXJapaneseForCausalLM(ours.config).to(dtype).eval()
            half.load_state_dict(ours.state_dict())
            got = half(ids, attention_mask=mask, output_attentions=dtype == torch.float16).logits
            assert got.dtype == dtype
            rel = (got[keep].float() - expected).norm() / expected.norm()
            assert rel < 2e-2, (dtype, rel)
            # large activations: LayerNorm statistics in float32 keep float16 from overflowing
            big = half.gpt_neox_japanese(inputs_embeds=torch.full((1, 4, ours.config.hidden_size), 300.0,
                                                                  dtype=dtype)).last_hidden_state
            assert torch.isfinite(big).all()


def test_inputs_embeds_and_return_tuple_match_reference():
    ref, ours = make_pair("rot1-tied")
    ids, mask = make_batch(ref.config.vocab_size, "right")
    keep = mask.bool()
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(ids)
        o = ours(inputs_embeds=embeds, attention_mask=mask, labels=ids, return_dict=False, output_hidden_states=True)
        r = ref(inputs_embeds=embeds, attention_mask=mask, labels=ids, return_dict=False, output_hidden_states=True)
    # (loss, logits, past_key_values, hidden_states)
    assert len(o) == len(r) == 4
    torch.testing.assert_close(o[0], r[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(o[1][keep], r[1][keep], atol=ATOL, rtol=0)
    with torch.no_grad():
        base = ours.gpt_neox_japanese(ids, return_dict=False, use_cache=False)
        ref_base = ref.gpt_neox_japanese(ids, return_dict=False, use_cache=False)
    assert len(base) == len(ref_base) == 1
    torch.testing.assert_close(base[0], ref_base[0], atol=ATOL, rtol=0)


def test_logits_to_keep_and_tied_head_and_parameter_count():
    ref, ours = make_pair("rot1-tied")
    ids, _ = make_batch(ref.config.vocab_size, "none")
    with torch.no_grad():
        full = ours(ids).logits
        last = ours(ids, logits_to_keep=1).logits
        flat_positions = ours(ids, position_ids=torch.arange(ids.shape[1])).logits
    assert last.shape == (3, 1, ref.config.vocab_size)
    # the head's product runs over 3 rows instead of 3 x T: equal up to the kernel's row-count-dependent rounding
    # (MKL picks its algorithm by the row count; bit-equality held on some CPUs, not on an AVX2 EPYC)
    torch.testing.assert_close(last, full[:, -1:], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(flat_positions, full, atol=0, rtol=0)
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    assert ours.num_parameters() == ref.num_parameters()
    _, untied = make_pair("rot025-untied-3heads")
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight


def test_head_mask_switches_heads_off():
    """transformers 5 dropped head_mask, so it is checked against an equivalent weight edit: zeroing head h's
    probabilities in layer l equals zeroing the columns of that layer's output projection that read head h."""
    _, ours = make_pair("rot025-untied-3heads")
    cfg = ours.config
    ids, mask = make_batch(cfg.vocab_size, "right")
    head_mask = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads)
    head_mask[1, 2] = 0.0
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask).logits
        ones = ours(ids, attention_mask=mask, head_mask=torch.ones(cfg.num_attention_heads)).logits
        masked = ours(ids, attention_mask=mask, head_mask=head_mask, output_attentions=True)
        edited = GPTNeoXJapaneseForCausalLM(cfg).eval()
        edited.load_state_dict(ours.state_dict())
        hs = cfg.head_size
        edited.gpt_neox_japanese.layers[1].attention.dense.weight[:, 2 * hs: 3 * hs] = 0
        expected = edited(ids, attention_mask=mask).logits
    torch.testing.assert_close(ones, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(masked.logits, expected, atol=ATOL, rtol=0)
    assert (masked.logits - plain).abs().max() > 1e-3
    assert masked.attentions[1][:, 2].abs().max() == 0
    with pytest.raises(ValueError, match="head_mask"):
        ours(ids, head_mask=torch.ones(5))


def test_training_mode_dropout_and_gradients():
    _, ours = make_pair("rot1-tied")
    ids, mask = make_batch(ours.config.vocab_size, "none")
    ours.train()
    a = ours(ids, labels=ids).loss
    b = ours(ids, labels=ids).loss
    assert a != b  # attention dropout 0.1 is active in training
    a.backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ours.eval()
    with torch.no_grad():
        assert ours(ids, labels=ids).loss == ours(ids, labels=ids).loss


def test_bad_inputs_raise_clear_errors():
    _, ours = make_pair("rot1-tied")
    V = ours.config.vocab_size
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="exactly one"):
        ours()
    with pytest.raises(ValueError, match="outside"):
        ours(torch.full((1, 3), V))
    with pytest.raises(TypeError, match="integer"):
        ours(ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        ours(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ours(ids, labels=torch.full((2, 5), -5))
    with pytest.raises(ValueError, match="past_key_values"):
        ours(ids, past_key_values=((torch.zeros(1), torch.zeros(1)),))
    with pytest.raises(ValueError, match="empty"):
        ours(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids"):
        ours(ids, position_ids=torch.arange(4))
    with pytest.raises(TypeError, match="GPTNeoXJapaneseConfig"):
        GPTNeoXJapaneseModel({"hidden_size": 8})


def test_every_integer_dtype_the_checks_accept_works():
    """input_ids and labels pass the checks in any integer dtype, and then give the int64 results."""
    _, ours = make_pair("rot1-tied")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(ids, labels=ids)
        for dtype in (torch.int32, torch.int16, torch.uint8, torch.int8):
            got = ours(ids.to(dtype), labels=ids.to(dtype))
            torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
            torch.testing.assert_close(got.loss, want.loss, atol=0, rtol=0)
