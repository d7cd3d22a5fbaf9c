"""generate() against transformers' generate() on random-init models, and its contract on its own."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import transformers

from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.streaming import TextIteratorStreamer, TextStreamer

BOS, EOS = 1, 2

CONFIGS = {
    "base": dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "rotary-quarter-untied-odd-heads": dict(vocab_size=61, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                             rotary_pct=0.25, tie_word_embeddings=False, rotary_emb_base=500),
    "one-layer-wide-heads": dict(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_multiple_size=2, tie_word_embeddings=False),
}


def make_pair(name: str, std: float = 0.5, **overrides):
    """Our model and transformers' with the same weights. A large init std makes logits of order 10-100
    with the top two far apart, so float rounding cannot decide a greedy tie."""
    kw = dict(CONFIGS[name], bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=64, **overrides)
    torch.manual_seed(sum(map(ord, name)))
    ours = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**kw)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
            else:
                p.normal_(0.0, 0.1)  # LayerNorm and the last layer's dense_bias: not the trivial init
    ref = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**kw)).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), EOS, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def hf_generate(ref, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", EOS)
    return ref.generate(ids, attention_mask=mask, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers_with_left_padding(name):
    ours, ref = make_pair(name)
    ids, mask = left_padded_batch(ours.config.vocab_size, [7, 4, 1, 6], seed=1)
    # the premise: the reference's top-two logits are far apart at every step
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=EOS,
                           output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack(out.logits).topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3

    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, out.sequences)
    # max_length counts the prompt, as in transformers
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=15), hf_generate(ref, ids, mask, max_length=15))


@pytest.mark.parametrize("name", ["base", "rotary-quarter-untied-odd-heads"])
def test_each_row_of_a_greedy_batch_equals_generating_it_alone(name):
    ours, _ = make_pair(name)
    lengths = [5, 2, 8]
    ids, mask = left_padded_batch(ours.config.vocab_size, lengths, seed=2)
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=10)
    for row, n in enumerate(lengths):
        alone = ours.generate(ids[row:row + 1, -n:], max_new_tokens=10)
        assert torch.equal(batch[row, -(n + 10):], alone[0])


def test_a_padded_row_with_no_repeat_ngram_equals_that_prompt_alone():
    """transformers lets n-grams of the left padding ban tokens; here a row sees only its own text."""
    ours, _ = make_pair("base")
    prompt = torch.tensor([[10, 11, 12]])
    kw = dict(max_new_tokens=6, no_repeat_ngram_size=1)
    first = int(ours.generate(prompt, **kw)[0, 3])  # padding made of this token would ban it
    alone = ours.generate(prompt, pad_token_id=first, **kw)
    ids = torch.tensor([[first, first, 10, 11, 12], [20, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batch = ours.generate(ids, attention_mask=mask, pad_token_id=first, **kw)
    assert torch.equal(batch[0, 2:], alone[0])


def test_each_row_stops_at_max_position_embeddings_as_it_would_alone():
    """The limit is on a row's positions, not on the padded width: a short prompt batched with a long one
    still gets all its new tokens."""
    ours, _ = make_pair("base")  # max_position_embeddings=64
    lengths = [60, 3]
    ids, mask = left_padded_batch(97, lengths, seed=10)
    with pytest.warns(UserWarning, match="max_position_embeddings") as caught:
        batch = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=EOS)
    assert caught[0].filename == __file__  # the warning points at the caller
    assert batch.shape == (2, 70)
    assert bool((batch[0, 64:] == EOS).all())  # row 0 reached 64 tokens and is padded from there
    for row, n in enumerate(lengths):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = ours.generate(ids[row:row + 1, -n:], max_new_tokens=10, eos_token_id=[])
        assert alone.shape[1] == min(n + 10, 64)
        assert torch.equal(batch[row, 60 - n: 60 - n + alone.shape[1]], alone[0])


def test_min_new_tokens_with_an_eos_id_outside_the_vocabulary():
    """An EOS id that is no token (500 > vocab 97) can never be generated: ignored, as transformers does."""
    ours, ref = make_pair("base")
    ids, mask = left_padded_batch(97, [4, 2], seed=11)
    kw = dict(max_new_tokens=6, min_new_tokens=3, eos_token_id=[EOS, 500])
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), hf_generate(ref, ids, mask, **kw))


def test_greedy_with_repetition_processors_equals_transformers():
    ours, ref = make_pair("base", std=0.3)
    ids, mask = left_padded_batch(97, [6, 3], seed=3)
    kw = dict(max_new_tokens=16, repetition_penalty=1.7, no_repeat_ngram_size=2, min_new_tokens=5)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), hf_generate(ref, ids, mask, **kw))


def test_finished_rows_are_padded_and_generation_stops_when_all_are_done():
    ours, ref = make_pair("base")
    ids, mask = left_padded_batch(97, [5, 5, 3], seed=4)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=20)
    # make the token that row 0 produces at step 3 the EOS: row 0 stops there, the others go on
    eos = int(free[0, ids.shape[1] + 3])
    pad = 0
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
    want = hf_generate(ref, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(got, want)
    first_eos = (got[0, ids.shape[1]:] == eos).nonzero()[0, 0]
    assert bool((got[0, ids.shape[1] + first_eos + 1:] == pad).all())
    # a list of EOS ids, every row finishing early: the output is shorter than the limit
    eos_ids = sorted({int(t) for t in free[:, ids.shape[1] + 2]})
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos_ids)
    assert got.shape[1] < ids.shape[1] + 20
    assert torch.equal(got, hf_generate(ref, ids, mask, max_new_tokens=20, eos_token_id=eos_ids))


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(top_k=5, temperature=1.3), dict(top_p=0.6, top_k=0),
                                dict(top_k=20, top_p=0.9, repetition_penalty=1.2)])
def test_sampling_draws_what_transformers_draws(kw):
    """Same processed distribution + the same global RNG stream => the same sampled tokens. A moderate
    init keeps the distributions wide so that the test samples for real. top_k=None means transformers'
    default of 50 (which cuts this 97-token vocab), top_k=0 none."""
    ours, ref = make_pair("base", std=0.08)
    ids, mask = left_padded_batch(97, [4, 6], seed=5)
    torch.manual_seed(123)
    want = hf_generate(ref, ids, mask, max_new_tokens=12, do_sample=True, **kw)
    torch.manual_seed(123)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **kw)
    assert torch.equal(got, want)
    # ... and it is really sampling: the greedy continuation differs
    assert not torch.equal(got, ours.generate(ids, attention_mask=mask, max_new_tokens=12))


def test_seeded_generator_reproduces_and_num_return_sequences():
    ours, _ = make_pair("base", std=0.08)
    ids, mask = left_padded_batch(97, [3, 5], seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, num_return_sequences=3)
    a = ours.generate(ids, generator=torch.Generator().manual_seed(9), **kw)
    b = ours.generate(ids, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a, b)
    assert a.shape == (6, ids.shape[1] + 10)
    assert torch.equal(a[:3, :ids.shape[1]], ids[:1].expand(3, -1))  # rows of one prompt stay together
    assert len({tuple(r) for r in a[:3].tolist()}) > 1  # and differ from each other
    c = ours.generate(ids, generator=torch.Generator().manual_seed(10), **kw)
    assert not torch.equal(a, c)


def test_kv_cache_is_allocated_once_and_each_step_feeds_only_the_new_token(monkeypatch):
    """Each row is prefilled into its own slot from position 0 (no padding in the cache); each step then
    feeds one token per row at that row's own position."""
    ours, _ = make_pair("base")
    ids, mask = left_padded_batch(97, [6, 4], seed=7)
    setups, calls = [], []
    real_setup, real_forward = ours.setup_caches, ours.forward_cached
    monkeypatch.setattr(ours, "setup_caches", lambda **kw: (setups.append(kw), real_setup(**kw))[1])

    def forward_cached(input_ids, input_pos, first_row=0, kv_length=None, last_only=True):
        calls.append((input_ids.tolist(), input_pos.tolist(), first_row))
        return real_forward(input_ids, input_pos, first_row, kv_length, last_only)

    monkeypatch.setattr(ours, "forward_cached", forward_cached)
    ours.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    assert setups == [dict(max_batch_size=2, max_seq_length=6 + 5)]
    # prefill: row 0 into slot 0, row 1 without its padding into slot 1, both from position 0
    assert calls[0] == (ids[:1].tolist(), [list(range(6))], 0)
    assert calls[1] == (ids[1:, 2:].tolist(), [list(range(4))], 1)
    steps = calls[2:]
    assert len(steps) == 4  # one per new token, none after the last
    assert all(len(c[0]) == 2 and len(c[0][0]) == 1 and c[2] == 0 for c in steps)
    assert [c[1] for c in steps] == [[[6], [4]], [[7], [5]], [[8], [6]], [[9], [7]]]
    assert ours.gpt_neox_japanese.layers[0].attention.kv_cache is None  # released afterwards


# ---- stop strings and streaming, with a toy tokenizer: token i is one character ----

class CharTokenizer:
    def __init__(self, vocab: int):
        self.chars = [chr(0x3041 + i) for i in range(vocab)]  # hiragana and beyond: one char per token

    def decode(self, ids, skip_special_tokens=False):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids if not (skip_special_tokens and i in (BOS, EOS)))


def test_stop_strings_end_rows_and_include_the_stop_string():
    ours, _ = make_pair("base")
    tok = CharTokenizer(97)
    ids, mask = left_padded_batch(97, [4, 4], seed=8)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=15)
    start = ids.shape[1]
    text0 = tok.decode(free[0, start:])
    stop = text0[4:6]  # two characters that row 0 produces at steps 4-5
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=15, stop_strings=[stop], tokenizer=tok)
    new0 = tok.decode(got[0, start:])
    cut = text0.find(stop) + len(stop)
    assert new0.startswith(text0[:cut])
    assert bool((got[0, start + cut:] == EOS).all())  # padded after the stop string
    text1 = tok.decode(free[1, start:])
    if stop not in text1:
        if got.shape[1] - start < 15:  # row 1 did not stop, so the generation ran to the end
            pytest.fail("generation ended while row 1 was unfinished")
        assert torch.equal(got[1], free[1])
    # a stop string inside the prompt does not count
    prompt_text = tok.decode(ids[0, -2:])
    got = ours.generate(ids[:1, -4:], max_new_tokens=6, stop_strings=prompt_text, tokenizer=tok)
    assert got.shape[1] == 4 + 6 or prompt_text in tok.decode(got[0, 4:])
    # one that begins in the prompt and ends in the new text does, as in transformers; in a padded
    # batch too (the padding is no text)
    across = tok.decode(ids[0, -1:]) + text0[0]
    assert across not in tok.decode(ids[0])
    padded = torch.cat([torch.cat([torch.full((1, 2), EOS), ids[:1]], dim=1), torch.randint(3, 97, (1, 6))])
    padded_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for batch_ids, batch_mask in ((ids, mask), (padded, padded_mask)):
        width = batch_ids.shape[1]
        got = ours.generate(batch_ids, attention_mask=batch_mask, max_new_tokens=15, stop_strings=[across],
                            tokenizer=tok)
        assert got[0, width] == free[0, start]
        assert bool((got[0, width + 1:] == EOS).all())  # row 0 stopped after its first new token
    through_padding = tok.decode([EOS]) + tok.decode(ids[0]) + text0[0]  # would need the padding as text
    got = ours.generate(padded, attention_mask=padded_mask, max_new_tokens=15, stop_strings=[through_padding],
                        tokenizer=tok)
    assert torch.equal(got[0, 6:], free[0, start:])  # row 0 did not stop


def test_generate_streams_to_a_streamer():
    ours, _ = make_pair("base")
    tok = CharTokenizer(97)
    ids = torch.tensor([[5, 6, 7]])
    pieces = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            pieces.append((text, stream_end))

    out = ours.generate(ids, max_new_tokens=8, streamer=Collect(tok, skip_prompt=True))
    assert "".join(p for p, _ in pieces) == tok.decode(out[0, 3:])
    assert pieces[-1][1] is True and sum(end for _, end in pieces) == 1

    streamer = TextIteratorStreamer(tok, timeout=30)
    thread = threading.Thread(target=ours.generate, args=(ids,), kwargs=dict(max_new_tokens=8, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tok.decode(out[0])  # with the prompt

    with pytest.raises(ValueError, match="one sequence"):
        ours.generate(torch.tensor([[5, 6], [7, 8]]), max_new_tokens=2, streamer=Collect(tok))


# ---- lengths, limits and bad input ----

def test_empty_prompt_starts_from_bos():
    ours, ref = make_pair("base")
    out = ours.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=6)
    assert out[0, 0] == BOS
    assert torch.equal(out, hf_generate(ref, torch.tensor([[BOS]]), max_new_tokens=6))
    assert torch.equal(ours.generate(max_new_tokens=6), out)  # no input_ids at all
    # an all-padding row in a batch starts from BOS too, and equals that row alone
    ids, mask = left_padded_batch(97, [3, 0], seed=9)
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(batch[1, -7:], out[0])


def test_length_limits():
    ours, ref = make_pair("base")  # max_position_embeddings=64
    ids = torch.randint(3, 97, (1, 60))
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        out = ours.generate(ids, max_new_tokens=10)
    assert out.shape == (1, 64)
    assert torch.equal(out, hf_generate(ref, ids, max_new_tokens=4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(torch.randint(3, 97, (1, 65)), max_new_tokens=1)
    with pytest.warns(UserWarning, match="no room"):
        assert torch.equal(ours.generate(ids[:, :5], max_length=5), ids[:, :5])
    assert torch.equal(ours.generate(ids[:, :5], max_new_tokens=0), ids[:, :5])
    # neither length given: transformers' default max_length of 20
    assert ours.generate(ids[:, :5]).shape == (1, 20)
    # max_new_tokens wins over max_length, as in transformers
    assert ours.generate(ids[:, :5], max_length=7, max_new_tokens=3).shape == (1, 8)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True, temperature=0.0),
        dict(do_sample=True, temperature=-0.5),
        dict(do_sample=True, top_p=0.0),
        dict(do_sample=True, top_p=1.01),
        dict(top_p=-1.0),
        dict(top_k=-1),
        dict(num_return_sequences=0),
        dict(num_return_sequences=2),  # greedy would give the same sequence twice
        dict(max_new_tokens=-1),
        dict(max_length=0, max_new_tokens=None),
        dict(min_new_tokens=-1),
        dict(repetition_penalty=0.0),
        dict(stop_strings=["x"]),  # no tokenizer
        dict(eos_token_id="2"),
        dict(attention_mask=torch.tensor([[1, 1, 0]])),  # right padding
        dict(pad_token_id=7),  # right padding found without a mask: input_ids end in the pad id
        dict(attention_mask=torch.tensor([[1, 1]])),  # wrong shape
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    ours, _ = make_pair("base")
    with pytest.raises(ValueError):
        ours.generate(torch.tensor([[5, 6, 7]]), **{"max_new_tokens": 2, **kwargs})


def test_bad_input_ids():
    ours, _ = make_pair("base")
    with pytest.raises(ValueError, match="vocabulary"):
        ours.generate(torch.tensor([[5, 97]]), max_new_tokens=1)
    with pytest.raises(TypeError):
        ours.generate(torch.tensor([[5.0, 6.0]]), max_new_tokens=1)
    with pytest.raises(ValueError):
        ours.generate(torch.zeros(1, 2, 3, dtype=torch.long), max_new_tokens=1)
    # transformers' name for the prompt, `inputs`, works too
    assert torch.equal(ours.generate(inputs=torch.tensor([[5, 6]]), max_new_tokens=2),
                       ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2))
    with pytest.raises(ValueError, match="not both"):
        ours.generate(torch.tensor([[5, 6]]), inputs=torch.tensor([[5, 6]]), max_new_tokens=1)
    # lists are accepted, and the output is an ordinary tensor (usable with autograd and in place)
    out = ours.generate([5, 6, 7], max_new_tokens=2)
    assert out.shape == (1, 5) and out.dtype == torch.long
    out[0, 0] = 4


def test_temperature_is_not_checked_for_greedy_decoding():
    ours, _ = make_pair("base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2, temperature=0.0)


def test_bfloat16_generation_runs_and_mostly_agrees():
    ours, _ = make_pair("base")
    ids, mask = left_padded_batch(97, [6, 3], seed=10)
    want = ours.generate(ids, attention_mask=mask, max_new_tokens=4)
    got = ours.to(torch.bfloat16).generate(ids, attention_mask=mask, max_new_tokens=4)
    assert got.dtype == torch.long and got.shape == want.shape
    # the first new token of each row: logits are far apart, bf16 rounding cannot flip them
    assert torch.equal(got[:, ids.shape[1]], want[:, ids.shape[1]])


@pytest.mark.parametrize("per_call", [3, 8])
def test_several_steps_per_call_give_what_one_step_per_call_gives(monkeypatch, per_call):
    """On a small model generate() runs STEPS_PER_CALL decode steps per call (generation.decode_steps), then
    streams and checks stop strings on the call's tokens one by one. Against one step per call, eagerly:
    a stop string met inside a call and an EOS later in the same call (the row ends at the stop string), a
    streamer (the same tokens, up to the EOS), a row of a batch stopped by a stop string while the other runs on
    (its later columns padding), and a seeded sampled call (the same output; where the generator is left may
    differ, as the "all finished?" check comes at other steps: compiled and eager share the cadence,
    tests/test_compile.py)."""
    from neoxja import generation

    class Chars:  # a tokenizer for the stop strings: one character per id
        def decode(self, ids, **kwargs):
            return "".join(chr(0x4E00 + i) for i in ids)

    class Recorder:
        def __init__(self):
            self.got = []

        def put(self, value):
            self.got.append(value.flatten().tolist())

        def end(self):
            self.got.append("end")

    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
        eos_token_id=None, bos_token_id=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    x = torch.tensor([[7, 3, 3, 8, 2, 4]])
    base = dict(max_new_tokens=20, no_repeat_ngram_size=1, pad_token_id=0)  # no token twice: unique stop strings

    def both(fn):
        results = []
        for steps in (1, per_call):
            monkeypatch.setattr(generation, "STEPS_PER_CALL", steps)
            results.append(fn())
        assert results[0] == results[1]
        return results[0]

    free = model.generate(x, eos_token_id=[], **base)[0, 6:].tolist()
    at = per_call + 1  # the first token of the second call (the first call starts after the prefill's token)
    kw = dict(base, eos_token_id=free[at + 1], stop_strings=[Chars().decode([free[at]])], tokenizer=Chars())
    out = both(lambda: model.generate(x, **kw).tolist())
    assert out[0][6:] == free[:at + 1]  # ended at the stop string, not at the EOS after it
    streamed = both(lambda: (lambda r: (model.generate(x, streamer=r, eos_token_id=free[at + 1], **base), r.got)[1])(
        Recorder()))
    assert streamed[1:-1] == [[t] for t in free[:at + 2]] and streamed[-1] == "end"  # prompt, new up to EOS, end
    batch = torch.tensor([[7, 3, 3, 8, 2, 4], [35, 14, 47, 61, 38, 54]])
    other = model.generate(batch, eos_token_id=[], **base)[1].tolist()
    stop = Chars().decode(free[at - 1:at + 1])  # two tokens: not in the other row's text
    assert stop not in Chars().decode(other)
    rows = both(lambda: model.generate(batch, eos_token_id=[], stop_strings=[stop], tokenizer=Chars(),
                                       **base).tolist())
    assert rows[0][6:] == free[:at + 1] + [0] * (20 - at - 1) and rows[1] == other
    sample = dict(max_new_tokens=20, do_sample=True, eos_token_id=free[3], pad_token_id=0)

    both(lambda: model.generate(x, generator=torch.Generator().manual_seed(1), **sample).tolist())
