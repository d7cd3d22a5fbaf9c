"""Logits processors and samplers against transformers' own LogitsProcessor classes."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from neoxja.sampling import (
    apply_logits_processors,
    make_logits_processors,
    make_sampler,
    min_new_tokens_processor,
    no_repeat_ngram_processor,
    repetition_penalty_processor,
    top_k_processor,
    top_p_processor,
    vocab_limit_processor,
)


def hf_processors(*, do_sample, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, min_new_tokens=0, prompt_length=0, eos=(), padding_lengths=None):
    """transformers' list, assembled the way GenerationMixin._get_logits_processor does it."""
    procs = hf.LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(hf.RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=padding_lengths))
    if no_repeat_ngram_size:
        procs.append(hf.NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if min_new_tokens:
        procs.append(hf.MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, list(eos)))
    if do_sample:
        if temperature != 1.0:
            procs.append(hf.TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(hf.TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(hf.TopPLogitsWarper(top_p))
    return procs


SETTINGS = [
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=False, repetition_penalty=0.7, no_repeat_ngram_size=2),
    dict(do_sample=False, no_repeat_ngram_size=3, min_new_tokens=4, prompt_length=5, eos=(7,)),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, temperature=1.3, top_k=5),
    dict(do_sample=True, top_p=0.8),
    dict(do_sample=True, temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=2),
    dict(do_sample=True, top_k=1),
    dict(do_sample=True, top_p=1e-6),
    dict(do_sample=True, top_k=50, top_p=1.0, temperature=2.0, min_new_tokens=2, prompt_length=6, eos=(0, 3)),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("vocab", [13, 300])
def test_processed_logits_equal_transformers(setting, vocab):
    g = torch.Generator().manual_seed(vocab)
    batch, length = 3, 9
    # a small id range forces repeats, so the n-gram and repetition processors have work to do
    input_ids = torch.randint(0, min(vocab, 6), (batch, length), generator=g)
    padding_lengths = torch.tensor([0, 2, 4])
    for step in range(3):  # several steps, as during generation
        logits = torch.randn(batch, vocab, generator=g) * 3
        ours_kw = dict(setting)
        eos = ours_kw.pop("eos", ())
        ours = make_logits_processors(eos_token_ids=eos, padding_lengths=padding_lengths, **ours_kw)
        ref = hf_processors(padding_lengths=padding_lengths, eos=eos, **ours_kw)
        # intended deviation: n-grams that reach into the left padding ban nothing here, while transformers
        # counts them; ids that occur nowhere else in the padding make transformers' view equal ours
        ref_ids = input_ids.clone()
        for row, pad in enumerate(padding_lengths.tolist()):
            ref_ids[row, :pad] = 6 + torch.arange(pad)
        expected = ref(ref_ids, logits.clone())
        got = apply_logits_processors(ours, input_ids, logits.clone())
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        input_ids = torch.cat([input_ids, torch.randint(0, min(vocab, 6), (batch, 1), generator=g)], dim=1)


def test_no_repeat_ngram_ignores_left_padding_where_transformers_does_not():
    """A left-padded row must see the n-grams of its own text only, so that it equals that prompt alone."""
    padded = torch.tensor([[4, 4, 5, 4]])  # two padding positions (4, 4), then the text 5 4
    logits = torch.zeros(1, 8)
    ours = make_logits_processors(no_repeat_ngram_size=2, padding_lengths=torch.tensor([2]))
    got = apply_logits_processors(ours, padded, logits.clone())
    alone = apply_logits_processors(make_logits_processors(no_repeat_ngram_size=2), padded[:, 2:], logits.clone())
    assert torch.equal(got, alone) and bool(torch.isfinite(got).all())  # the text 5 4 repeats no bigram
    expected_by_transformers = hf.NoRepeatNGramLogitsProcessor(2)(padded, logits.clone())
    assert expected_by_transformers[0, 4] == float("-inf")  # transformers bans 4: the padding bigram (4, 4)


def test_individual_processors_match():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (2, 12), generator=g)
    logits = torch.randn(2, 20, generator=g)
    pairs = [
        (repetition_penalty_processor(1.5), hf.RepetitionPenaltyLogitsProcessor(1.5)),
        (no_repeat_ngram_processor(1), hf.NoRepeatNGramLogitsProcessor(1)),
        (no_repeat_ngram_processor(4), hf.NoRepeatNGramLogitsProcessor(4)),
        (top_k_processor(3), hf.TopKLogitsWarper(3)),
        (top_k_processor(100), hf.TopKLogitsWarper(100)),
        (top_p_processor(0.5), hf.TopPLogitsWarper(0.5)),
        (min_new_tokens_processor(10, 3, [1]), hf.MinNewTokensLengthLogitsProcessor(10, 3, [1])),
    ]
    for ours, ref in pairs:
        torch.testing.assert_close(ours(ids, logits.clone()), ref(ids, logits.clone()), rtol=0, atol=0)


def test_processors_do_not_modify_their_input():
    ids = torch.tensor([[1, 2, 1, 2]])
    logits = torch.randn(1, 5)
    before = logits.clone()
    procs = make_logits_processors(do_sample=True, temperature=0.5, top_k=2, top_p=0.5, repetition_penalty=2.0,
                                   no_repeat_ngram_size=2, min_new_tokens=3, prompt_length=4, eos_token_ids=[0])
    apply_logits_processors(procs, ids, logits)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True, temperature=0.0),
        dict(do_sample=True, temperature=-1.0),
        dict(do_sample=True, temperature=None),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=-0.1),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(repetition_penalty=0.0),
        dict(no_repeat_ngram_size=-2),
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        make_logits_processors(**kwargs)


def test_greedy_ignores_warpers():
    # temperature 0 is fine for greedy decoding: warpers are not applied at all (as in transformers)
    assert make_logits_processors(do_sample=False, temperature=1.0, top_k=3, top_p=0.5) == []


@pytest.mark.parametrize(
    "setting",
    [dict(temperature=1.0), dict(temperature=0.6, top_k=4), dict(temperature=1.5, top_p=0.7), dict(top_k=5, top_p=0.9)],
)
def test_sampling_statistics_match_transformers_distribution(setting):
    """On a tiny vocab, the empirical frequencies of our sampler match the distribution transformers
    samples from (softmax of its processed logits), by a chi-square test; filtered tokens never appear."""
    vocab, draws = 8, 40_000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    ids = torch.zeros(1, 1, dtype=torch.long)
    ref = hf_processors(do_sample=True, **setting)
    expected = torch.softmax(ref(ids, logits.clone()), dim=-1)[0].double()

    procs = make_logits_processors(do_sample=True, **setting)
    sampler = make_sampler(True, torch.Generator().manual_seed(1234))
    processed = apply_logits_processors(procs, ids.expand(draws, 1), logits.expand(draws, vocab))
    counts = torch.bincount(sampler(processed), minlength=vocab).double()

    assert counts[expected == 0].sum() == 0, "a filtered token was sampled"
    support = expected > 0
    observed, wanted = counts[support], expected[support] * draws
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    dof = int(support.sum()) - 1
    # 99.9% quantile of chi-square with <= 7 degrees of freedom is 24.3
    assert chi2 < 24.3, (chi2, dof, observed, wanted)


def test_seeded_generator_reproduces_draws():
    logits = torch.randn(4, 50)
    a = make_sampler(True, torch.Generator().manual_seed(7))(logits)
    b = make_sampler(True, torch.Generator().manual_seed(7))(logits)
    assert torch.equal(a, b)
    assert torch.equal(make_sampler(False)(logits), logits.argmax(-1))


# ---- per-row API: SamplingParams, SamplingBatch, StopRules ----

from neoxja.sampling import (FINISH_LENGTH, FINISH_NONE, FINISH_STOP, History, SamplingBatch,  # noqa: E402
                             SamplingParams, StopRules, make_generator)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(top_k=True), "top_k"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(stop=[""]), "stop"), (dict(stop=[1]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=3), "stop_token_ids"), (dict(ignore_eos=1), "ignore_eos"), (dict(seed=1.0), "seed"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(n=0), "n"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(do_sample=True, temperature=0), "temperature"),
])
def test_sampling_params_refuse_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="\n", stop_token_ids=(5,), max_tokens=None)
    assert p.stop == ["\n"] and p.stop_token_ids == [5] and not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(do_sample=False, temperature=0.7).greedy
    assert not SamplingParams(do_sample=True, temperature=0.7).greedy


def history_of(prompts, outputs, width=12):
    B = len(prompts)
    tokens = torch.zeros(B, width, dtype=torch.long)
    for b, (p, o) in enumerate(zip(prompts, outputs)):
        tokens[b, :len(p) + len(o)] = torch.tensor(p + o)
    return History(tokens, torch.tensor([len(p) for p in prompts]),
                   torch.tensor([len(p) + len(o) for p, o in zip(prompts, outputs)]))


def test_sampling_batch_rows_follow_their_own_params():
    """Per-row processing equals the transformers-order processors applied to that row alone, and the
    OpenAI penalties subtract from the output counts."""
    g = torch.Generator().manual_seed(0)
    V = 30
    logits = torch.randn(4, V, generator=g) * 3
    prompts, outputs = [[1, 2, 3], [4, 4], [5], [6, 7, 8]], [[2, 9], [], [5, 5, 11], [8]]
    params = [SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.3),
              SamplingParams(temperature=0),
              SamplingParams(top_p=0.7, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=1.2, no_repeat_ngram_size=1, min_tokens=3)]
    batch = SamplingBatch(params, eos_token_ids=[0], vocab_limit=28)
    got = batch.process(logits, history_of(prompts, outputs))
    for b, p in enumerate(params):
        ids = torch.tensor([prompts[b] + outputs[b]])
        procs = [vocab_limit_processor(28)] + make_logits_processors(
            do_sample=not p.greedy, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            repetition_penalty=p.repetition_penalty, no_repeat_ngram_size=p.no_repeat_ngram_size,
            min_new_tokens=p.min_tokens, prompt_length=len(prompts[b]), eos_token_ids=[0])
        want = logits[b:b + 1].clone()
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.bincount(torch.tensor(outputs[b], dtype=torch.long), minlength=V).float()
            want = want - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        want = apply_logits_processors(procs, ids, want)
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-6, rtol=0)
    assert got[3, 0] == float("-inf")  # min_tokens forbids EOS in row 3 only
    assert got[1, 0] > float("-inf")


def test_per_row_generators_draw_the_same_alone_and_in_a_batch_and_logprobs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    params = [SamplingParams(seed=7, logprobs=3), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(seed=8, temperature=0.8, top_k=10)]
    hist = history_of([[1], [2], [3]], [[], [], []])
    together = SamplingBatch(params, generators=[make_generator(p.seed) for p in params]).sample(logits, hist)
    for b, p in enumerate(params):
        alone = SamplingBatch([p], generators=[make_generator(p.seed)]).sample(
            logits[b:b + 1], History(hist.tokens[b:b + 1], hist.prompt_end[b:b + 1], hist.end[b:b + 1]))
        assert alone.tokens[0] == together.tokens[b]
    assert together.tokens[1] == logits[1].argmax()
    raw = torch.log_softmax(logits, -1)
    lp = together.logprobs
    assert lp.top_ids.shape == (3, 3)  # the largest N asked; each row keeps its own first N
    assert torch.equal(lp.top_ids[0], raw[0].topk(3).indices)
    torch.testing.assert_close(lp.token, raw.gather(1, together.tokens[:, None])[:, 0])
    processed = SamplingBatch(params, generators=[make_generator(p.seed) for p in params],
                              logprobs_mode="processed").sample(logits, hist)
    assert bool(torch.isinf(processed.logprobs.top[2]).sum() == 0)  # row 2's top 3 lie inside its top-k
    assert not torch.equal(processed.logprobs.token[2], lp.token[2])  # temperature 0.8 changed it
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch(params, generators=[None])


def test_stop_rules():
    params = [SamplingParams(max_tokens=5), SamplingParams(ignore_eos=True, stop_token_ids=[9]),
              SamplingParams(min_tokens=3), SamplingParams(max_tokens=None)]
    rules = StopRules(params, eos_token_ids=[0], max_length=20)
    eos = torch.tensor([0, 0, 0, 0])
    assert rules.check(eos, torch.tensor([1, 1, 1, 1]), torch.tensor([4, 4, 4, 4])).tolist() == \
        [FINISH_STOP, FINISH_NONE, FINISH_NONE, FINISH_STOP]  # ignore_eos; min_tokens not yet out
    assert rules.check(torch.tensor([3, 9, 0, 3]), torch.tensor([5, 2, 3, 7]), torch.tensor([9, 9, 9, 20])).tolist() \
        == [FINISH_LENGTH, FINISH_STOP, FINISH_STOP, FINISH_LENGTH]  # max_tokens; stop id; min out; context full
