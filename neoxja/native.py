"""neoxja's own CPU products, in C: the int4 weight-only product for AVX512-BF16 CPUs and one for AVX2 CPUs
(build, layout, ops), and a one-row bfloat16 product (`bf16_gemv`, a candidate of neoxja.kernels' measured
choice).

torch's int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`) is bound by its own unpacking, not by memory:
on the AVX512-BF16 EPYC it streamed 30-35 GB/s of packed weights where FBGEMM streams 40-47 GB/s of int8
ones, so int4 decoded only 1.16-1.23x int8 (docs/quantization.md), and on an AVX2 CPU 0.81x; neither torch
nor a wheel on PyPI ships a faster x86 int4 product. Two kernels here, on one packed layout (panels of 16
rows whose 64-byte chunks are 16 rows' column quads twice over, in the low and the high nibbles:
csrc/int4_layout.h), with one arithmetic, llama.cpp's Q4_0 x Q8_0: each group of activations is quantized to
int8 with one float scale (round(x * 127 / max|x|)), the nibbles are multiplied by those integers in exact
integer sums, each group's sum becomes float once, times the weight's and the activations' scales, and the
offset (zero - 8 * scale) multiplies the group's float sum of the original activations. The activations'
rounding to 8 bits is the only error beyond float32 sums (at most half their group's scale per activation;
torch's kernel rounds the dequantized weights to bfloat16 instead). Every output element takes the same
operations in the same order whatever the number of rows in the call: a row's result does not depend on the
other rows (batch invariance).
- `csrc/avx512_bf16.c` (kernel "avx512_bf16", for CPUs with AVX512-BF16 and AVX512-VNNI): `vpdpbusd`,
  64 multiply-adds per instruction; bfloat16 activations.
- `csrc/avx2.c` (kernel "avx2", for CPUs with AVX2 and FMA but no AVX512-BF16): `vpmaddubsw`; float32
  activations (an AVX2 CPU has no bfloat16 arithmetic).

Each C source is compiled on first use with the system's C compiler (`$CC`, which may carry arguments, else
`cc`), with its own instruction-set flags, into a library of its own in `$NEOXJA_BUILD_CACHE` (default
`$XDG_CACHE_HOME/neoxja/build`, `~/.cache` by default), named by a hash of the source, the flags and the
compiler's version, and loaded with ctypes; a cached library that does not load is rebuilt once. A failed
build is remembered for the process. Each kernel asks the CPU for its instructions at every call. It links
OpenMP (`libgomp.so.1`: with GCC and torch's wheels, the runtime torch has already loaded; a second OpenMP
runtime in the process is warned about) and runs on torch's thread count. The custom ops for compiled graphs
(`neoxja::int4_avx512_linear`, `neoxja::int4_avx2_linear`) are registered on first use, not at import.

`available(isa)` says whether a kernel can run on this machine and why not; `neoxja.quantization` uses it
for `quantize(model, "int4", kernel="auto")` and `neoxja.kernels` for its "gemv" candidate. Imports only
neoxja._ops (the operators' definition).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from neoxja._ops import define_op

__all__ = ["available", "cpu_supported", "pack_int4", "int4_linear", "int4_linear_op", "bf16_gemv", "PANEL_ROWS",
           "BLOCK", "ISAS"]

CSRC = Path(__file__).with_name("csrc")
ISAS = ("avx512_bf16", "avx2")  # the instruction sets of the kernels, as the int4 kernels are named
ISA_NAMES = {"avx512_bf16": "AVX512-BF16", "avx2": "AVX2"}
# one library per instruction set, each from its source with the instructions it may use: an AVX2 CPU never
# runs the AVX-512 one's code, and a compiler that cannot build one (GCC < 10 has no -mavx512bf16) still
# builds the other
SOURCES = {"avx512_bf16": (CSRC / "avx512_bf16.c",
                           ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma")),
           "avx2": (CSRC / "avx2.c", ("-mavx2", "-mfma"))}
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
FUNCTIONS = {"avx512_bf16": (("neoxja_int4_linear", 4, 5), ("neoxja_bf16_gemv", 4, 3)),  # (name, pointers, ints)
             "avx2": (("neoxja_int4_linear_avx2", 4, 5),)}
INT4_FUNCTIONS = {isa: functions[0][0] for isa, functions in FUNCTIONS.items()}  # each library's int4 product
INT4_MAX_GROUP = 1 << 20  # a group's int32 sum of nibbles times int8 activations: at most G * 15 * 128 < 2**31
INT4_OPS = {"avx512_bf16": "int4_avx512_linear", "avx2": "int4_avx2_linear"}  # neoxja::<name> under torch.compile
INT4_ACTIVATIONS = {"avx512_bf16": torch.bfloat16, "avx2": torch.float32}  # the dtype each int4 kernel takes x in
PANEL_ROWS = 16  # P in the C sources: weight rows per panel of the packed layout
BLOCK = 64  # a group holds whole blocks of 64 columns
_INT_MAX = 2**31 - 1  # the C kernel's int arguments


def _check_isa(isa) -> None:
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; neoxja's kernels are for {ISAS}")


def cpu_supported(isa: str = "avx512_bf16") -> bool:
    """Whether this CPU has the instructions of the kernels for `isa`, by torch's own checks: AVX512-BF16
    and AVX512-VNNI (of the hardware); AVX2 and FMA (ATen's capability AVX2 or AVX512 needs both;
    ATEN_CPU_CAPABILITY, which can only lower it, lowers this too)."""
    _check_isa(isa)
    if isa == "avx2":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_vnni_supported")]
    return all(check is not None and check() for check in checks)  # (_is_vnni_supported: AVX512-VNNI)


def available(isa: str = "avx512_bf16") -> tuple[bool, str]:
    """(whether the kernels for `isa` can run on this machine, why not). Builds the library on the first call
    that can."""
    try:
        _library(isa)
    except RuntimeError as e:
        return False, str(e)
    return True, f"this CPU has {ISA_NAMES[isa]}"


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC") or "cc")
    found = shutil.which(cc[0]) if cc else None
    if found is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'!r} is not on PATH) to build "
                           f"neoxja's native kernels")
    return [found, *cc[1:]]


def _build_dir() -> Path:
    explicit = os.environ.get("NEOXJA_BUILD_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG rule: relative is unset
    return root / "neoxja" / "build"


def _build(cc: list[str], isa: str, path: Path) -> None:
    source, isa_flags = SOURCES[isa]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=path.parent)  # built aside, renamed in one step
    os.close(fd)
    try:
        done = subprocess.run([*cc, *FLAGS, *isa_flags, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {source} with {shlex.join(cc)} failed:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: readable by everyone sharing the cache
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(isa: str, path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, pointers, ints in FUNCTIONS[isa]:
        fn = getattr(lib, name)  # AttributeError: not our library
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * ints
    return lib


def _warn_if_two_openmp_runtimes() -> None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if any(name in line.rsplit("/", 1)[-1] for name in ("libgomp", "libomp", "libiomp"))}
    if len(runtimes) > 1:
        warnings.warn(f"neoxja's native kernels: two OpenMP runtimes in this process ({', '.join(sorted(runtimes))}); "
                      f"their thread pools may compete for the cores", RuntimeWarning, stacklevel=3)


@functools.cache
def _load(isa: str) -> ctypes.CDLL | RuntimeError:
    """The library for `isa`, or the reason it cannot be had (remembered: a failed build is not retried per
    call)."""
    source, isa_flags = SOURCES[isa]
    try:
        cc = _compiler()
        version = subprocess.run([cc[0], "--version"], capture_output=True, text=True).stdout
        headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # what the sources include
        key = hashlib.sha256(source.read_bytes() + headers + repr((cc, FLAGS, isa_flags)).encode()
                             + version.encode()).hexdigest()[:16]
        path = _build_dir() / f"{source.stem}-{key}.so"
        if not path.exists():
            _build(cc, isa, path)
        try:
            lib = _open(isa, path)
        except (OSError, AttributeError):  # a truncated or foreign file under our name: build it again, once
            _build(cc, isa, path)
            lib = _open(isa, path)
    except RuntimeError as e:
        return e
    except (OSError, AttributeError, ValueError) as e:  # ValueError: a $CC shlex cannot split
        return RuntimeError(f"cannot build or load {source.name}: {e}")
    _warn_if_two_openmp_runtimes()
    return lib


def _library(isa: str = "avx512_bf16") -> ctypes.CDLL:
    if not cpu_supported(isa):  # asked at every call, not remembered: only the build is
        lacking = ISA_NAMES[isa]
        if isa == "avx512_bf16" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            lacking = "AVX512-VNNI (which the AVX512-BF16 kernel also needs)"  # a VM that hides it, say
        raise RuntimeError(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no {lacking}")
    lib = _load(isa)
    if isinstance(lib, RuntimeError):
        raise RuntimeError(str(lib))
    return lib


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) in [0, 15], bfloat16 scales and zeros (N, K/G) (w = (q - 8) * scale + zero) -> the kernels'
    layout (csrc/int4_layout.h): weights (N/16, K/2 * 16) uint8, a panel of 16 rows per row, its bytes over the
    groups, a group's over G/8 chunks of 16 rows x 4 bytes, byte b of row l in chunk c holding column 4c + b
    of the group (low nibble) and column G/2 + 4c + b (high nibble); and the (scale, zero) pairs
    (N/16, K/G, 2, 16) as the int16 bits of bfloat16 (so that model.to(dtype) leaves them as they are).

    N must be a multiple of PANEL_ROWS (pad the rows first), K of G and G of BLOCK."""
    if q.dim() != 2 or scales.shape != zeros.shape or scales.dim() != 2 or scales.shape[0] != q.shape[0]:
        raise ValueError(f"pack takes q (N, K) and scales and zeros (N, K/G), got {tuple(q.shape)}, "
                         f"{tuple(scales.shape)}, {tuple(zeros.shape)}")
    N, K = q.shape
    P = PANEL_ROWS
    groups = scales.shape[1]
    if N % P or groups == 0 or K % groups or (K // groups) % BLOCK:
        raise ValueError(f"pack needs rows in multiples of {P} and groups of a multiple of {BLOCK} columns, got "
                         f"{N} rows, {K} columns in {groups} groups")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"q must hold 4-bit values in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    G = K // groups
    q = q.to(torch.uint8).reshape(N // P, P, groups, 2, G // 8, 4)  # (panels, P, groups, halves, chunks, 4)
    packed = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # (panels, P, groups, chunks, 4): low half low, high half high
    packed = packed.permute(0, 2, 3, 1, 4).reshape(N // P, K // 2 * P).contiguous()  # (panels, groups*chunks*P*4)
    sz = torch.stack([scales.to(torch.bfloat16), zeros.to(torch.bfloat16)], dim=1)  # (N, 2, K/G)
    sz = sz.reshape(N // P, P, 2, groups).permute(0, 3, 2, 1).contiguous()  # (panels, K/G, 2, P)
    return packed, sz.view(torch.int16)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                isa: str = "avx512_bf16") -> torch.Tensor:
    """x (M, K) -> (M, N) float32 on the CPU, N = the packed (padded) row count, by the kernel for `isa`
    ("avx512_bf16": x in bfloat16; "avx2": x in float32; the same layout). Everything the C kernel relies on
    is checked here first, so that no call reads or writes out of bounds."""
    _check_isa(isa)
    for name, t, dtype in (("x", x, INT4_ACTIVATIONS[isa]), ("packed", packed, torch.uint8),
                           ("scales_and_zeros", scales_and_zeros, torch.int16)):
        if t.device.type != "cpu" or t.dtype != dtype:
            raise ValueError(f"neoxja's int4 CPU kernel takes {name} as a CPU tensor of {dtype}, got {t.dtype} on "
                             f"{t.device}" + ("; an int4 layer quantized for this kernel runs on the CPU only: "
                                              "quantize the float model on that device instead"
                                              if t.device.type != "cpu" else ""))
    if x.dim() != 2 or packed.dim() != 2 or isinstance(group_size, bool) or not isinstance(group_size, int) \
            or group_size <= 0:
        raise ValueError(f"neoxja's int4 CPU kernel takes x (M, K), packed (N/16, 8K) and a positive group size, "
                         f"got {tuple(x.shape)}, {tuple(packed.shape)}, {group_size}")
    M, K = x.shape
    if packed.shape[1] * 2 != K * PANEL_ROWS or not (packed.is_contiguous() and scales_and_zeros.is_contiguous()):
        raise ValueError(f"x has {K} columns; the packed weight's shape {tuple(packed.shape)} does not match "
                         f"(or a tensor is not contiguous)")
    N = packed.shape[0] * PANEL_ROWS
    if K % group_size or scales_and_zeros.numel() != 2 * N * (K // group_size):
        raise ValueError(f"group_size {group_size} does not match the layout: {K} columns, "
                         f"{scales_and_zeros.numel() // 2} scales for {N} rows")
    if max(M, N, K) > _INT_MAX:
        raise ValueError(f"neoxja's int4 CPU kernel takes at most {_INT_MAX} rows or columns, got M={M} N={N} K={K}")
    if group_size > INT4_MAX_GROUP:
        raise ValueError(f"neoxja's int4 CPU kernels take groups of at most {INT4_MAX_GROUP} columns (a group's "
                         f"integer sums must fit 32 bits), got {group_size}")
    x = x.contiguous().resolve_neg().resolve_conj()
    y = torch.empty(M, N, dtype=torch.float32, device="cpu")  # not the default device, whatever it is
    if M and N:
        function = getattr(_library(isa), INT4_FUNCTIONS[isa])
        rc = function(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(), M, N, K,
                      group_size, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"{INT4_FUNCTIONS[isa]} refused M={M} N={N} K={K} group_size={group_size} (it takes "
                               f"groups of a multiple of {BLOCK} columns), or its memory for the quantized "
                               f"activations or the totals ran out")
    return y


_int4_linear_ops = {}  # isa -> its custom op, once registered


def int4_linear_op(isa: str = "avx512_bf16"):
    """`int4_linear` on the kernel for `isa` as the custom op neoxja::int4_avx512_linear or
    neoxja::int4_avx2_linear (x, packed, scales_and_zeros, group_size), opaque to torch.compile (a ctypes call
    cannot be traced). Registered on first use, not at import: the quantized layer registers it when it is
    made (registering cannot happen while dynamo traces)."""
    _check_isa(isa)
    if isa not in _int4_linear_ops:
        def product(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
            return int4_linear(x, packed, scales_and_zeros, group_size, isa)

        def fake(x, packed, scales_and_zeros, group_size):
            return x.new_empty((x.shape[0], packed.shape[0] * PANEL_ROWS), dtype=torch.float32)

        _int4_linear_ops[isa] = define_op(  # under define_op's lock: a second thread gets the same operator
            INT4_OPS[isa], "(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor", product, fake)
    return _int4_linear_ops[isa]


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One row: x (1, K) bfloat16 @ weight (N, K)^T (+ bias (N,)) -> (1, N) bfloat16, float32 sums rounded
    once. The weight is read in place (an nn.Linear weight, contiguous). neoxja.kernels offers it as the
    one-row kernel "gemv" and uses it where it measures fastest."""
    tensors = (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ())
    for name, t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.bfloat16 or not (t.is_contiguous() or name == "x"):
            raise ValueError(f"neoxja's bfloat16 product takes {name} as a contiguous CPU tensor of bfloat16, got "
                             f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or \
            (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"neoxja's bfloat16 product takes x (1, K), weight (N, K) and bias (N,), got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")
    N, K = weight.shape
    if max(N, K) > _INT_MAX:
        raise ValueError(f"neoxja's bfloat16 product takes at most {_INT_MAX} rows or columns, got {N} x {K}")
    x = x.contiguous().resolve_neg()
    weight = weight.resolve_neg()  # a negated view: its sign applied (a copy), not read past
    bias = None if bias is None else bias.resolve_neg()
    y = torch.empty(1, N, dtype=torch.bfloat16, device="cpu")
    if N and K:
        rc = _library().neoxja_bf16_gemv(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                         y.data_ptr(), N, K, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"neoxja_bf16_gemv refused N={N} K={K}")
    elif N:
        y = torch.zeros(1, N, dtype=torch.bfloat16, device="cpu") if bias is None else bias.clone().unsqueeze(0)
    return y
