"""neoxja's int4 weight-only product for CPUs with AVX512-BF16: build, layout and op.

torch's int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`) is bound by its own unpacking, not by memory:
on the AVX512-BF16 EPYC it streamed 30-35 GB/s of packed weights where FBGEMM streams 40-47 GB/s of int8
ones, so int4 decoded only 1.16-1.23x int8 (docs/quantization.md), and neither torch nor a wheel on PyPI
ships a faster x86 int4 product. `csrc/int4_avx512_bf16.c` is that product: a nibble becomes a bfloat16 by
one table lookup and `vdpbf16ps` multiplies 32 of them by 32 activations into float32 sums; the group's
bfloat16 scale and zero apply once per group. Its sums are float32-exact for the bfloat16 activations (the dequantized weights are
never rounded), unlike torch's kernel, which is within ~3e-3 of them.

The C source is compiled on first use with the system's C compiler (`$CC`, else `cc`; the same compiler
torch.compile's inductor needs) into `$NEOXJA_KERNEL_CACHE` (default `~/.cache/neoxja/kernels`), named by a
hash of the source, the flags and the compiler's version, and loaded with ctypes. It links OpenMP
(`libgomp.so.1`, the runtime torch already loaded) and runs on torch's thread count.

`available()` says whether it can run here and why not; `neoxja.quantization` uses it for
`quantize(model, "int4", kernel="auto")`. Imports nothing of neoxja's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "pack", "linear", "TILE_ROWS", "BLOCK"]

SOURCE = Path(__file__).with_name("csrc") / "int4_avx512_bf16.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-shared", "-fPIC")
TILE_ROWS = 4  # R in the C source: weight rows per tile
BLOCK = 64  # columns per block: a group holds whole blocks


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _cache_dir() -> Path:
    root = os.environ.get("NEOXJA_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neoxja" / "kernels"


def available() -> tuple[bool, str]:
    """(whether the kernel can run on this machine, why not). Compiles it on the first call that can."""
    if not (getattr(torch.cpu, "_is_avx512_bf16_supported", None) and torch.cpu._is_avx512_bf16_supported()):
        return False, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AVX512-BF16"
    try:
        _library()
    except (OSError, RuntimeError) as e:
        return False, str(e)
    return True, "this CPU has AVX512-BF16"


@functools.cache
def _library() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH) to build {SOURCE.name}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + repr(FLAGS).encode() + version.encode()).hexdigest()[:16]
    path = _cache_dir() / f"int4_avx512_bf16-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # built aside, renamed in one step
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"building {SOURCE} with {cc} failed:\n{done.stderr.strip()}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    fn = lib.neoxja_int4_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    return lib


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) in [0, 15], bfloat16 scales and zeros (N, K/G) (w = (q - 8) * scale + zero) -> the kernel's
    (weights (N/4, K/2 * 4) uint8, (scale, zero) pairs (N/4, K/G, 4, 2) as the int16 bits of bfloat16, so
    that model.to(dtype) leaves them as they are).

    N must be a multiple of TILE_ROWS (pad the rows first) and G of BLOCK."""
    N, K = q.shape
    R = TILE_ROWS
    q = q.to(torch.uint8).reshape(N // R, R, K // BLOCK, 2, BLOCK // 2)  # (tiles, R, blocks, halves, 32)
    packed = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # (tiles, R, blocks, 32): column j low, j + 32 high
    packed = packed.transpose(1, 2).reshape(N // R, K // 2 * R).contiguous()  # (tiles, blocks * R * 32)
    sz = torch.stack([scales.to(torch.bfloat16), zeros.to(torch.bfloat16)], dim=-1)  # (N, K/G, 2)
    sz = sz.reshape(N // R, R, -1, 2).transpose(1, 2).contiguous()  # (tiles, K/G, R, 2)
    return packed, sz.view(torch.int16)


def linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) bfloat16 -> (M, N) float32, N = the packed (padded) row count."""
    for name, t, dtype in (("x", x, torch.bfloat16), ("packed", packed, torch.uint8),
                           ("scales_and_zeros", scales_and_zeros, torch.int16)):
        if t.device.type != "cpu" or t.dtype != dtype:
            raise ValueError(f"neoxja's int4 CPU kernel takes {name} as a CPU tensor of {dtype}, got "
                             f"{t.dtype} on {t.device}")
    if x.dim() != 2 or packed.dim() != 2 or group_size <= 0:
        raise ValueError(f"neoxja's int4 CPU kernel takes x (M, K), packed (N/4, 2K) and a positive group size, "
                         f"got {tuple(x.shape)}, {tuple(packed.shape)}, {group_size}")
    M, K = x.shape
    if packed.shape[1] * 2 != K * TILE_ROWS or not (packed.is_contiguous() and scales_and_zeros.is_contiguous()):
        raise ValueError(f"x has {K} columns; the packed weight's shape {tuple(packed.shape)} does not match "
                         f"(or a tensor is not contiguous)")
    N = packed.shape[0] * TILE_ROWS
    if K % group_size or scales_and_zeros.numel() != 2 * N * (K // group_size):
        raise ValueError(f"group_size {group_size} does not match the layout: {K} columns, "
                         f"{scales_and_zeros.numel() // 2} scales for {N} rows")
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    if M:
        rc = _library().neoxja_int4_linear(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(),
                                           y.data_ptr(), M, N, K, group_size, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"neoxja_int4_linear refused M={M} N={N} K={K} group_size={group_size}")
    return y


@torch.library.custom_op("neoxja::int4_avx512_linear", mutates_args=())
def linear_op(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """`linear` as an opaque op, for compiled graphs (ctypes calls cannot be traced)."""
    return linear(x, packed, scales_and_zeros, group_size)


@linear_op.register_fake
def _(x, packed, scales_and_zeros, group_size):
    return x.new_empty((x.shape[0], packed.shape[0] * TILE_ROWS), dtype=torch.float32)
