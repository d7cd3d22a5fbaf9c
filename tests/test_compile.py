"""The compiled decode step (torch.compile, CPU inductor): the same tokens as the eager one, in generate() and in
the serving engine. Compiling takes seconds, so one model is compiled once for the whole module."""

from __future__ import annotations

import pytest
import torch

from neoxja.batch_invariant import make_batch_invariant
from neoxja.generation import compile_decode
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.sampling import SamplingParams
from neoxja.serving.engine import Engine, Request
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer


@pytest.fixture(scope="module")
def bundled(bundled_dir):
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    return model, GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)


def test_generate_compiled_equals_eager(bundled):
    model, tok = bundled
    prompts = [tok.encode("吾輩は猫である。"), tok.encode("国境の長いトンネルを抜けると")]
    for ids in prompts:
        x = torch.tensor([ids])
        eager = model.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=[])
        compiled = model.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=[], compile=True)
        assert torch.equal(eager, compiled)
    assert compile_decode(model) is compile_decode(model)  # compiled once, cached on the model


def test_engine_compiled_equals_eager(bundled):
    """The same greedy tokens (and seeded draws) with the compiled step. Not bit-for-bit: inductor fuses the
    small ops (layer norm, softmax, GELU) into its own kernels, so the compiled step's logits differ from the
    eager ones in the last bits (docs/serving.md: --compile gives up bitwise batch invariance)."""
    model, tok = bundled
    model = make_batch_invariant(model)
    texts = ("メロスは激怒した。", "春はあけぼの。", "山路を登りながら、", "ある日の暮方の事である。")
    jobs = [(tok.encode(t), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for t in texts[:3]]
    jobs.append((tok.encode(texts[3]), SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)))

    def run(compile):
        engine = Engine(model, tok, max_num_seqs=4, compile=compile)
        got = {}
        for i, (ids, params) in enumerate(jobs):  # all admitted at once: every decode step has the same shape
            engine.add_request(Request(str(i), ids, params, lambda out, i=i: got.setdefault(i, []).extend(out.token_ids)))
        while engine.has_work():
            engine.step()
        engine.close()
        return got

    assert run(compile=True) == run(compile=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_decomposes_small_products_and_keeps_the_numbers(bundled_dir, dtype):
    """compile_decode's inductor options turn each one-row product with a weight of at most 2048 x 2048 into
    a fused multiply-and-sum (generation.DECODE_COMPILE_OPTIONS): the counter shows it ran, and the logits
    stay as close to float32's as the eager step's are (float32: 1e-4; bfloat16: within 1.5x the eager
    bfloat16 step's largest difference, measured 0.0378 vs 0.0371)."""
    from torch._dynamo.utils import counters

    from neoxja.generation import decode_one_token, prefill_chunks

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    ids = torch.tensor([tok.encode("吾輩は猫である。名前はまだ無い。")])
    tokens, positions = torch.tensor([17]), torch.tensor([ids.shape[1]])

    def step_logits(model_dtype, compiled):
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=model_dtype).eval()
        model.setup_caches(max_batch_size=1, max_seq_length=64)
        with torch.no_grad():
            prefill_chunks(model, ids, 0)
            step = compile_decode(model) if compiled else decode_one_token
            return step(model, tokens, positions).float()

    reference = step_logits(torch.float32, compiled=False)
    before = counters["inductor"]["decompose_mm"]
    compiled = step_logits(dtype, compiled=True)
    assert counters["inductor"]["decompose_mm"] > before
    error = (compiled - reference).abs().max().item()
    if dtype == torch.float32:
        assert error < 1e-4
    else:
        assert error <= 1.5 * (step_logits(dtype, compiled=False) - reference).abs().max().item()


def test_int8_step_compiles_whole_and_gives_the_eager_tokens(bundled_dir):
    """Int8DynamicLinear under torch.compile goes through the custom op neoxja::int8_dynamic_linear: the
    decode step is one graph (dynamo could not trace FBGEMM's packed-weight object and broke the graph at
    every layer) and its greedy tokens equal eager int8's."""
    import copy

    import torch._dynamo

    from neoxja.quantization import quantize

    model = quantize(GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval(), "int8")
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    x = torch.tensor([tok.encode("吾輩は猫である。")])
    eager = model.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=[])
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=[], compile=True)
    assert torch.equal(eager, compiled)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    # a copy names its own packed weights: it still computes after the original is gone
    twin = copy.deepcopy(model)
    del model
    import gc

    gc.collect()
    assert torch.equal(twin.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=[], compile=True), eager)
