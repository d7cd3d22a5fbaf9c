"""`make bench` enforces only live goals (issue 14, item 16): the float32 >= 1.15x goal of issue 4 is retired."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_generate.py"


def test_the_retired_float32_goal_is_not_enforced():
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # defines functions and constants only
    pairs = {(num, den) for num, den, _ in bench.LIVE_GOALS.values()}
    assert ("neoxja float32 batch 1", "transformers float32 batch 1") not in pairs
    assert ("neoxja int8 batch 1", "transformers float32 batch 1") in pairs  # int8 >= 3x is live


def _engine_worker():
    path = BENCH.parent / "_engine_worker.py"
    spec = importlib.util.spec_from_file_location("_engine_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_worker_runs_ctranslate2_in_its_own_process(bundled_dir, tmp_path):
    """The benchmarks' contender engines run in a worker process (benchmarks/_engine_worker.py): its greedy
    tokens equal CTranslate2's in this process; a spec it cannot load is a clear error, and the worker is gone."""
    import pytest

    ctranslate2 = pytest.importorskip("ctranslate2")
    import neoxja
    from neoxja.engines import ctranslate2_tokens

    out = neoxja.export(str(bundled_dir), str(tmp_path / "ct2"), to="ctranslate2")
    tokens = ctranslate2_tokens(list(range(100, 116)), out)
    worker_module = _engine_worker()
    spec = {"engine": "ctranslate2", "path": str(out), "compute_type": "float32", "threads": 1, "tokens": tokens,
            "new": 8}
    with worker_module.EngineProcess(spec) as worker:
        got, seconds = worker.generate()
        assert worker.generate()[0] == got and seconds > 0
    assert worker.proc.poll() == 0  # stopped when the block ends
    here = ctranslate2.Generator(str(out), device="cpu", compute_type="float32", intra_threads=1)
    expected = here.generate_batch([tokens], max_length=8, sampling_topk=1, include_prompt_in_result=False,
                                   end_token=[])[0].sequences_ids[0]
    assert got == expected and len(got) == 8

    with pytest.raises(RuntimeError, match="ctranslate2 worker: .*") as info:
        worker_module.EngineProcess({**spec, "path": str(tmp_path / "missing")})
    assert "missing" in str(info.value)


def test_int4_alternatives_compute_the_product():
    """bench_quant_kernels --int4-alternatives times real products: each is within int4's error of the float
    product (group/block 128: ~0.1 relative), and far from a wrong one (the transposed weight)."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_quant_kernels", BENCH.parent / "bench_quant_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions and constants only
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(1, 512, generator=g)
    ref = x @ w.t()
    for make in (module.int4_nibbles, module.int4_bag):
        product, k = make(w)
        assert k == 512
        y = product(x)
        assert y.shape == (1, 256)
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < 0.15, (make.__name__, err)


def test_bench_engine_quant_runs_the_requests_to_the_end_and_closes_its_engine(monkeypatch):
    """bench_engine_quant.throughput steps an Engine until it has no work left, gives a rate and closes the
    engine, even if a step fails; bad arguments are refused."""
    import argparse

    import pytest
    import torch

    from neoxja.assets import default_model_dir
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.quantization import quantize
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    monkeypatch.syspath_prepend(str(BENCH.parent))  # its `from _cpu import ...`, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_engine_quant", BENCH.parent / "bench_engine_quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only
    model = quantize(GPTNeoXJapaneseForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval(),
                     "int4", group_size=64)
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(default_model_dir())
    args = argparse.Namespace(concurrency=3, prompt_len=5, max_tokens=4)
    engines = []
    init = module.Engine.__init__

    def recording_init(engine, *a, **kw):
        engines.append(engine)
        init(engine, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(module.Engine, "__init__", recording_init)
        closed = []
        close = module.Engine.close
        m.setattr(module.Engine, "close", lambda engine: (closed.append(engine), close(engine))[1])
        assert module.throughput(model, tokenizer, args) > 0
        assert closed == engines[-1:] and not engines[-1].has_work()
        m.setattr(module.Engine, "step", lambda engine: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            module.throughput(model, tokenizer, args)
        assert closed == engines[-2:]
    with pytest.raises(SystemExit):
        module.main(["--concurrency", "0"])
