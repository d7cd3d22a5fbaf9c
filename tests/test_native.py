"""neoxja's int4 CPU kernels (neoxja/csrc/avx512_bf16.c for AVX512-BF16, neoxja/csrc/avx2.c for AVX2) and
its one-row bfloat16 product: their sums against float64 ones of the dequantized weights, the choice by
quantize(kernel="auto"), the model and the compiled step on them, and bad input. Where the CPU lacks a
kernel's instructions the tests that run it skip, and the fallback tests say what such a machine gets."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from neoxja import native
from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.quantization import Int4WeightOnlyLinear, choose_int4_kernel, int4_group_params, quantize

# skipped only where the CPU lacks the instructions: where it has them, a kernel that fails to build fails
needs_kernel = pytest.mark.skipif(not native.cpu_supported(), reason="this CPU has no AVX512-BF16")
needs_avx2 = pytest.mark.skipif(not native.cpu_supported("avx2"), reason="this CPU has no AVX2")
each_isa = pytest.mark.parametrize("isa", [pytest.param("avx512_bf16", marks=needs_kernel),
                                           pytest.param("avx2", marks=needs_avx2)])


def dequantized(q, scales, zeros, group_size, magnitude=False):
    """W' = q * scale + offset in float64, offset = zero - 8 * scale in float32 (as the kernel computes it);
    with magnitude=True, |q * scale| + |offset|: what the kernel's float32 sums carry (the offset enters
    through the group's sum of x, rounded on its own)."""
    offset = (zeros.float() - 8 * scales.float()).double().repeat_interleave(group_size, 1)
    scaled = q.double() * scales.double().repeat_interleave(group_size, 1)
    return scaled.abs() + offset.abs() if magnitude else scaled + offset


@each_isa
def test_the_kernel_builds_where_the_cpu_has_its_instructions(isa):
    ok, why = native.available(isa)
    assert ok, why


def int4_over_int8_activations(x, q, scales, zeros, G):
    """(expected, terms, exact, rounding), float64, for a kernel that quantizes each group of G activations to
    int8 (round(x * (127 / max|x|)) in float32, to nearest even, as torch.round) and sums nibbles times those
    integers exactly, each group's sum becoming float once, times the weight's and the activations' scales,
    with the offset times the group's float32 sum of the original activations: `expected` is that sum without
    the float32 roundings and `terms` the sum of its terms' magnitudes; `exact` the product of the
    unquantized activations and `rounding` the bound of the activations' rounding (half a scale each)."""
    M, K = x.shape
    xg = x.float().view(M, K // G, G)
    amax = xg.abs().amax(-1, keepdim=True)  # (M, K/G, 1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    xq = torch.round(xg * inv).view(M, K)  # int8 values, as float
    x_scale = (amax / 127).squeeze(-1).double().repeat_interleave(G, 1)  # (M, K): each column's group scale
    w_scaled = q.double() * scales.double().repeat_interleave(G, 1)  # (N, K)
    offset = (zeros.float() - 8 * scales.float()).double().repeat_interleave(G, 1)  # (N, K)
    expected = (xq.double() * x_scale) @ w_scaled.T + x.double() @ offset.T
    terms = (xq.double().abs() * x_scale) @ w_scaled.abs().T + x.double().abs() @ offset.abs().T
    exact = x.double() @ (w_scaled + offset).T
    rounding = (x_scale / 2) @ w_scaled.abs().T  # |x - xq * scale| <= scale / 2 per activation
    return expected, terms, exact, rounding


@pytest.mark.parametrize("isa,M", [*[pytest.param("avx2", M, marks=needs_avx2) for M in (1, 2, 3, 4, 5, 9, 40)],
                                   *[pytest.param("avx512_bf16", M, marks=needs_kernel)
                                     for M in (1, 2, 3, 4, 5, 6, 9, 40)]])
@pytest.mark.parametrize("K,N,G", [(64, 16, 64), (256, 32, 128), (640, 48, 128), (512, 16, 256), (384, 80, 64),
                                   (256, 112, 64)])
def test_kernel_is_the_exact_sum_over_int8_activations(isa, M, K, N, G):
    """Both kernels, at every row count (AVX512 4 rows and AVX2 3 per pass; N = 80 and 112 rows are AVX512
    units of 4 panels and a remainder of 1 and 3), recomputed in float64 from the same quantized activations:
    equal within the float32 sums' rounding (1e-6 of the sum of the terms' magnitudes). And against the exact
    product of the unquantized activations: within the activations' rounding."""
    g = torch.Generator().manual_seed(M * 1000 + K + N + 7)
    W = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    q, scales, zeros = int4_group_params(W, G)
    packed, sz = native.pack_int4(q, scales, zeros)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, :G] = 0  # an all-zero group: scale 0, nothing divided by it
    x = x.to(native.INT4_ACTIVATIONS[isa])  # the kernel's input: float32 for AVX2, bfloat16 for AVX512-BF16
    y = native.int4_linear(x, packed, sz, G, isa)
    assert y.shape == (M, N) and y.dtype == torch.float32
    expected, terms, exact, rounding = int4_over_int8_activations(x, q, scales, zeros, G)
    assert bool(((y.double() - expected).abs() <= 1e-6 * terms + 1e-30).all())
    assert bool(((y.double() - exact).abs() <= rounding * 1.0001 + 1e-6 * terms + 1e-30).all())


def test_the_packed_layout_is_the_one_the_kernels_document():
    """pack_int4 against csrc/int4_layout.h's words, element by element: panel t, group g, chunk c, row l,
    byte b holds q[16t + l, g*G + 4c + b] in its low nibble and q[16t + l, g*G + G/2 + 4c + b] in its high
    one; the pairs (N/16, K/G, 2, 16) hold the bfloat16 bits of the scales, then of the zeros."""
    g = torch.Generator().manual_seed(3)
    N, K, G = 32, 256, 128
    q, scales, zeros = int4_group_params(torch.randn(N, K, generator=g), G)
    packed, sz = native.pack_int4(q, scales, zeros)
    assert packed.shape == (N // 16, K // 2 * 16) and sz.shape == (N // 16, K // G, 2, 16)
    chunks = packed.view(N // 16, K // G, G // 8, 16, 4)
    for t, gi, c, row, b in ((0, 0, 0, 0, 0), (1, 1, 15, 15, 3), (0, 1, 7, 9, 2), (1, 0, 3, 4, 1)):
        n, k = 16 * t + row, gi * G + 4 * c + b
        assert int(chunks[t, gi, c, row, b]) == int(q[n, k]) | int(q[n, k + G // 2]) << 4
    assert torch.equal(sz[1, 1, 0].view(torch.bfloat16), scales[16:, 1])
    assert torch.equal(sz[0, 0, 1].view(torch.bfloat16), zeros[:16, 0])


@each_isa
def test_a_rows_result_does_not_depend_on_the_other_rows(isa):
    """Batch invariance, bit for bit: each row of an M-row call equals that row alone, in a call of fewer rows,
    among other rows in another order, and on one thread or two: every output element takes the same operations
    in the same order. And the two kernels, both rounding the activations to int8, agree within float32 sums'
    order."""
    g = torch.Generator().manual_seed(7)
    K, N, G = 512, 208, 128  # 13 panels: AVX512 units of 4 and a remainder of 1
    q, scales, zeros = int4_group_params(torch.randn(N, K, generator=g), G)
    packed, sz = native.pack_int4(q, scales, zeros)
    x = torch.randn(11, K, generator=g).to(native.INT4_ACTIVATIONS[isa])
    full = native.int4_linear(x, packed, sz, G, isa)
    for i in range(11):
        assert torch.equal(native.int4_linear(x[i:i + 1], packed, sz, G, isa), full[i:i + 1])
    for m in (2, 3, 4, 5, 8):
        assert torch.equal(native.int4_linear(x[:m], packed, sz, G, isa), full[:m])
    order = torch.randperm(11, generator=g)
    assert torch.equal(native.int4_linear(x[order], packed, sz, G, isa), full[order])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.int4_linear(x, packed, sz, G, isa), full)
    finally:
        torch.set_num_threads(threads)
    if isa == "avx512_bf16" and native.cpu_supported("avx2"):
        torch.testing.assert_close(full, native.int4_linear(x.float(), packed, sz, G, "avx2"),
                                   rtol=0, atol=1e-6 * float(full.abs().max()))


def small_layout():
    """(generator, q, scales, zeros, packed, sz): a 16 x 128 weight in groups of 64, packed for the kernel."""
    g = torch.Generator().manual_seed(0)
    q, scales, zeros = int4_group_params(torch.randn(16, 128, generator=g), 64)
    return (g, q, scales, zeros) + native.pack_int4(q, scales, zeros)


@each_isa
def test_the_opaque_op_equals_the_direct_call_and_has_a_fake(isa):
    """The op, called and compiled, gives the direct call's bits, at one row and many."""
    g, q, scales, zeros, packed, sz = small_layout()
    op = native.int4_linear_op(isa)
    assert op.name() == f"neoxja::{native.INT4_OPS[isa]}"
    compiled = torch.compile(lambda x: op(x, packed, sz, 64) * 2, fullgraph=True, dynamic=False)
    for rows in (1, 4, 9):
        x = torch.randn(rows, 128, generator=g).to(native.INT4_ACTIVATIONS[isa])
        direct = native.int4_linear(x, packed, sz, 64, isa)
        assert torch.equal(op(x, packed, sz, 64), direct)
        assert torch.equal(compiled(x), direct * 2)
        torch.library.opcheck(op, (x, packed, sz, 64))


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_module_on_the_kernel_matches_the_exact_product_and_torchs_kernel(bias):
    """The layer (rows padded to 16, output sliced, cast back to the input's dtype, bias added): against the
    float64 recomputation of the kernel's arithmetic (the bfloat16 input quantized to int8 per group), within
    float32 sums' rounding; against the exact product and torch's int4 kernel on the same quantized weights
    (which rounds the dequantized weights to bfloat16 instead), within a few percent: the activations'
    8-bit rounding."""
    g = torch.Generator().manual_seed(int(bias))
    linear = nn.Linear(256, 37, bias=bias)  # 37 rows: padded to 48
    ours = Int4WeightOnlyLinear.from_float(linear, 64)
    theirs = Int4WeightOnlyLinear.from_float(linear, 64, kernel="torch")
    assert (ours.kernel, theirs.kernel) == ("avx512_bf16", "torch")
    x = torch.randn(2, 5, 256, generator=g)
    y = ours(x)
    assert y.shape == (2, 5, 37) and y.dtype == torch.float32
    q, scales, zeros = int4_group_params(linear.weight.detach(), 64)
    x16 = x.reshape(10, 256).to(torch.bfloat16)
    expected, terms, exact, _ = int4_over_int8_activations(x16, q, scales, zeros, 64)
    if bias:
        expected, exact = expected + linear.bias.detach().double(), exact + linear.bias.detach().double()
    assert bool(((y.reshape(10, 37).double() - expected).abs() <= 1e-6 * terms + 1e-6).all())
    assert float((y.reshape(10, 37).double() - exact).norm() / exact.norm()) < 0.02
    ref = theirs(x)
    assert float((y - ref).norm() / ref.norm()) < 0.02
    # bfloat16 in, bfloat16 out; model.to(dtype) leaves the scales and zeros (held as int16 bits) alone
    y16 = copy.deepcopy(ours).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    if not bias:  # the same float32 sums, rounded once (with a bias, it is added in bfloat16)
        assert torch.equal(y16, y.to(torch.bfloat16))
    assert torch.allclose(y16.float(), y, rtol=2**-7, atol=1e-2)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
               tie_word_embeddings=False) | kw
    return GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**cfg)).eval()


@needs_kernel
def test_quantize_auto_takes_the_kernel_and_the_model_generates_what_torchs_kernel_nearly_does():
    model = make_model().to(torch.bfloat16)
    ours = quantize(copy.deepcopy(model), "int4", group_size=64)
    theirs = quantize(copy.deepcopy(model), "int4", group_size=64, kernel="torch")
    kernels = {m.kernel for m in ours.modules() if isinstance(m, Int4WeightOnlyLinear)}
    assert kernels == {"avx512_bf16"} and "kernel=avx512_bf16" in repr(ours)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 0.03  # two roundings of one quantized model
    out = ours.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)


@each_isa
def test_compiled_decode_step_on_the_kernel_gives_eagers_tokens(isa):
    """Under torch.compile the product is the opaque op neoxja::int4_avx512_linear or neoxja::int4_avx2_linear
    (ctypes cannot be traced): the compiled step calls it (the profiler sees the op, which the eager path
    never dispatches) and gives the eager step's greedy tokens."""
    model = quantize(make_model(seed=1).to(torch.bfloat16), "int4", group_size=64, kernel=isa)
    op = f"neoxja::{native.INT4_OPS[isa]}"
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = model.generate(ids, max_new_tokens=8)
    assert not [e for e in prof.events() if e.name == op]
    torch._dynamo.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled = model.generate(ids, max_new_tokens=8, compile=True)
    assert torch.equal(compiled, eager)
    assert [e for e in prof.events() if e.name == op]


@needs_avx2
@pytest.mark.parametrize("bias", [False, True])
def test_module_on_the_avx2_kernel_is_the_kernel_call_and_near_torchs(bias):
    """The layer on the AVX2 kernel (rows padded to 16, output sliced, bias added): the kernel's own product
    of the float32 input, and within a few percent of torch's int4 kernel on the same quantized weights (the
    activations' 8-bit rounding: llama.cpp's Q8_0 activations)."""
    g = torch.Generator().manual_seed(10 + int(bias))
    linear = nn.Linear(256, 37, bias=bias)
    ours = Int4WeightOnlyLinear.from_float(linear, 64, kernel="avx2")
    theirs = Int4WeightOnlyLinear.from_float(linear, 64, kernel="torch")
    assert ours.kernel == "avx2" and "kernel=avx2" in repr(ours)
    x = torch.randn(2, 5, 256, generator=g)
    y = ours(x)
    assert y.shape == (2, 5, 37) and y.dtype == torch.float32
    direct = native.int4_linear(x.reshape(10, 256), ours.packed, ours.scales_and_zeros, 64, "avx2")
    expected = direct[:, :37] + (linear.bias.detach() if bias else 0)
    assert torch.equal(y.reshape(10, 37), expected)
    ref = theirs(x)
    assert float((y - ref).norm() / ref.norm()) < 0.02


# ----------------------------------------------------------------------------------------------------------
# the choice and bad input (these run on every machine)


def test_kernel_choice_falls_back_to_torchs_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(native, "available", lambda isa="avx512_bf16": (False, f"this CPU (DEFAULT) has no {isa}"))
    monkeypatch.setattr(native, "cpu_supported", lambda isa="avx512_bf16": False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU the kernels are not for: falling back is no news
        assert choose_int4_kernel("auto", "cpu", 128) == "torch"
    with pytest.raises(ValueError, match=r"'avx512_bf16' cannot run here: this CPU \(DEFAULT\) has no avx512_bf16"):
        choose_int4_kernel("avx512_bf16", "cpu", 128)
    with pytest.raises(ValueError, match=r"'avx2' cannot run here: this CPU \(DEFAULT\) has no avx2"):
        choose_int4_kernel("avx2", "cpu", 128)
    model = quantize(make_model(), "int4", group_size=64)  # auto on such a machine: torch's kernel, working
    assert {m.kernel for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)} == {"torch"}
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@needs_avx2
def test_auto_takes_the_avx2_kernel_on_a_cpu_without_avx512_bf16(monkeypatch):
    real = native.available
    monkeypatch.setattr(native, "available", lambda isa="avx512_bf16": (
        (False, "this CPU (AVX2) has no AVX512-BF16") if isa == "avx512_bf16" else real(isa)))
    monkeypatch.setattr(native, "cpu_supported", lambda isa="avx512_bf16": isa == "avx2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_int4_kernel("auto", "cpu", 128) == "avx2"
    assert choose_int4_kernel("auto", "cpu", 32) == "torch"  # groups of 32: only torch's kernel takes them
    model = make_model().to(torch.bfloat16)
    ours = quantize(copy.deepcopy(model), "int4", group_size=64)
    theirs = quantize(copy.deepcopy(model), "int4", group_size=64, kernel="torch")
    assert {m.kernel for m in ours.modules() if isinstance(m, Int4WeightOnlyLinear)} == {"avx2"}
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 0.05  # the activations' rounding on top of the weights'
    out = ours.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)


def test_kernel_choice_rules_and_clear_errors(monkeypatch):
    monkeypatch.setattr(native, "available", lambda isa="avx512_bf16": (True, "this CPU has AVX512-BF16"))
    assert choose_int4_kernel("auto", "cpu", 64) == "avx512_bf16"
    assert choose_int4_kernel("auto", "cpu", 32) == "torch"  # groups of 32: only torch's kernel takes them
    assert choose_int4_kernel("auto", "cuda", 128) == "torch"
    assert choose_int4_kernel("torch", "cpu", 128) == "torch"
    with pytest.raises(ValueError, match="groups of a multiple of 64 columns, not 32"):
        choose_int4_kernel("avx512_bf16", "cpu", 32)
    with pytest.raises(ValueError, match="it runs on CPU, not on cuda"):
        choose_int4_kernel("avx512_bf16", "cuda", 128)
    with pytest.raises(ValueError, match="unknown int4 kernel 'fast'"):
        quantize(make_model(), "int4", kernel="fast")
    with pytest.raises(ValueError, match="kernel='torch' applies to int4 only, not to 'int8'"):
        quantize(make_model(), "int8", kernel="torch")
    model = make_model()
    with pytest.raises(ValueError, match="unknown int4 kernel"):
        quantize(model, "int4", kernel=None)
    assert not any(isinstance(m, Int4WeightOnlyLinear) for m in model.modules())  # nothing was replaced


def test_no_compiler_or_a_failing_build_is_a_clear_reason_and_leaves_nothing(monkeypatch, tmp_path):
    if not native.cpu_supported():
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    monkeypatch.setenv("NEOXJA_BUILD_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        monkeypatch.setenv("CC", "no-such-compiler-neoxja")
        ok, why = native.available()
        assert not ok and "no C compiler ('no-such-compiler-neoxja' is not on PATH)" in why
        native._load.cache_clear()
        monkeypatch.setenv("CC", "false")  # a "compiler" that fails
        ok, why = native.available()
        assert not ok and "avx512_bf16.c" in why and "failed" in why
        assert list(tmp_path.iterdir()) == []  # no half-built library left to load later
        with pytest.raises(RuntimeError, match="failed"):  # remembered, and a call says why
            native.int4_linear(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(1, 512, dtype=torch.uint8),
                               torch.zeros(1, 1, 2, 16, dtype=torch.int16), 64)
        with pytest.warns(RuntimeWarning, match="using torch's int4 kernel"):  # auto says what it lost
            assert choose_int4_kernel("auto", "cpu", 64) == "torch"
    finally:
        native._load.cache_clear()


@needs_kernel
def test_the_library_is_built_once_into_the_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("NEOXJA_BUILD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "cc -O2")  # a compiler with arguments, as $CC may be
    native._load.cache_clear()
    try:
        native._library()
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so" and built[0].stat().st_mode & 0o444 == 0o444
        stamp = built[0].stat().st_mtime_ns
        native._load.cache_clear()
        native._library()
        assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    finally:
        native._load.cache_clear()
    # a file under its name that is not the library (a full disk, a foreign file): a new process rebuilds it
    # (in this process the library stays loaded: the loader would hand back the loaded one by its name)
    broken = tmp_path / ".broken"
    broken.write_bytes(b"not a library")
    os.replace(broken, built[0])  # a new file, as a writer would leave it; the mapped one stays intact
    code = ("import torch\nfrom neoxja import native\nfrom neoxja.quantization import int4_group_params\n"
            "q, s, z = int4_group_params(torch.randn(16, 64), 64)\nx = torch.randn(1, 64).to(torch.bfloat16)\n"
            "y = native.int4_linear(x, *native.pack_int4(q, s, z), 64)\n"
            "w = (q.double() - 8) * s.double().repeat_interleave(64, 1) + z.double().repeat_interleave(64, 1)\n"
            "assert float((y.double() - x.double() @ w.T).norm() / (x.double() @ w.T).norm()) < 0.02\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "NEOXJA_BUILD_CACHE": str(tmp_path), "CC": "cc -O2"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert built[0].read_bytes()[:4] == b"\x7fELF"


@needs_kernel
def test_kernel_refuses_what_would_read_out_of_bounds():
    g, q, scales, zeros, packed, sz = small_layout()
    x = torch.randn(2, 128, generator=g)
    with pytest.raises(ValueError, match="takes x as a CPU tensor of torch.bfloat16, got torch.float32"):
        native.int4_linear(x, packed, sz, 64)
    with pytest.raises(ValueError, match="x has 64 columns"):
        native.int4_linear(x[:, :64].to(torch.bfloat16), packed, sz, 64)
    with pytest.raises(ValueError, match="takes packed as a CPU tensor of torch.uint8"):
        native.int4_linear(x.to(torch.bfloat16), packed.to(torch.int32), sz, 64)
    for wrong in (32, 96, 128):  # group sizes the layout was not made with: fewer or more scales to read
        with pytest.raises(ValueError, match=f"group_size {wrong} does not match the layout"):
            native.int4_linear(x.to(torch.bfloat16), packed, sz, wrong)


def test_sources_ship_with_the_package():
    for isa, (source, flags) in native.SOURCES.items():
        assert source.is_file() and native.INT4_FUNCTIONS[isa] in source.read_text()
        assert os.path.basename(source.parent) == "csrc"
    assert not any(f.startswith("-mavx512") for f in native.SOURCES["avx2"][1])  # an AVX2 CPU runs that one
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert {"csrc/*.c", "csrc/*.h"} <= set(pyproject["tool"]["setuptools"]["package-data"]["neoxja"])
    assert (native.CSRC / "int4_layout.h").is_file() and (native.CSRC / "int4_panels.h").is_file()


@needs_kernel
def test_packing_in_row_chunks_equals_packing_at_once(monkeypatch):
    """from_float writes ROW_CHUNK rows at a time into the kernel's tensors; the result must be the packing of
    the whole matrix at once, also when the rows do not fill the last chunk (1037 rows: padded to 1040)."""
    linear = nn.Linear(128, 1037, bias=False)
    whole = Int4WeightOnlyLinear.from_float(linear, 64, kernel="avx512_bf16")
    monkeypatch.setattr(Int4WeightOnlyLinear, "ROW_CHUNK", 128)
    chunked = Int4WeightOnlyLinear.from_float(linear, 64, kernel="avx512_bf16")
    W = torch.cat([linear.weight.detach(), torch.zeros(3, 128)])
    packed, sz = native.pack_int4(*int4_group_params(W, 64))
    assert torch.equal(whole.packed, packed) and torch.equal(whole.scales_and_zeros, sz)
    assert torch.equal(chunked.packed, packed) and torch.equal(chunked.scales_and_zeros, sz)


@needs_kernel
def test_more_refusals_and_what_must_still_work():
    g, q, scales, zeros, packed, sz = small_layout()
    x = torch.randn(2, 128, generator=g).to(torch.bfloat16)
    with pytest.raises(ValueError, match="not contiguous"):
        native.int4_linear(x, torch.stack([packed, packed], -1)[..., 0], sz, 64)  # every other byte
    # groups of 32 packed anyway (pack refuses them; a layout made by hand): the C kernel refuses, clearly
    q32, s32, z32 = int4_group_params(torch.randn(8, 128, generator=g), 32)
    with pytest.raises(ValueError, match="groups of a multiple of 64 columns"):
        native.pack_int4(q32, s32, z32)
    sz32 = torch.zeros(1, 4, 2, 16, dtype=torch.int16)
    with pytest.raises(RuntimeError, match="refused M=2 N=16 K=128 group_size=32"):
        native.int4_linear(x, packed, sz32, 32)
    with pytest.raises(ValueError, match=r"4-bit values in \[0, 15\], got \[0, 16\]"):
        native.pack_int4(q.clamp(max=14) + (q == 15) * 2, scales, zeros)
    with pytest.raises(ValueError, match="rows in multiples of 16"):
        native.pack_int4(q[:8], scales[:8], zeros[:8])
    # a default device (meta, or cuda) set around the call: the output is still made on the CPU
    expected = native.int4_linear(x, packed, sz, 64)
    with torch.device("meta"):
        assert torch.equal(native.int4_linear(x, packed, sz, 64), expected)
    # offset and transposed views of x are made contiguous first; thread counts give the same bits
    wide = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    view = wide[:, 128:]
    assert torch.equal(native.int4_linear(view, packed, sz, 64), native.int4_linear(view.contiguous(), packed, sz, 64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int4_linear(x, packed, sz, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, expected)


@needs_kernel
def test_layer_survives_pickling_default_devices_and_dtype_moves():
    import io

    linear = nn.Linear(128, 20)
    layer = Int4WeightOnlyLinear.from_float(linear, 64)
    x = torch.randn(3, 128)
    y = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)  # our own object, just written
    assert again.kernel == "avx512_bf16" and torch.equal(again(x), y)
    with torch.device("meta"):
        made_under_meta = Int4WeightOnlyLinear.from_float(linear, 64)
        assert torch.equal(made_under_meta(x), y)
    assert made_under_meta.packed.device.type == "cpu"
    with pytest.raises(ValueError, match="runs on the CPU only: quantize the float model on that device"):
        copy.deepcopy(layer).to("meta")(x.to("meta"))


def test_torch_kernel_layers_survive_model_to_float32():
    """torch's int4 layers hold their bfloat16 scales as int16 bits too: model.float() (or .to(float32)) used
    to turn them into float32, which the kernel refuses."""
    model = quantize(make_model().to(torch.bfloat16), "int4", group_size=64, kernel="torch")
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids).logits.float()
    after = model.float()(ids).logits
    assert after.dtype == torch.float32 and torch.allclose(after, before, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------------------------------------
# the one-row bfloat16 product (neoxja.kernels' "gemv")


@needs_kernel
@pytest.mark.parametrize("N,K", [(1, 1), (5, 31), (7, 33), (4, 64), (9, 100), (13, 256), (3, 2561), (8000, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_gemv_is_the_float32_sum_rounded_once(N, K, bias):
    """Products of two bfloat16 numbers are exact in float32; the float32 sum rounds (<= 1e-6 of sum |x||w|
    for these K) and the result rounds once to bfloat16 (half an ulp: at most 2^-8 relative). Tails of K below 32 and
    row counts not a multiple of 4 included."""
    g = torch.Generator().manual_seed(N * 7 + K)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16) if bias else None
    y = native.bf16_gemv(x, w, b)
    assert y.shape == (1, N) and y.dtype == torch.bfloat16
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    bound = 2**-8 * exact.abs() + 1.01e-6 * (x.double().abs() @ w.double().abs().T + (b.double().abs() if bias else 0))
    assert bool(((y.double() - exact).abs() <= bound + 1e-30).all())
    from neoxja import kernels

    assert kernels._same_product(y, F.linear(x, w, b))  # what measure_plan checks before it trusts a kernel


@needs_kernel
def test_bf16_gemv_refuses_what_it_cannot_read():
    w = torch.randn(8, 64).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="takes x as a contiguous CPU tensor of bfloat16, got torch.float32"):
        native.bf16_gemv(x.float(), w)
    with pytest.raises(ValueError, match="weight as a contiguous CPU tensor of bfloat16.*not contiguous"):
        native.bf16_gemv(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match=r"takes x \(1, K\), weight \(N, K\) and bias \(N,\)"):
        native.bf16_gemv(torch.randn(2, 64).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"bias \(N,\)"):
        native.bf16_gemv(x, w, torch.zeros(7, dtype=torch.bfloat16))
    with torch.device("meta"):  # the output is made on the CPU whatever the default device
        assert native.bf16_gemv(x, w).device.type == "cpu"


@needs_kernel
def test_the_gemv_kernel_is_a_measured_candidate_and_compiles():
    """neoxja.kernels offers "gemv" for bfloat16 weights here; a layer planned with it uses it at one row
    (eager, and compiled on a weight inductor does not generate itself, through neoxja::skinny_linear) and
    gives F.linear's numbers up to the rounding of the sum."""
    from neoxja import kernels
    from neoxja.kernels import ROW_GRID, SkinnyLinear

    assert "gemv" in kernels.candidates(torch.empty(48, 40, dtype=torch.bfloat16))
    assert "gemv" not in kernels.candidates(torch.empty(48, 40))  # float32: not its dtype
    calls = []
    real = kernels.KERNELS["gemv"]
    plan = {r: "linear" for r in ROW_GRID} | {1: "gemv"}
    try:
        kernels.KERNELS["gemv"] = lambda *a: (calls.append(1), real(*a))[1]
        for in_features in (40, 2560):  # below and above inductor's bound for generating the product itself
            torch.manual_seed(in_features)
            layer = SkinnyLinear.from_linear(nn.Linear(in_features, 48).to(torch.bfloat16), plan)
            x = torch.randn(1, 1, in_features).to(torch.bfloat16)
            expected = F.linear(x, layer.weight, layer.bias)
            with torch.no_grad():
                assert kernels._same_product(layer(x), expected) and len(calls) == 1
                calls.clear()
                torch._dynamo.reset()
                compiled = torch.compile(layer, fullgraph=True)(x)
            assert kernels._same_product(compiled, expected)
            assert bool(calls) == (in_features > 2048)
            calls.clear()
    finally:
        kernels.KERNELS["gemv"] = real


@needs_kernel
def test_a_cpu_check_answered_no_once_is_not_remembered(monkeypatch):
    """Only the build is remembered: a CPU check that said no (a test simulating another CPU, as
    tests/test_bf16.py does) must not disable the kernel for the rest of the process."""
    with monkeypatch.context() as m:
        m.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        assert native.available() == (False, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AVX512-BF16")
    assert native.available() == (True, "this CPU has AVX512-BF16")


@needs_kernel
def test_a_gemv_plan_falls_back_where_gemv_cannot_run():
    """A plan naming gemv, after model.to(float32) or where the library does not run (a plan cache shared
    with another machine): F.linear, eager and compiled, not an error. A strided one-row input works too."""
    from neoxja import kernels
    from neoxja.kernels import ROW_GRID, SkinnyLinear

    plan = {r: "linear" for r in ROW_GRID} | {1: "gemv"}
    layer = SkinnyLinear.from_linear(nn.Linear(2560, 8).to(torch.bfloat16), plan)
    x = torch.randn(1, 2, 2560).to(torch.bfloat16)[:, :1]
    strided = torch.randn(2560, 2).to(torch.bfloat16)[:, 0].reshape(1, 1, 2560)  # stride 2
    with torch.no_grad():
        for inp in (x, strided):
            assert kernels._same_product(layer(inp), F.linear(inp, layer.weight, layer.bias))
            torch._dynamo.reset()
            got = torch.compile(layer, fullgraph=True)(inp)
            assert kernels._same_product(got, F.linear(inp, layer.weight, layer.bias))
        layer.float()
        assert torch.equal(layer(x.float()), F.linear(x.float(), layer.weight, layer.bias))
        layer.to(torch.bfloat16)
        layer.gemv_runs = False  # as from_linear finds it where the library does not run
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert "gemv" not in kernels.candidates(torch.empty(40, 48, dtype=torch.bfloat16).t())  # not contiguous


def test_load_quantized_refuses_a_kernel_that_cannot_run_before_reading_anything(tmp_path):
    from neoxja.quantization import load_quantized

    missing = tmp_path / "no-such-model"  # were it read first, the error would be about the missing files
    with pytest.raises(ValueError, match="groups of a multiple of 64 columns, not 32"):
        load_quantized(missing, "int4", group_size=32, kernel="avx512_bf16")
    with pytest.raises(ValueError, match="it runs on CPU, not on meta"):
        load_quantized(missing, "int4", kernel="avx512_bf16", device="meta")


# ----------------------------------------------------------------------------------------------------------
# the AVX2 kernel's edges, its library apart from the AVX-512 one, the operators' refusal of autograd


@needs_avx2
def test_avx2_kernel_refuses_what_would_read_out_of_bounds():
    g, q, scales, zeros, packed, sz = small_layout()
    x = torch.randn(2, 128, generator=g)
    with pytest.raises(ValueError, match="takes x as a CPU tensor of torch.float32, got torch.bfloat16"):
        native.int4_linear(x.to(torch.bfloat16), packed, sz, 64, "avx2")
    with pytest.raises(ValueError, match="x has 64 columns"):
        native.int4_linear(x[:, :64], packed, sz, 64, "avx2")
    with pytest.raises(ValueError, match="group_size 128 does not match the layout"):
        native.int4_linear(x, packed, sz, 128, "avx2")
    with pytest.raises(ValueError, match="a positive group size, got .* 64.0"):
        native.int4_linear(x, packed, sz, 64.0, "avx2")
    with pytest.raises(ValueError, match="unknown instruction set 'avx3'"):
        native.int4_linear(x, packed, sz, 64, "avx3")
    with pytest.raises(ValueError, match="unknown instruction set"):
        native.available("sse2")


@each_isa
def test_int8_activations_tiny_huge_and_non_finite(isa):
    """A group whose largest activation is so small that 127 / max overflows contributes only its offset term
    (the products' term, below 1e-36 of sum |w|, is dropped, not garbage); a huge one (near float32's
    largest) keeps its scale; nan or inf activations give nan, never a number (an infinite activation times
    127 / inf is nan, which would become the int8 -128 and an infinity of either sign: the group's scale is
    nan instead). Both kernels (the AVX512-BF16 one's inputs rounded to bfloat16, whose range is float32's), on
    one row and on several."""
    dtype = native.INT4_ACTIVATIONS[isa]
    g = torch.Generator().manual_seed(5)
    q, scales, zeros = int4_group_params(torch.randn(16, 128, generator=g), 64)
    packed, sz = native.pack_int4(q, scales, zeros)
    Wd = dequantized(q, scales, zeros, 64)
    tiny = (torch.randn(2, 128, generator=g) * 1e-38).to(dtype)  # subnormal and tiny normal values
    y = native.int4_linear(tiny, packed, sz, 64, isa)
    offset = (zeros.float() - 8 * scales.float()).double().repeat_interleave(64, 1)
    assert torch.allclose(y.double(), tiny.double() @ offset.T, rtol=1e-5, atol=1e-44)
    assert float((y.double() - tiny.double() @ Wd.T).abs().max()) < 1e-36
    huge = (torch.randn(2, 128, generator=g) * 1e36).to(dtype)
    y = native.int4_linear(huge, packed, sz, 64, isa)
    exact = huge.double() @ Wd.T
    assert y.isfinite().all() and float(((y.double() - exact).abs() / exact.abs().max()).max()) < 0.05
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 128, generator=g).to(dtype)
        x[1, 70] = bad
        y = native.int4_linear(x, packed, sz, 64, isa)
        assert y[0].isfinite().all() and y[1].isnan().all()
        assert torch.equal(native.int4_linear(x[1:], packed, sz, 64, isa).isnan(), y[1:].isnan())
    # every weight positive and one +inf per row: the exact result is +inf; the kernels say nan
    q, scales, zeros = int4_group_params(torch.full((16, 128), 7.0) + torch.arange(128.0) / 64, 64)
    packed, sz = native.pack_int4(q, scales, zeros)
    x = torch.ones(5, 128).to(dtype)
    x[:, 5] = float("inf")
    assert native.int4_linear(x, packed, sz, 64, isa).isnan().all()
    assert native.int4_linear(x[:1], packed, sz, 64, isa).isnan().all()


def test_a_compiler_without_avx512_bf16_still_builds_the_avx2_kernel(monkeypatch, tmp_path):
    """One library per instruction set: a compiler that rejects -mavx512bf16 (GCC < 10) costs the AVX-512
    kernels only, and says which source failed."""
    if not native.cpu_supported("avx2"):
        pytest.skip("this CPU has no AVX2")
    if not native.cpu_supported():
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    wrapper = tmp_path / "old-cc"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -mavx512bf16 ] && '
                       '{ echo "unrecognized command-line option -mavx512bf16" >&2; exit 1; }; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("NEOXJA_BUILD_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        ok, why = native.available("avx512_bf16")
        assert not ok and "avx512_bf16.c" in why and "-mavx512bf16" in why
        assert native.available("avx2") == (True, "this CPU has AVX2")
        g, q, scales, zeros, packed, sz = small_layout()
        assert native.int4_linear(torch.randn(1, 128, generator=g), packed, sz, 64, "avx2").isfinite().all()
        assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["avx2"]
    finally:
        native._load.cache_clear()


@each_isa
def test_the_operators_refuse_autograd_instead_of_dropping_the_gradient(isa):
    g, q, scales, zeros, packed, sz = small_layout()
    x = torch.randn(2, 128, generator=g).to(native.INT4_ACTIVATIONS[isa]).requires_grad_()
    op = native.int4_linear_op(isa)
    with pytest.raises(RuntimeError, match=f"neoxja::{native.INT4_OPS[isa]} has no autograd formula"):
        op(x, packed, sz, 64)
    with torch.no_grad():
        assert op(x, packed, sz, 64).shape == (2, 16)


@needs_avx2
def test_load_quantized_on_the_avx2_kernel_defaults_to_float32(tmp_path):
    from neoxja.quantization import load_quantized

    make_model().save_pretrained(tmp_path)
    model = load_quantized(tmp_path, "int4", group_size=64, kernel="avx2")
    assert model.dtype == torch.float32
    assert {m.kernel for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)} == {"avx2"}
    assert load_quantized(tmp_path, "int4", group_size=64, kernel="torch").dtype == torch.bfloat16
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3).shape == (1, 6)


@each_isa
def test_a_group_too_large_for_32_bit_sums_is_refused(isa):
    """A group's integer sums (nibbles times int8 activations) must fit 32 bits: groups of more than
    native.INT4_MAX_GROUP columns are refused with a clear error, before the C kernel runs."""
    G = 2 * native.INT4_MAX_GROUP
    q, scales, zeros = int4_group_params(torch.randn(16, G, generator=torch.Generator().manual_seed(0)), G)
    packed, sz = native.pack_int4(q, scales, zeros)
    x = torch.ones(1, G).to(native.INT4_ACTIVATIONS[isa])
    with pytest.raises(ValueError, match=f"groups of at most {native.INT4_MAX_GROUP} columns"):
        native.int4_linear(x, packed, sz, G, isa)
