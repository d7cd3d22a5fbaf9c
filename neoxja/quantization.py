"""Post-training quantization of a loaded model, applied from outside the model code.

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

`quantize(model, "int4", group_size=128)` replaces every `nn.Linear` with an `Int4WeightOnlyLinear`: weights
as 4-bit integers, asymmetric, one bfloat16 scale and zero per group of `group_size` input columns of a row
(gpt-fast's and torchao's int4 weight-only scheme); activations stay float and go through the kernel in
bfloat16 (float32 on the "avx2" kernel). Three kernels (`kernel=`, chosen once when quantizing; "auto" by default, the first that runs):
- "avx512_bf16", neoxja's own (`neoxja.native`, C built on first use), where the CPU has AVX512-BF16 and
  the groups hold 64 or more columns: torch's CPU kernel is bound by its own unpacking, and ours streams the
  weights fast enough for int4 to decode ~1.5x int8 (docs/quantization.md);
- "avx2", neoxja's own for CPUs with AVX2 but no AVX512-BF16 (same layout and groups): the activations are
  quantized to int8 per group inside the kernel (as llama.cpp's Q4_0 x Q8_0), so it adds their rounding to
  the weights' (held-out bits/char stays within the goal, tests/test_quantization.py);
- "torch", the kernels torch ships: `torch._weight_int4pack_mm_for_cpu` on CPU, the tinygemm
  `torch._weight_int4pack_mm` on CUDA, and wherever ours cannot run. torchao's int4 weight-only layout for
  CPU calls the same CPU kernel, and its PyPI wheel carries no other x86 kernel.

`load_quantized(path, "int4")` quantizes while loading, one linear layer at a time, so that a float copy of
the whole model never exists (the 2.7B model is ~1.5 GB in int4 and 10.8 GB in float32).
"""

from __future__ import annotations

import itertools
import os
import warnings
import weakref

import torch
from torch import nn

from neoxja import native
from neoxja._ops import define_op

SUPPORTED_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 kernels take
DEFAULT_INT4_GROUP_SIZE = 128


class Int8DynamicLinear(nn.Module):
    """y = x W^T (+ b) with W in int8 (per-output-channel symmetric scales) and x quantized on the fly.

    Holds only FBGEMM's packed weight (int8 plus its per-channel scales), so it takes a quarter of the
    float32 memory. It has no parameters and no state_dict entries: a quantized model is for inference;
    save the float model instead.

    Under torch.compile the product goes through the custom op `neoxja::int8_dynamic_linear`, which names
    the packed weight by a key (`_PACKED`; a module's `_packed` is not reassigned after construction): dynamo
    cannot trace FBGEMM's packed-weight object, and called directly it broke the graph at every layer (the
    compiled int8 decode step was no faster than eager).
    """

    def __init__(self, packed_params, in_features: int, out_features: int):
        super().__init__()
        self._packed = packed_params  # torch.ops.quantized LinearPackedParams (opaque, CPU)
        self.in_features = in_features
        self.out_features = out_features
        self._register()

    def _register(self) -> None:
        int8_dynamic_linear_op()  # registered now: forward may run under torch.compile
        self._key = next(_PACKED_KEYS)
        _PACKED[self._key] = self._packed
        weakref.finalize(self, _PACKED.pop, self._key, None)  # the entry goes with the module

    def __setstate__(self, state):  # copy.deepcopy and unpickling: a key of its own, not the original's
        super().__setstate__(state)
        self._register()

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        weight = linear.weight.detach().float()  # (out, in)
        qweight, _ = quantize_weight_per_channel(weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return cls(packed, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = _int8_dynamic_linear_op(x.float(), self._key, self.out_features)
        else:
            y = _fbgemm_dynamic_linear(x.float(), self._packed)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for, (out, in) -- for inspection and tests."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel (FBGEMM)"


_PACKED: dict[int, object] = {}  # key -> FBGEMM packed weight of a live Int8DynamicLinear
_PACKED_KEYS = itertools.count()


def _fbgemm_dynamic_linear(x: torch.Tensor, packed) -> torch.Tensor:
    # reduce_range: activations use 7 bits, which keeps FBGEMM's AVX2 u8*s8 pair sums from saturating int16
    # (the same setting quantize_dynamic uses on x86)
    return torch.ops.quantized.linear_dynamic(x, packed, True)


_int8_dynamic_linear_op = None  # the custom op, once registered


def int8_dynamic_linear_op():
    """FBGEMM's dynamic int8 linear on the packed weight `key` names, as the custom op
    neoxja::int8_dynamic_linear(x, key, out_features): an op torch.compile keeps whole in its graph. Registered
    on first use, not at import (Int8DynamicLinear registers it when it is made: registering cannot happen
    while dynamo traces). The key is a constant of the graph, so each int8 model compiles its own graph
    (dynamo's recompile limit, 8 by default, bounds how many one process compiles)."""
    global _int8_dynamic_linear_op
    if _int8_dynamic_linear_op is None:
        def int8_dynamic_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
            packed = _PACKED.get(key)
            if packed is None:
                raise RuntimeError(f"neoxja::int8_dynamic_linear: no int8 layer with key {key} (the module was "
                                   f"freed)")
            return _fbgemm_dynamic_linear(x, packed)

        def fake(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
            return x.new_empty(*x.shape[:-1], out_features)

        _int8_dynamic_linear_op = define_op("int8_dynamic_linear", "(Tensor x, int key, int out_features) -> Tensor",
                                            int8_dynamic_linear, fake)
    return _int8_dynamic_linear_op


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


def _check_mode(mode, group_size, kernel="auto"):
    if not isinstance(mode, str) or mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported quantization mode {mode!r}; expected one of {SUPPORTED_MODES}")
    _check_kernel_name(kernel)
    if kernel != "auto" and mode != "int4":
        raise ValueError(f"kernel={kernel!r} applies to int4 only, not to {mode!r}")
    if group_size is not None:
        if mode != "int4":
            raise ValueError(f"group_size applies to int4 only, not to {mode!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} (what torch's int4 kernels take), "
                             f"got {group_size!r}")


def _check_device(device: torch.device, mode: str):
    if mode == "int8" and device.type != "cpu":
        raise ValueError(
            f"int8 quantization uses FBGEMM, which runs on CPU only, but the model is on {device}; "
            "move it to the CPU first (model.to('cpu')) or do not quantize")
    if mode == "int4" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"int4 quantization runs on CPU or CUDA (torch's int4 kernels), but the model is on "
                         f"{device}; move it first (model.to('cpu'))")
    if mode == "int8" and not ({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)):
        raise RuntimeError("this PyTorch build has no FBGEMM/x86 quantized engine, so int8 is unavailable")


def _quantized_linear(linear: nn.Linear, mode: str, group_size: int | None, name: str, kernel: str) -> nn.Module:
    if mode == "int8":
        return Int8DynamicLinear.from_float(linear)
    return Int4WeightOnlyLinear.from_float(linear, group_size or DEFAULT_INT4_GROUP_SIZE, name=name, kernel=kernel)


def _replace_linear(model: nn.Module, name: str, mode: str, group_size: int | None, kernel: str = "auto") -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    setattr(parent, child, _quantized_linear(linear, mode, group_size, name, kernel))
    # the float weight goes with `linear` now, unless something else (a tied embedding) holds it


def quantize(model: nn.Module, mode: str = "int8", group_size: int | None = None, kernel: str = "auto") -> nn.Module:
    """Quantize `model` in place and return it. `mode`: "int8", "int4" or "none" (no change).

    `group_size` (int4 only; 32, 64, 128 or 256, default 128): input columns sharing one scale and zero.
    `kernel` (int4 only): "auto" (neoxja's AVX512-BF16 CPU kernel where it runs, else its AVX2 one, else
    torch's), "torch", "avx512_bf16" or "avx2" (an error where it cannot run); see `choose_int4_kernel`.
    Every nn.Linear is replaced, one at a time so that each float weight can be freed as soon as its
    quantized copy exists (peak memory stays near the float model's). Tied embeddings: the input embedding
    keeps its float weight (it is a lookup, not a matmul); only the LM head is quantized. A model is
    quantized once: quantizing it again is an error (its float weights are gone).
    """
    _check_mode(mode, group_size, kernel)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize takes a torch nn.Module, got {type(model).__name__}")
    if mode == "none":
        return model
    done = getattr(model, "quantization", "none")
    if done != "none":
        raise ValueError(f"this model is already quantized ({done}); load the float model again to quantize "
                         f"it as {mode}")
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer to quantize")
    device = model.get_submodule(names[0]).weight.device
    _check_device(device, mode)
    # every layer is checked before any is replaced: an error leaves the model as it was
    if mode == "int4":
        kernel = choose_int4_kernel(kernel, device, group_size or DEFAULT_INT4_GROUP_SIZE)
        for name in names:
            Int4WeightOnlyLinear.check_shape(model.get_submodule(name), group_size or DEFAULT_INT4_GROUP_SIZE, name)
    for name in names:
        _replace_linear(model, name, mode, group_size, kernel)
    model.quantization = mode
    return model


# ----------------------------------------------------------------------------------------------------------
# int4 weight-only


def int4_group_params(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along each row: (q (N, K) int32 in [0, 15], scales (N, K/g), zeros (N, K/g)),
    scales and zeros in bfloat16, with w ~ (q - 8) * scale + zero (the tinygemm convention).

    scale = (max - min) / 15 and zero = min + 8 * scale over each group, rounded to bfloat16 first; q is
    then rounded against the rounded values, so the error of a weight is at most scale / 2 plus the
    bfloat16 rounding of the zero (which can push the ends of a group's range outside the grid)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, groups, g)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, groups)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.int32).reshape(N, K)
    return q, scales, zeros


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, two per byte: even column in the high nibble (the input
    `torch.ops.aten._convert_weight_to_int4pack` takes on CUDA)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4_pairs: (N, K/2) uint8 -> (N, K) int32."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


class Int4WeightOnlyLinear(nn.Module):
    """y = x W^T (+ b) with W in 4 bits, asymmetric per group of `group_size` input columns.

    Holds the kernel's packed weight (half a byte per weight), the group scales and zeros in the kernel's
    layout, and the bias if any. The product runs on bfloat16 activations (float32 on the "avx2" kernel); its
    output is cast back to the input's dtype. No state_dict entries: a quantized model is for inference.

    `kernel` (chosen when quantizing, see `choose_int4_kernel`):
    - "torch": torch's kernels, `torch._weight_int4pack_mm_for_cpu` on CPU, tinygemm's `_weight_int4pack_mm`
      on CUDA; scales and zeros as one bfloat16 (K/g, N, 2) tensor (held as int16 bits, so that model.to(dtype)
      leaves them alone). CPU: output rows padded to a multiple of
      16 (the kernel's tile) and sliced off again.
    - "avx512_bf16": neoxja's CPU kernel (`neoxja.native`, AVX512-BF16 and VNNI, groups of a multiple of 64):
      weights in panels of 16 rows, the scale and zero pairs (N/16, K/g, 2, 16) as the int16 bits of bfloat16
      (so that model.to(dtype) leaves them); bfloat16 activations quantized to int8 per group inside the
      kernel, exact integer sums, the same rows padding and slicing. Under torch.compile it is the opaque op
      `neoxja::int4_avx512_linear`.
    - "avx2": neoxja's CPU kernel for AVX2 (`neoxja.native`), the same layout and arithmetic on float32
      activations. Under torch.compile the opaque op `neoxja::int4_avx2_linear`.
    """

    ROW_CHUNK = 1024  # rows quantized and packed at a time; a multiple of the CPU packing's 64-row blocks

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                 bias: torch.Tensor | None, in_features: int, out_features: int, group_size: int,
                 kernel: str = "torch"):
        super().__init__()
        self.kernel = kernel
        if kernel in native.ISAS:
            native.int4_linear_op(kernel)  # registered now: registering cannot happen while dynamo traces
        self.register_buffer("packed", packed, persistent=False)
        # bfloat16 (scale, zero) pairs held as their int16 bits, so that model.to(dtype) leaves them alone
        self.register_buffer("scales_and_zeros", scales_and_zeros.view(torch.int16), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    @staticmethod
    def check_shape(linear: nn.Linear, group_size: int, name: str = "linear layer") -> None:
        K = linear.in_features
        if K % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide the {K} input features of {name}; "
                             f"choose a group size that does (one of {INT4_GROUP_SIZES})")
        if linear.weight.device.type == "cuda" and (K % 64 or linear.out_features % 8):
            raise ValueError(f"{name}: the CUDA int4 kernel needs in_features % 64 == 0 and out_features % 8 == 0, "
                             f"got {K} and {linear.out_features}")

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                   name: str = "linear layer", kernel: str = "auto") -> "Int4WeightOnlyLinear":
        cls.check_shape(linear, group_size, name)
        weight = linear.weight.detach()
        device = weight.device
        kernel = choose_int4_kernel(kernel, device, group_size)
        N, K = weight.shape
        pad = -N % 16 if device.type == "cpu" else 0
        if pad:
            weight = torch.cat([weight, weight.new_zeros(pad, K)])
        # rows in chunks: the float32 and int32 temporaries stay ~10-40 MB instead of several times the
        # largest weight (the CPU packings work on row blocks of 64 and 16, so chunks of ROW_CHUNK rows pack alike)
        chunks = range(0, weight.shape[0], cls.ROW_CHUNK)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if kernel in native.ISAS:  # neoxja's layout, written into the final tensors chunk by chunk: no concatenated copy
            P = native.PANEL_ROWS
            packed = torch.empty(weight.shape[0] // P, K // 2 * P, dtype=torch.uint8, device=device)
            scales_and_zeros = torch.empty(weight.shape[0] // P, K // group_size, 2, P, dtype=torch.int16,
                                           device=device)
            for start in chunks:
                q, scales, zeros = int4_group_params(weight[start:start + cls.ROW_CHUNK], group_size)
                panels = slice(start // P, (start + q.shape[0]) // P)
                packed[panels], scales_and_zeros[panels] = native.pack_int4(q, scales, zeros)
            return cls(packed, scales_and_zeros, bias, K, linear.out_features, group_size, kernel)
        packed, scales_and_zeros = [], []
        for start in chunks:
            q, scales, zeros = int4_group_params(weight[start:start + cls.ROW_CHUNK], group_size)
            scales_and_zeros.append(torch.stack([scales, zeros], dim=-1))  # (rows, K/g, 2)
            if device.type == "cuda":
                packed.append(pack_int4_pairs(q))
            else:
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            del q, scales, zeros
        packed = torch.cat(packed)
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)  # inner K tiles: 8
        scales_and_zeros = torch.cat(scales_and_zeros).transpose(0, 1).contiguous()  # (K/g, N, 2)
        return cls(packed, scales_and_zeros, bias, K, linear.out_features, group_size, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(native.INT4_ACTIVATIONS.get(self.kernel, torch.bfloat16))  # (B*T, K)
        if self.kernel in native.ISAS:
            if torch.compiler.is_compiling():
                y = native.int4_linear_op(self.kernel)(x2, self.packed, self.scales_and_zeros, self.group_size)
            else:
                y = native.int4_linear(x2, self.packed, self.scales_and_zeros, self.group_size, self.kernel)
        elif self.packed.device.type == "cuda":
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros.view(torch.bfloat16))
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                  self.scales_and_zeros.view(torch.bfloat16))
        y = y[:, :self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int4 one stands for, (out, in), computed through the kernel (x = identity). On
        neoxja's kernels each identity row is quantized to 127 with scale 1/127, so an entry carries that scale's
        float rounding (a few ulps) besides the float32 product's."""
        eye = torch.eye(self.in_features, device=self.packed.device)  # exact in bfloat16; float32 out
        bias, self.bias = self.bias, None
        try:
            return self(eye).T.contiguous()  # one term each: the kernel's dequantized weight
        finally:
            self.bias = bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weight-only, group_size={self.group_size}, kernel={self.kernel}")


INT4_KERNELS = ("auto", "torch", *native.ISAS)


def _check_kernel_name(kernel) -> None:
    if not isinstance(kernel, str) or kernel not in INT4_KERNELS:
        raise ValueError(f"unknown int4 kernel {kernel!r}; expected one of {INT4_KERNELS}")


def choose_int4_kernel(kernel: str, device: torch.device | str, group_size: int) -> str:
    """The int4 kernel `kernel` names, on `device`, for `group_size`: "auto" is the first of neoxja's
    "avx512_bf16" and "avx2" that runs (a CPU with its instructions, a C compiler, groups of 64 or more),
    else torch's. Naming one of neoxja's where it cannot run is an error that says why."""
    _check_kernel_name(kernel)
    if kernel == "torch":
        return kernel
    device = torch.device(device)
    if device.type != "cpu":
        why = f"it runs on CPU, not on {device}"
    elif group_size % native.BLOCK:
        why = f"it takes groups of a multiple of {native.BLOCK} columns, not {group_size}"
    else:
        for isa in native.ISAS if kernel == "auto" else (kernel,):
            ok, why = native.available(isa)
            if ok:
                return isa
            if native.cpu_supported(isa) and kernel == "auto":  # a CPU it is for, where it could not be built
                warnings.warn(f"neoxja's int4 kernel for this CPU is unavailable ({why}); using torch's int4 "
                              f"kernel, which decodes slower here", RuntimeWarning, stacklevel=3)
                break
    if kernel == "auto":
        return "torch"
    raise ValueError(f"the int4 kernel {kernel!r} cannot run here: {why}")


# ----------------------------------------------------------------------------------------------------------
# quantizing while loading


class LayerwiseQuantizer:
    """The hook `neoxja.checkpoint.load_pretrained(..., quantize=...)` calls: after each tensor is loaded,
    `hook(model, module_name)`; a linear layer whose parameters are all loaded is quantized at once, so the
    float model never exists whole. `hook.finish(model)` after the last (and after tying embeddings)
    quantizes what is left: a tied LM head, whose weight is the float input embedding anyway."""

    def __init__(self, mode: str, group_size: int | None = None, kernel: str = "auto"):
        _check_mode(mode, group_size, kernel)
        if mode == "none":
            raise ValueError("quantizing while loading needs a mode other than 'none'")
        self.mode, self.group_size, self.kernel = mode, group_size, kernel
        self.peak_float_bytes = 0  # largest float weight held at once, for tests and reports

    def __call__(self, model: nn.Module, module_name: str) -> None:
        module = model.get_submodule(module_name)
        if not isinstance(module, nn.Linear) or any(p.is_meta for p in module.parameters()):
            return
        if getattr(model.config, "tie_word_embeddings", False) and module is model.get_output_embeddings():
            return  # tied: wait until the loader has tied it to the input embedding
        _check_device(module.weight.device, self.mode)
        self.peak_float_bytes = max(self.peak_float_bytes, module.weight.numel() * module.weight.element_size())
        if self.mode == "int4":  # chosen once, on the first layer's device
            self.kernel = choose_int4_kernel(self.kernel, module.weight.device,
                                             self.group_size or DEFAULT_INT4_GROUP_SIZE)
        _replace_linear(model, module_name, self.mode, self.group_size, self.kernel)

    def finish(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                _check_device(module.weight.device, self.mode)
                _replace_linear(model, name, self.mode, self.group_size, self.kernel)
        model.quantization = self.mode
        return model


def load_quantized(name_or_path: str | os.PathLike, mode: str = "int4", group_size: int | None = None,
                   dtype=None, device=None, kernel: str = "auto", **kwargs) -> nn.Module:
    """from_pretrained and quantize in one pass: each linear layer is quantized as soon as it is loaded.

    int4 computes in bfloat16, so its default dtype (for embeddings, norms and activations) is bfloat16, except
    on neoxja's AVX2 kernel, which takes float32 activations (an AVX2 CPU has no bfloat16 arithmetic): float32
    there; int8 (FBGEMM) computes in float32 and defaults to float32."""
    from neoxja.checkpoint import load_pretrained
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    hook = LayerwiseQuantizer(mode, group_size, kernel)
    if mode == "int4":  # chosen now: a kernel that cannot run here is refused before anything is read
        kernel = hook.kernel = choose_int4_kernel(kernel, device or "cpu", group_size or DEFAULT_INT4_GROUP_SIZE)
    if dtype is None:
        dtype = native.INT4_ACTIVATIONS.get(kernel, torch.bfloat16) if mode == "int4" else torch.float32
    return load_pretrained(GPTNeoXJapaneseForCausalLM, name_or_path, dtype=dtype, device=device,
                           quantize=hook, **kwargs)
