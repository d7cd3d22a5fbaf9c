"""--dtype auto in `neoxja generate` and `neoxja train`, and bf16 autocast training against float32.

The CPU's features are mocked through torch's checks (see test_hardware.py), so every branch runs on any
machine; the loss-curve test runs real bf16 autocast (emulated where the CPU lacks bf16: slower, same math).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import TINY, losses, prepare_data, train_args, train_here

from neoxja import generate_cli


@pytest.fixture
def cpu_has_bf16(monkeypatch):
    def set_features(amx: bool, avx512_bf16: bool = False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)

    return set_features


def generate(argv, capsys):
    code = generate_cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- neoxja generate


@pytest.mark.parametrize("amx,avx512_bf16,dtype,reason", [
    (True, False, "bfloat16", "auto: this CPU has AMX-BF16"),
    (False, True, "bfloat16", "auto: this CPU has AVX512-BF16"),
    (False, False, "float32", "neither AMX-BF16 nor AVX512-BF16"),
])
def test_generate_auto_is_the_default_and_says_why(cpu_has_bf16, capsys, monkeypatch, amx, avx512_bf16, dtype, reason):
    cpu_has_bf16(amx, avx512_bf16)
    loaded = []
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    real = GPTNeoXJapaneseForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(GPTNeoXJapaneseForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: (loaded.append(k["dtype"]), real(cls, *a, **k))[1]))
    for argv in (["猫", "--greedy", "--max-new-tokens", "3"], ["猫", "--greedy", "--max-new-tokens", "3", "--dtype", "auto"]):
        out, summary = generate(argv, capsys)
        assert out.startswith("猫")
        assert f"tokens/s (model loaded in " in summary and f"), {dtype} (auto: " in summary and reason in summary
        assert loaded.pop() == getattr(torch, dtype)


def test_generate_explicit_dtype_and_int8(cpu_has_bf16, capsys, bundled_dir):
    """An explicit --dtype wins and says so; auto with --quantize int8 is float32 (FBGEMM's activations);
    --dtype float32 reproduces the library's float32 greedy text."""
    from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

    cpu_has_bf16(True)
    out, summary = generate(["猫は", "--greedy", "--max-new-tokens", "6", "--dtype", "float32"], capsys)
    assert summary.endswith("float32 (--dtype)")
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    ids = model.generate(torch.tensor([tok.encode("猫は")]), max_new_tokens=6, do_sample=False)
    assert out == tok.decode(ids[0], skip_special_tokens=True) + "\n"
    _, summary = generate(["猫は", "--greedy", "--max-new-tokens", "2", "--quantize", "int8"], capsys)
    assert summary.endswith("float32 (auto: the int8 layers take float32 activations)")
    _, summary = generate(["猫は", "--greedy", "--max-new-tokens", "2", "--dtype", "bfloat16"], capsys)
    assert summary.endswith("bfloat16 (--dtype)")


def test_generate_applies_the_measured_kernel_choice_at_any_row_count(capsys, monkeypatch):
    """One row a step too: on an AMX Xeon the measured plan takes oneDNN on blocked weights for a bf16 row
    (1.18x the whole batch-1 decode); where F.linear is fastest the plan keeps it."""
    import neoxja.kernels

    applied = []
    monkeypatch.setattr(neoxja.kernels, "choose_linear_kernels", lambda model, **kw: applied.append(model) or model)
    generate(["猫", "--greedy", "--max-new-tokens", "2"], capsys)  # streaming, one row a step
    assert len(applied) == 1
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("猫\n犬\n"))
    generate(["--greedy", "--max-new-tokens", "2", "--no-stream", "--dtype", "float32"], capsys)
    assert len(applied) == 2
    generate(["猫", "--greedy", "--max-new-tokens", "2", "--quantize", "int8"], capsys)
    assert len(applied) == 3  # called, and a quantized model has nothing it applies to (test_kernels)


# ----------------------------------------------------------------------------- neoxja train


@pytest.mark.parametrize("amx,expected", [(True, "bfloat16"), (False, "float32")])
def test_train_auto_follows_the_cpu(cpu_has_bf16, amx, expected):
    from neoxja.train.cli import parse_args

    cpu_has_bf16(amx)
    base = ["--data", "d", "--out", "o", "--model-config", "{}", "--steps", "1", "--batch-size", "1",
            "--seq-len", "8", "--device", "cpu"]
    for extra in ([], ["--dtype", "auto"]):
        args = parse_args(base + extra)
        assert args.dtype == expected and args.dtype_reason.startswith("auto: ")
    args = parse_args(base + ["--dtype", "float16"])
    assert (args.dtype, args.dtype_reason) == ("float16", "--dtype")


@pytest.fixture(scope="module")
def data(tmp_path_factory, bundled_dir):
    return prepare_data(tmp_path_factory.mktemp("bf16"), bundled_dir)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bf16_autocast_loss_curve_stays_within_noise_of_float32(data, tmp_path, capsys, one_thread):
    """The same run (seed, data order, 60 AdamW steps at a high learning rate) in float32 and with bf16
    autocast (float32 master weights). Tolerance: the float32 curve's own step-to-step noise (standard
    deviation of the loss around its 5-step moving average, ~0.03 here): batch-to-batch variation that
    every curve has anyway. bf16 must stay inside it at every step (measured max 0.002-0.006, bf16's
    8-bit mantissa perturbs each product by ~0.4% and AdamW normalises the resulting gradient error) and on
    average over the last 20 steps within a third of it. It must also differ at all (autocast was on) and
    train (the loss falls from ln(vocab) ~ 9 to under 4)."""
    config = {**TINY, "hidden_size": 64}
    curves = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert train_here(*train_args(data, out, config=config, dtype=dtype, steps=60, batch_size=8, seq_len=32,
                                      lr=3e-3, warmup_steps=5, seed=1)) == 0
        assert f"dtype {dtype}" in capsys.readouterr().out
        curves[dtype] = np.array(losses(out))
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    smooth = np.convolve(fp32, np.ones(5) / 5, mode="valid")  # (56,)
    noise = float(np.std(fp32[2:-2] - smooth))
    diff = bf16 - fp32
    assert 0.01 < noise < 0.2, noise  # a sane yardstick
    assert np.abs(diff).max() < noise, (np.abs(diff).max(), noise)
    assert abs(diff[-20:].mean()) < noise / 3, (diff[-20:].mean(), noise)
    assert np.abs(diff).max() > 0  # bf16 autocast changed the numbers: it was on
    assert fp32[0] > 8 and fp32[-1] < 4 and bf16[-1] < 4
