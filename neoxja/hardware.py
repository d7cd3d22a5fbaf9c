"""The fast precision for a device, asked of torch (no /proc/cpuinfo parsing).

    neoxja.preferred_dtype("cpu")      # torch.bfloat16 on a CPU with AMX-BF16 or AVX512-BF16, else float32
    neoxja.preferred_dtype("cuda")     # torch.bfloat16 where the GPU supports it, else float32

`dtype_choice(device)` returns the same dtype with the reason, for the CLI's summary lines
(`--dtype auto`). `from_pretrained(dtype="auto")` is unrelated: it keeps transformers' meaning, the dtype
the checkpoint records; pass `dtype=neoxja.preferred_dtype(device)` for the fast precision.

On the CPU, bfloat16 pays where the matrix units take it natively: AMX tiles (Sapphire Rapids and later)
multiply bf16 at several times the float32 rate, and AVX512-BF16 (Cooper Lake, Zen 4) at about twice;
decoding, which streams the weights, reads half the bytes either way. Without these instructions oneDNN
emulates bf16 with conversions, which is slower than float32, so float32 stays.
"""

from __future__ import annotations

import torch

__all__ = ["preferred_dtype", "dtype_choice", "cpu_bf16_feature"]


def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bfloat16 fast here, as torch reports it: "AMX-BF16", "AVX512-BF16" or None.

    torch's own checks (cpuinfo, the ones its oneDNN dispatch trusts): `torch.cpu._is_amx_tile_supported`
    and `torch.cpu._is_avx512_bf16_supported`. A build without them answers None (float32: never a
    regression)."""
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return "AMX-BF16"
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    if avx512_bf16 is not None and avx512_bf16():
        return "AVX512-BF16"
    return None


def dtype_choice(device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """(the fast dtype for `device`, why), e.g. (torch.bfloat16, "this CPU has AMX-BF16")."""
    device = torch.device(device)
    if device.type == "cpu":
        feature = cpu_bf16_feature()
        if feature is not None:
            return torch.bfloat16, f"this CPU has {feature}"
        capability = torch.backends.cpu.get_cpu_capability()
        return torch.float32, f"this CPU ({capability}) has neither AMX-BF16 nor AVX512-BF16"
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"{device} supports bfloat16"
        return torch.float32, f"{device} does not support bfloat16 natively"
    return torch.float32, f"no bfloat16 rule for {device.type} devices"


def preferred_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The fast precision for `device`: bfloat16 on a CPU with AMX-BF16 or AVX512-BF16 and on a CUDA device
    that supports it, float32 otherwise."""
    return dtype_choice(device)[0]
