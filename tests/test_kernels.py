"""neoxja.kernels: the skinny-product kernel choice, applied from outside the model and measured per machine.

Every kernel must give F.linear's numbers (up to the rounding of a reordered sum); the transform must
not change the model (same Parameters, same state_dict, plain F.linear under autograd); the plan is measured
once per machine, dtype and shape and then read from the cache. Speed itself is benchmarks/' business."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neoxja
from neoxja import kernels
from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.kernels import ROW_GRID, SkinnyLinear, choose_linear_kernels, measure_plan, restore_linear
from neoxja.model import GPTNeoXJapaneseForCausalLM

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=4,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1)


def tiny_model(seed: int = 0) -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def fixed_plan(name: str) -> dict[int, str]:
    return {rows: name for rows in ROW_GRID}


def test_the_model_is_built_from_plain_linear_layers():
    """The kernel choice left model.py: no Linear subclass there, every product is nn.Linear's."""
    import neoxja.model

    assert not hasattr(neoxja.model, "Linear")
    model = tiny_model()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)


@pytest.mark.parametrize("kernel", ["linear", "bmm16", "onednn", "packed", "mv"])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 12, 13, 64, 65])
@pytest.mark.parametrize("out_features,bias", [(48, False), (48, True)])
def test_every_kernel_gives_f_linear_numbers(kernel, rows, out_features, bias):
    if kernel not in kernels.candidates(torch.empty(out_features, 40), pack=True):
        pytest.skip(f"{kernel} is not available in this torch build")
    torch.manual_seed(rows)
    plain = nn.Linear(40, out_features, bias=bias)
    if bias:
        nn.init.normal_(plain.bias)
    layer = SkinnyLinear.from_linear(plain, fixed_plan(kernel))
    assert layer.weight is plain.weight and layer.bias is plain.bias
    x = torch.randn(rows, 3, 40).transpose(0, 1)[:1]  # (1, rows, 40), not contiguous
    expected = F.linear(x, plain.weight, plain.bias)
    calls = []
    real = kernels.KERNELS[kernel]
    kernels.KERNELS[kernel] = lambda *a: (calls.append(1), real(*a))[1]
    try:
        with torch.no_grad():
            got = layer(x)
        with_grad = layer(x)  # autograd: plain F.linear, bit for bit
    finally:
        kernels.KERNELS[kernel] = real
    assert got.shape == (1, rows, out_features)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool(calls) == (kernel != "linear" and rows <= ROW_GRID[-1])  # above the grid: F.linear
    assert with_grad.requires_grad and torch.equal(with_grad, expected)


@pytest.mark.parametrize("kernel", ["onednn", "packed", "bmm16", "mv"])
@pytest.mark.parametrize("rows", [1, 2])
def test_a_planned_layer_compiles(kernel, rows, monkeypatch):
    """Under torch.compile oneDNN's linear on a plain weight is inductor's (its lowering of oneDNN's linear
    asserts a frozen weight, so a plan's oneDNN kernel used to fail `generate(compile=True)` and `neoxja
    generate --compile`), and so are one-row products with small weights (inductor generates them) and several
    rows; a one-row plan's kernel (mv, bmm16, packed: its blocked copy looked up inside) on a larger weight runs
    inside the graph as the opaque op neoxja::skinny_linear."""
    if kernel not in kernels.candidates(torch.empty(48, 40), pack=True):
        pytest.skip(f"{kernel} is not available in this torch build")
    torch.manual_seed(0)
    calls = []
    real = kernels.KERNELS[kernel]
    monkeypatch.setitem(kernels.KERNELS, kernel, lambda *a: (calls.append(1), real(*a))[1])
    for in_features in (40, 2560):  # below and above inductor's bound for generating a one-row product
        layer = SkinnyLinear.from_linear(nn.Linear(in_features, 48), fixed_plan(kernel))
        x = torch.randn(1, rows, in_features)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(layer, fullgraph=True)(x)
        torch.testing.assert_close(compiled, F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
        assert bool(calls) == (in_features > 2048 and rows == 1 and kernel != "onednn")
        calls.clear()


def test_kernel_for_uses_the_grid_point_below():
    plan = {rows: ("onednn" if rows >= 8 else "bmm16" if rows >= 4 else "linear") for rows in ROW_GRID}
    layer = SkinnyLinear.from_linear(nn.Linear(8, 16), plan)
    assert [layer.kernel_for(r) for r in (1, 3, 4, 7, 8, 11, 64, 65, 1000)] == \
        ["linear", "linear", "bmm16", "bmm16", "onednn", "onednn", "onednn", "linear", "linear"]


def test_a_mismatched_dtype_is_refused_as_nn_linear_refuses_it():
    """Inputs of another dtype than the weight take F.linear, which raises the error nn.Linear raises."""
    plain = nn.Linear(8, 16)
    layer = SkinnyLinear.from_linear(plain, fixed_plan("bmm16"))
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError) as ours:
        layer(x)
    with torch.no_grad(), pytest.raises(RuntimeError) as theirs:
        plain(x)
    assert str(ours.value) == str(theirs.value)


def test_transform_keeps_the_model(tmp_path):
    """Same Parameters and state_dict; logits of a batch within rounding; gradients bit for bit."""
    model = tiny_model()
    reference = tiny_model()
    params = {name: p for name, p in model.named_parameters()}
    ids = torch.randint(0, TINY["vocab_size"], (6, 5), generator=torch.Generator().manual_seed(0))
    plan = {rows: "bmm16" for rows in ROW_GRID}
    choose_linear_kernels(model, cache=tmp_path / "k.json")
    skinny = [m for m in model.modules() if isinstance(m, SkinnyLinear)]
    assert len(skinny) == sum(isinstance(m, nn.Linear) for m in reference.modules())
    for m in skinny:
        m.plan = plan  # force the non-default kernel so the check means something
    assert {name: p for name, p in model.named_parameters()} == params  # the very same objects
    assert model.embed_out.weight is model.gpt_neox_japanese.embed_in.weight  # tied, as before
    assert model.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        last = ids[:, -1:]  # (6, 1): six rows per product, the decoding shape
        torch.testing.assert_close(model(last).logits, reference(last).logits, atol=1e-5, rtol=1e-5)
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    restore_linear(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert {name: p for name, p in model.named_parameters()} == params


def test_quantize_and_save_after_the_transform(tmp_path):
    model = choose_linear_kernels(tiny_model(), cache=tmp_path / "k.json")
    model.save_pretrained(tmp_path / "saved")
    again = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    quantized = neoxja.quantize(model, "int8")
    assert not any(isinstance(m, SkinnyLinear) for m in quantized.modules())


def test_plans_are_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_measure(weight, bias, pack=False, working_set=0):
        calls.append(tuple(weight.shape))
        return fixed_plan("bmm16")

    monkeypatch.setattr(kernels, "measure_plan", fake_measure)
    cache = tmp_path / "cache" / "k.json"
    model = choose_linear_kernels(tiny_model(), cache=cache)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)}
    assert sorted(calls) == sorted(shapes)  # once per distinct shape, not per layer
    assert all(m.plan == fixed_plan("bmm16") for m in model.modules() if isinstance(m, SkinnyLinear))
    stored = json.loads(cache.read_text())
    assert len(stored["plans"]) == len(shapes)
    assert all(kernels.machine_key() in key and "|float32|" in key for key in stored["plans"])

    calls.clear()
    choose_linear_kernels(tiny_model(), cache=cache)
    assert calls == []  # read from the cache
    choose_linear_kernels(tiny_model().to(torch.bfloat16), cache=cache)
    assert len(calls) == len(shapes)  # another dtype is another measurement

    threads = torch.get_num_threads()
    calls.clear()
    torch.set_num_threads(threads + 1)  # the timings depend on the thread count: not reused
    try:
        choose_linear_kernels(tiny_model(), cache=cache)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == len(shapes)


@pytest.mark.parametrize("content", ["not json", "[]", '{"version": 1, "plans": {"x": 3}}',
                                     '{"version": 999, "plans": {}}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch, content):
    monkeypatch.setattr(kernels, "measure_plan", lambda weight, bias, pack=False, working_set=0: fixed_plan("linear"))
    cache = tmp_path / "k.json"
    cache.write_text(content)
    choose_linear_kernels(tiny_model(), cache=cache)
    stored = json.loads(cache.read_text())
    assert stored["version"] == kernels.CACHE_VERSION and stored["plans"]
    # a stored entry with a bad row set or kernel name is not trusted either
    key = next(iter(stored["plans"]))
    stored["plans"][key] = {"1": "warp-drive"}
    cache.write_text(json.dumps(stored))
    assert kernels._valid_plan(stored["plans"][key]) is None


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "measure_plan", lambda weight, bias, pack=False, working_set=0: fixed_plan("linear"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    choose_linear_kernels(tiny_model(), cache=blocker / "sub" / "k.json")  # its parent is a file


def test_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXJA_KERNEL_CACHE", str(tmp_path / "x.json"))
    assert kernels.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv("NEOXJA_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.cache_path() == tmp_path / "neoxja" / "linear_kernels.json"


def test_measure_plan_picks_the_fastest_correct_kernel(monkeypatch):
    """A fake clock: each kernel advances it by its cost; a wrong or failing kernel is never chosen."""
    clock = [0.0]
    cost = {"linear": 1.0, "bmm16": 0.5, "onednn": 0.3}

    def timed(name, fn):
        def run(x, w, b):
            clock[0] += cost[name] * (1 if x.shape[0] < 8 else 2 if name == "onednn" else 1)
            return fn(x, w, b)
        return run

    real = dict(kernels.KERNELS)
    monkeypatch.setattr(kernels, "KERNELS", {name: timed(name, fn) for name, fn in real.items()})
    monkeypatch.setattr(kernels, "candidates", lambda w, pack=False: ["linear", "bmm16", "onednn"])
    weight = torch.randn(32, 16)
    plan = measure_plan(weight, timer=lambda: clock[0])
    assert set(plan) == set(ROW_GRID)
    assert all(plan[r] == ("onednn" if r < 8 else "bmm16") for r in ROW_GRID)

    cost["bmm16"] = 0.95  # within 10% of F.linear: not worth a change
    monkeypatch.setitem(kernels.KERNELS, "onednn", lambda x, w, b: (_ for _ in ()).throw(RuntimeError("no")))
    assert measure_plan(weight, timer=lambda: clock[0]) == fixed_plan("linear")

    monkeypatch.setitem(kernels.KERNELS, "onednn", timed("onednn", lambda x, w, b: F.linear(x, w, b) + 1.0))
    assert "onednn" not in measure_plan(weight, timer=lambda: clock[0]).values()  # wrong numbers: refused


def test_one_row_kernels_are_planned_for_one_row_only(monkeypatch):
    """"mv" (torch.mv) takes one row: however fast the clock says it is, it is timed and planned for rows == 1
    only, and a cached plan that names it elsewhere is refused (measured again)."""
    clock = [0.0]
    cost = {"linear": 1.0, "mv": 0.1}
    timed_rows = []

    def timed(name, fn):
        def run(x, w, b):
            if name == "mv":
                timed_rows.append(x.shape[0])
            clock[0] += cost[name]
            return fn(x, w, b)
        return run

    real = dict(kernels.KERNELS)
    monkeypatch.setattr(kernels, "KERNELS", {name: timed(name, fn) for name, fn in real.items()})
    monkeypatch.setattr(kernels, "candidates", lambda w, pack=False: ["linear", "mv"])
    plan = measure_plan(torch.randn(32, 16), timer=lambda: clock[0])
    assert plan == {**fixed_plan("linear"), 1: "mv"}
    assert set(timed_rows) == {1}
    assert kernels._valid_plan({str(r): k for r, k in plan.items()}) == plan
    assert kernels._valid_plan({str(r): "mv" for r in ROW_GRID}) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mv_gives_f_linear_numbers_at_the_27b_width(dtype):
    """torch.mv's reduced-precision gemv against F.linear on one row of the 2.7B width: the same product up
    to the rounding of the sum (what measure_plan checks before it trusts a kernel)."""
    torch.manual_seed(0)
    weight = (torch.randn(512, 2560) * 0.02).to(dtype)
    bias = torch.randn(512).to(dtype)
    x = torch.randn(1, 2560).to(dtype)
    got, expected = kernels.KERNELS["mv"](x, weight, bias), F.linear(x, weight, bias)
    assert got.shape == expected.shape == (1, 512) and got.dtype == dtype
    assert kernels._same_product(got, expected)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), expected.float(), **tol)


def test_measure_plan_on_this_machine_runs_every_kernel():
    """Unmocked: a plan over the whole grid, naming only kernels this build has."""
    weight = torch.randn(64, 32)
    plan = measure_plan(weight, repeats=1)
    assert set(plan) == set(ROW_GRID) and set(plan.values()) <= set(kernels.candidates(weight))


def test_nothing_eligible_is_a_no_op(tmp_path):
    model = neoxja.quantize(tiny_model(), "int8")
    assert choose_linear_kernels(model, cache=tmp_path / "k.json") is model
    assert not (tmp_path / "k.json").exists()


def test_a_tall_weight_is_timed_on_a_slice_but_planned_for_the_whole(monkeypatch):
    """Weights taller than MEASURE_ROWS are timed on their first rows; a kernel the whole weight cannot take
    (bmm16 with out % 16 != 0) is never planned."""
    monkeypatch.setattr(kernels, "MEASURE_ROWS", 32)
    seen = []
    real = dict(kernels.KERNELS)
    monkeypatch.setattr(kernels, "KERNELS", {n: (lambda n, f: lambda x, w, b: (seen.append(w.shape[0]), f(x, w, b))[1])(n, f)
                                             for n, f in real.items()})
    plan = measure_plan(torch.randn(40, 8), repeats=1)  # 40 % 16 != 0
    assert set(seen) == {32} and "bmm16" not in plan.values()
    layer = SkinnyLinear.from_linear(nn.Linear(8, 40), plan)
    with torch.no_grad():
        x = torch.randn(5, 8)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_a_second_call_replans_for_the_current_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "measure_plan",
                        lambda weight, bias, pack=False, working_set=0: fixed_plan("bmm16" if weight.dtype == torch.float32 else "linear"))
    model = choose_linear_kernels(tiny_model(), cache=tmp_path / "k.json")
    first = model.embed_out
    assert first.plan == fixed_plan("bmm16")
    choose_linear_kernels(model.to(torch.bfloat16), cache=tmp_path / "k.json")
    assert model.embed_out is first and first.plan == fixed_plan("linear")


@pytest.mark.skipif("packed" not in kernels.candidates(torch.empty(16, 8), pack=True), reason="no oneDNN linear")
def test_the_packed_kernel_keeps_a_blocked_copy_that_follows_the_weight(tmp_path, monkeypatch):
    """"packed" multiplies by a oneDNN-blocked copy of the weight, made on first use and remade when the weight
    changes in place (an optimizer step, load_state_dict); it is planned only with leave to pack."""
    torch.manual_seed(0)
    layer = SkinnyLinear.from_linear(nn.Linear(40, 48), fixed_plan("packed"))
    x = torch.randn(4, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        first = kernels.blocked_copy(layer.weight)
        assert kernels.blocked_copy(layer.weight) is first  # kept, not remade per call
        layer.weight.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert kernels.blocked_copy(layer.weight) is not first
        layer.weight.data = layer.weight.data.clone()  # data replaced (as model.to(dtype) does), version unmoved
        second = kernels.blocked_copy(layer.weight)
        assert second is not first
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    key = (id(layer.weight), layer.weight.dtype)
    assert key in kernels._BLOCKED
    kernels.release_blocked_copies(layer.weight)
    assert key not in kernels._BLOCKED
    kernels.blocked_copy(layer.weight)
    del layer, second, first
    assert key not in kernels._BLOCKED  # freed with its weight

    seen = []
    monkeypatch.setattr(kernels, "measure_plan",
                        lambda weight, bias, pack=False, working_set=0: (seen.append(pack), fixed_plan("packed" if pack else "onednn"))[1])
    model = choose_linear_kernels(tiny_model(), cache=tmp_path / "k.json", pack=False)
    assert set(seen) == {False} and all(m.plan == fixed_plan("onednn") for m in model.modules()
                                        if isinstance(m, SkinnyLinear))
    seen.clear()
    model = choose_linear_kernels(tiny_model(), cache=tmp_path / "k.json")  # auto: a tiny model fits
    assert set(seen) == {True} and all(m.plan == fixed_plan("packed") for m in model.modules()
                                       if isinstance(m, SkinnyLinear))
    assert all(key.endswith("|pack") == ("packed" in plan.values())
               for key, plan in json.loads((tmp_path / "k.json").read_text())["plans"].items())
    monkeypatch.setattr(kernels, "memory_bytes", lambda: 1000)  # "auto" on a machine too small for the copies
    seen.clear()
    choose_linear_kernels(tiny_model(), cache=False)
    assert set(seen) == {False}
    with pytest.raises(ValueError, match="pack must be"):
        choose_linear_kernels(tiny_model(), pack="yes")


def test_timed_calls_rotate_over_copies_covering_the_working_set(monkeypatch):
    """A step reads every weight from memory: the timings read copies of the weight in turn (as many as the
    working set asks for), not one weight a cache keeps after its first call."""
    weight = torch.randn(48, 16)
    seen = []
    real = dict(kernels.KERNELS)
    monkeypatch.setattr(kernels, "KERNELS", {n: (lambda f: lambda x, w, b: (seen.append(w.data_ptr()), f(x, w, b))[1])(f)
                                             for n, f in real.items()})
    measure_plan(weight, rows_grid=(2,), repeats=4, working_set=3 * weight.numel() * weight.element_size())
    assert len(set(seen)) == 3  # the weight and two copies, shared by the kernels that read it plain
    seen.clear()
    measure_plan(weight, rows_grid=(2,), repeats=4)  # no working set given: the weight itself
    assert set(seen) == {weight.data_ptr()}


@pytest.mark.skipif("packed" not in kernels.candidates(torch.empty(16, 8), pack=True), reason="no oneDNN linear")
def test_a_blocked_copy_is_remade_after_model_to_dtype():
    """model.to(dtype) replaces a Parameter's data without moving its version counter: the blocked copies
    (SkinnyLinear's "packed", RowInvariantLinear's prepack) must follow it all the same."""
    from neoxja.batch_invariant import RowInvariantLinear

    torch.manual_seed(0)
    skinny = SkinnyLinear.from_linear(nn.Linear(64, 48), fixed_plan("packed"))
    invariant = RowInvariantLinear.wrap(nn.Linear(64, 48))
    invariant.prepack = invariant.op is not None
    for layer in (skinny, invariant):
        with torch.no_grad():
            layer(torch.randn(4, 64))  # the float32 copy is made
            layer.to(torch.bfloat16)
            x = torch.randn(4, 64, dtype=torch.bfloat16)
            got = layer(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), F.linear(x, layer.weight, layer.bias).float(), atol=2e-2, rtol=2e-2)


def test_a_measurement_is_announced_once_and_a_cached_plan_is_not(tmp_path, monkeypatch, capsys):
    """A first run on a machine waits for the measurement (seconds at the 2.7B shapes): on_measure says so
    once, with the cache path; `neoxja generate` prints it as a note."""
    monkeypatch.setattr(kernels, "measure_plan", lambda weight, bias, pack=False, working_set=0: fixed_plan("linear"))
    said = []
    cache = tmp_path / "k.json"
    choose_linear_kernels(tiny_model(), cache=cache, on_measure=said.append)
    assert said == [cache]  # once, though several shapes were measured
    choose_linear_kernels(tiny_model(), cache=cache, on_measure=said.append)
    assert said == [cache]  # read from the cache: nothing to say
    choose_linear_kernels(tiny_model(), cache=False, on_measure=said.append)
    assert said == [cache, None]

    from neoxja.generate_cli import main

    monkeypatch.setenv("NEOXJA_KERNEL_CACHE", str(tmp_path / "cli.json"))
    assert main(["猫", "--greedy", "--max-new-tokens", "2", "--dtype", "float32"]) == 0
    assert f"timing the weight-product kernels on this CPU, once (cached in {tmp_path / 'cli.json'})" \
        in capsys.readouterr().err
    assert main(["猫", "--greedy", "--max-new-tokens", "2", "--dtype", "float32"]) == 0
    assert "timing the weight-product kernels" not in capsys.readouterr().err


def test_a_planned_layer_compiles_with_a_dynamic_row_count():
    """With dynamic shapes the row count is symbolic: the layer takes F.linear (inductor's) without looking up
    its plan, so one graph serves every row count (a lookup would guard on each grid point: 5 graphs here) and
    the numbers stay F.linear's."""
    torch.manual_seed(0)
    layer = SkinnyLinear.from_linear(nn.Linear(2560, 48), fixed_plan("bmm16"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for rows in (3, 5, 9, 17, 33):
            x = torch.randn(1, rows, 2560)
            torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # the first shape, then a symbolic one


def test_onednn_dtypes_are_those_onednn_runs_in_here():
    """onednn_dtypes() is what oneDNN's linear really does on this CPU: float32 wherever oneDNN is built in;
    bfloat16 where the CPU has the instructions (not on an AVX2-only CPU, where oneDNN refuses it)."""
    found = kernels.onednn_dtypes()
    if kernels.onednn_linear_available():
        assert torch.float32 in found
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = torch.randn(3, 32).to(dtype), torch.randn(8, 32).to(dtype)
        if dtype in found:
            y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
            torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), atol=5e-2, rtol=5e-2)
            assert "onednn" in kernels.candidates(w)
        else:
            assert "onednn" not in kernels.candidates(w, pack=True) and "packed" not in kernels.candidates(w, True)
            if kernels.onednn_linear_available():
                with pytest.raises(RuntimeError):
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")


def test_a_onednn_plan_in_a_dtype_onednn_cannot_run_takes_f_linear(monkeypatch):
    """A plan measured in float32 keeps its oneDNN kernels after model.to(bfloat16); on a CPU where oneDNN has
    no bfloat16 kernel (simulated here on any CPU) those rows take F.linear instead of failing."""
    monkeypatch.setattr(kernels, "onednn_dtypes", lambda: frozenset({torch.float32}))
    torch.manual_seed(0)
    for name in ("onednn", "packed"):
        layer = SkinnyLinear.from_linear(nn.Linear(64, 48), fixed_plan(name)).to(torch.bfloat16)
        x = torch.randn(4, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif("packed" not in kernels.candidates(torch.empty(16, 8), pack=True), reason="no oneDNN linear")
def test_a_compiled_packed_product_uses_the_current_blocked_copy(monkeypatch):
    """Compiled, a one-row "packed" plan on a weight inductor does not generate itself multiplies by the blocked
    copy inside the opaque op: made once (not per call, not inside the graph), and remade when the weight
    changes in place between two calls of the same graph, so the compiled product is never a stale one."""
    torch.manual_seed(0)
    layer = SkinnyLinear.from_linear(nn.Linear(2560, 48), fixed_plan("packed"))
    x = torch.randn(1, 1, 2560)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    looked_up = []
    real = kernels.blocked_copy
    monkeypatch.setattr(kernels, "blocked_copy", lambda w, *a: (looked_up.append(w is layer.weight), real(w, *a))[1])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
        assert looked_up == [True]  # the compiled product multiplied by the blocked copy of this very weight
        first = kernels.blocked_copy(layer.weight)
        compiled(x)
        assert kernels.blocked_copy(layer.weight) is first  # the graph's calls kept it
        layer.weight.mul_(-3.0)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
        assert kernels.blocked_copy(layer.weight) is not first


@pytest.mark.skipif("packed" not in kernels.candidates(torch.empty(16, 8), pack=True), reason="no oneDNN linear")
def test_blocked_copies_follow_a_dtype_round_trip_and_are_dropped_with_their_data():
    """model.to(dtype) replaces a weight's data without moving its version: a copy made from the old data must
    never serve the new (a round trip float32 -> bfloat16 -> float32 may put the new data at the old address),
    copies of data the weight no longer holds are dropped (by .to() itself), and a weight gets one finalizer
    however often its copies are released and remade."""
    if torch.bfloat16 not in kernels.onednn_dtypes():
        pytest.skip("oneDNN has no bfloat16 kernel on this CPU (AVX2 only)")
    torch.manual_seed(0)
    plan = fixed_plan("packed")
    x = torch.randn(2, 256)
    for trial in range(4):
        layer = SkinnyLinear.from_linear(nn.Linear(256, 4096 if trial % 2 else 48), plan)
        with torch.no_grad():
            layer(x)
            layer.to(torch.bfloat16)
            assert not [k for k in kernels._BLOCKED if k[0] == id(layer.weight)]  # released by .to()
            layer(x.bfloat16())
            assert [k[1] for k in kernels._BLOCKED if k[0] == id(layer.weight)] == [torch.bfloat16]
            layer.to(torch.float32)  # the bfloat16-rounded values, maybe at the old float32 address
            torch.testing.assert_close(layer(x), kernels._onednn(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
        for _ in range(20):
            kernels.release_blocked_copies(layer.weight)
            kernels.blocked_copy(layer.weight)
        assert sum(f.peek() is not None and f.peek()[0] is layer.weight for f in kernels._FINALIZERS.values()) == 1
        key = id(layer.weight)
        del layer
        assert key not in kernels._FINALIZERS and not [k for k in kernels._BLOCKED if k[0] == key]
