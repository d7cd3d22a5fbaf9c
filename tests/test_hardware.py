"""neoxja.preferred_dtype: every branch, with torch's feature checks mocked; the real answer on this machine."""

from __future__ import annotations

import pytest
import torch

import neoxja
from neoxja import hardware


@pytest.fixture
def cpu_features(monkeypatch):
    """Set what torch reports about the CPU: features(amx=..., avx512_bf16=...); None removes the check."""

    def set_features(amx, avx512_bf16):
        for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
            if value is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)
            else:
                monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)

    return set_features


@pytest.mark.parametrize("amx,avx512_bf16,expected,reason", [
    (True, True, torch.bfloat16, "this CPU has AMX-BF16"),
    (True, False, torch.bfloat16, "this CPU has AMX-BF16"),
    (False, True, torch.bfloat16, "this CPU has AVX512-BF16"),
    (False, False, torch.float32, "neither AMX-BF16 nor AVX512-BF16"),
    (None, None, torch.float32, "neither AMX-BF16 nor AVX512-BF16"),  # a torch without the checks
    (None, True, torch.bfloat16, "this CPU has AVX512-BF16"),
])
def test_cpu_branches(cpu_features, amx, avx512_bf16, expected, reason):
    cpu_features(amx, avx512_bf16)
    for device in ("cpu", torch.device("cpu")):
        assert neoxja.preferred_dtype(device) is expected
        dtype, why = hardware.dtype_choice(device)
        assert dtype is expected and reason in why


def test_a_cpu_without_bf16_names_its_capability(cpu_features, monkeypatch):
    cpu_features(False, False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware.dtype_choice("cpu") == (torch.float32, "this CPU (AVX2) has neither AMX-BF16 nor AVX512-BF16")


@pytest.mark.parametrize("available,bf16,expected", [
    (True, True, torch.bfloat16), (True, False, torch.float32), (False, True, torch.float32),
])
def test_cuda_branches(monkeypatch, cpu_features, available, bf16, expected):
    cpu_features(True, True)  # the CPU's answer must not leak into the GPU's
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: (asked.append(including_emulation), bf16)[1])
    for device in ("cuda", "cuda:1"):
        dtype, why = hardware.dtype_choice(device)
        assert dtype is expected
        assert device in why
    assert all(flag is False for flag in asked)  # emulated bf16 (pre-Ampere) is not the fast precision
    assert bool(asked) == available


def test_other_devices_are_float32(cpu_features):
    cpu_features(True, True)
    for device in ("mps", "meta"):
        assert hardware.dtype_choice(device) == (torch.float32, f"no bfloat16 rule for {device} devices")


def test_bad_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="nonsense"):
        neoxja.preferred_dtype("nonsense")


def test_this_machine_agrees_with_proc_cpuinfo():
    """The unmocked answer against the flags the kernel reports (Linux): bf16 iff amx_bf16 or avx512_bf16."""
    try:
        flags = set(open("/proc/cpuinfo", encoding="utf-8").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo on this OS")
    expected = torch.bfloat16 if flags & {"amx_bf16", "avx512_bf16"} else torch.float32
    assert neoxja.preferred_dtype("cpu") is expected


def test_from_pretrained_auto_keeps_the_checkpoint_dtype(bundled_dir):
    """transformers' meaning of dtype="auto" (the checkpoint records float16), whatever the CPU prefers."""
    from neoxja import GPTNeoXJapaneseForCausalLM

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype="auto")
    assert model.dtype == torch.float16
