"""Post-training int8 quantization of a loaded model, applied from outside the model code.

`quantize(model, "int8")` replaces every `nn.Linear` (including the LM head `embed_out`) with an
`Int8DynamicLinear`: weights stored as int8, symmetric, one scale per output channel; activations
quantized dynamically (per call) to 8 bits; the product runs in FBGEMM's int8 GEMM with int32
accumulation (`torch.ops.quantized.linear_dynamic`, the kernel behind
`torch.ao.quantization.quantize_dynamic`).

Why this kernel: decoding reads every weight once per token, so a kernel that reads int8 weights (4x fewer
bytes) is what makes it faster. A 2560x10240 matrix times a vector on a 2-core AVX2 machine: float32
9.7 ms, `torch._weight_int8pack_mm` 78 ms, FBGEMM dynamic int8 1.4 ms. On this project's 2-core AVX-512
(VNNI) machine: float32 4.6 ms, FBGEMM 1.3-1.5 ms; `torch._int_mm` (1.7 ms) and oneDNN's
`qlinear_pointwise` (1.3 ms for the kernel alone, 1.8 ms with the activation quantization around it) are
no faster.

FBGEMM runs on CPU only; a model on another device is refused with a clear error.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

SUPPORTED_MODES = ("none", "int8")


class Int8DynamicLinear(nn.Module):
    """y = x W^T (+ b) with W in int8 (per-output-channel symmetric scales) and x quantized on the fly.

    Holds only FBGEMM's packed weight (int8 plus its per-channel scales), so it takes a quarter of the
    float32 memory. It has no parameters and no state_dict entries: a quantized model is for inference;
    save the float model instead.
    """

    def __init__(self, packed_params, in_features: int, out_features: int):
        super().__init__()
        self._packed = packed_params  # torch.ops.quantized LinearPackedParams (opaque, CPU)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        weight = linear.weight.detach().float()  # (out, in)
        qweight, _ = quantize_weight_per_channel(weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return cls(packed, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: activations use 7 bits, which keeps FBGEMM's AVX2 u8*s8 pair sums from
        # saturating int16 (the same setting quantize_dynamic uses on x86).
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, True)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for, (out, in) -- for inspection and tests."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel (FBGEMM)"


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale_j = max_i |W_ji| / 127, q = round(W / scale) in [-127, 127].

    Returns (quantized tensor for FBGEMM, scales)."""
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch marks its quantized tensor type as deprecated in favour of torchao; the FBGEMM
        # kernels it feeds are still the fastest int8 path on x86 CPUs. Do not repeat that to users.
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
    return qweight, scales


def quantize(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantize `model` in place and return it. `mode`: "int8" or "none" (no change).

    Every nn.Linear is replaced, one at a time so that each float weight can be freed as soon as its
    int8 copy exists (peak memory stays near the float model's). Tied embeddings: the input embedding
    keeps its float weight (it is a lookup, not a matmul); only the LM head is quantized.
    """
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported quantization mode {mode!r}; expected one of {SUPPORTED_MODES}")
    if mode == "none":
        return model
    for param in model.parameters():
        if param.device.type != "cpu":
            raise ValueError(
                f"int8 quantization uses FBGEMM, which runs on CPU only, but the model is on {param.device}; "
                "move it to the CPU first (model.to('cpu')) or do not quantize"
            )
        break
    if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("this PyTorch build has no FBGEMM/x86 quantized engine, so int8 is unavailable")

    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Int8DynamicLinear.from_float(linear))
        del linear  # the float weight goes now, unless something else (a tied embedding) holds it
    model.quantization = mode
    return model
