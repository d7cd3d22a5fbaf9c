"""Faster kernels for skinny weight products on the CPU, chosen by measuring this machine once.

    from neoxja.kernels import choose_linear_kernels
    choose_linear_kernels(model)      # after from_pretrained (and before or instead of quantize)

Decoding a batch multiplies a few rows (one per sequence) by every weight. F.linear (MKL's sgemm) is slow at
that shape on some CPUs: on this project's 2-core AVX-512 machine, 4-12 rows ran at a third of the memory
bandwidth those products are bound by, where a torch.bmm against 16-row slices of the weight (MKL's batched
small products, which read the weight in place without packing a copy) was 1.5-2x faster and oneDNN's
linear (the op torch.compile uses on CPU) 1.7-2.7x faster at 13-64 rows; on a Xeon with AMX, oneDNN's linear
on a blocked copy of the weight ("packed", which costs that copy's memory) won from 2-4 rows on, and at one
row torch.mv (ATen's gemv) streamed a bfloat16 weight 1.2-1.7x faster than F.linear; where the CPU has
AVX512-BF16, neoxja's own one-row bfloat16 product ("gemv", neoxja.native) costs a few microseconds where the
libraries' calls cost 15-50, and streams large weights as fast as the best of them. Which kernel
wins, and from how many rows, depends on the CPU, the thread count, the dtype and the weight's shape, so
nothing here is a constant: the first call times the candidates on the model's own weights, read from memory
as a decoding step reads them, for a grid of row counts, and caches the winners (a JSON file keyed by CPU,
torch version, threads, dtype, shape and leave to pack; see `cache_path`). Later calls on the same machine
read the table.

The transform is applied from outside, like `quantize`: every CPU float `nn.Linear` of the model becomes a
`SkinnyLinear` (a subclass, holding the same Parameter objects: state_dict, tied weights, save_pretrained
and quantize are unaffected). Its forward takes the measured kernel only without autograd, on CPU inputs
of the weight's dtype, for row counts the table covers; everything else (training, prefill longer than the
grid, other devices) is F.linear, i.e. exactly nn.Linear. Every kernel computes the same product; the
results differ from F.linear's in rounding only (the sums are ordered differently), which the measurement
checks before it trusts a kernel. `benchmarks/bench_skinny_linear.py` prints the timings of the multi-row
kernels (float32), and with --plan the measured plan per shape.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from neoxja import native
from neoxja._ops import define_op

__all__ = ["SkinnyLinear", "blocked_copy", "release_blocked_copies", "choose_linear_kernels", "restore_linear",
           "measure_plan", "KERNELS", "ROW_GRID", "onednn_dtypes"]

ROW_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # row counts timed; a count between uses the one below
SLICE = 16  # weight rows per batched product of the bmm kernel
MEASURE_ROWS = 4096  # output rows timed at most: a taller weight is timed on its first 4096 rows (a view),
                     # which ranks the kernels as the whole does (each streams the rows alike) at a fraction
                     # of the cost (the 2.7B LM head has 32000)
CACHE_VERSION = 6  # 2: the "packed" kernel; 3: medians of calls read from memory; 4: the "mv" kernel;
                   # 5: timed in runs of BLOCK calls; 6: the "gemv" kernel
WORKING_SET_CAP = 1 << 30  # bytes of weight copies measure_plan rotates over at most (and an eighth of memory)
BLOCK = 2  # consecutive calls of one kernel per timed sample (measure_plan)
PACK_HINT = 2  # the row count oneDNN's blocked layout is made for (1, 2 and 64 measured alike at 1-256 rows)


# ----------------------------------------------------------------------------------------------------------
# the kernels: (rows, in) x (out, in)^T -> (rows, out), weight read in place


def _linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x2, weight, bias)


def _bmm16(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows, n_in = x2.shape
    w = weight.view(-1, SLICE, n_in)  # (out/16, 16, in)
    y = torch.bmm(x2.expand(w.shape[0], rows, n_in), w.transpose(1, 2))  # (out/16, rows, 16)
    y = y.transpose(0, 1).reshape(rows, weight.shape[0])  # (rows, out)
    return y if bias is None else y + bias


def _mv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # for one row (ONE_ROW_KERNELS; more rows go to F.linear): torch's matrix-vector product, whose bfloat16
    # kernel on CPU (ATen's reduced-precision gemv, float32 sums) streams the weight faster than oneDNN's
    # one-row bfloat16 matmul
    if x2.shape[0] != 1:
        return F.linear(x2, weight, bias)
    y = torch.mv(weight, x2[0]).unsqueeze(0)  # (1, out)
    return y if bias is None else y + bias


def _gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # for one bfloat16 row (ONE_ROW_KERNELS; more rows go to F.linear): neoxja's own product for AVX512-BF16
    # CPUs (neoxja.native.bf16_gemv, C), whose fixed cost is a few microseconds, not the libraries' 15-50
    if x2.shape[0] != 1:
        return F.linear(x2, weight, bias)
    return native.bf16_gemv(x2, weight, bias)  # (1, out)


def _onednn(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [None], "")  # (rows, out)


def _packed(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn(x2, blocked_copy(weight), bias)  # (rows, out)


# "packed" is oneDNN's linear on a blocked copy of the weight (blocked_copy: made once, looked up per call).
# Unpacked, oneDNN reorders the weight into its layout at every call, which at a few rows costs
# as much as the product. On a 2-core Xeon with AMX it won from 2-4 rows on in bfloat16 and from 4 rows on in
# float32, and batch-8 greedy decoding of the 2.7B width went 108-117 -> 133 tok/s (bf16), 53-60 -> 65
# (float32); at one row in bfloat16 its median call was 1.11-1.28x F.linear's (batch-1 decode 21.3 -> 24.1).
# On a 2-core AMD EPYC with AVX512-BF16 (2026-12-03), one row in bfloat16 at the 2.7B shapes: 1.0-1.7 ms
# against F.linear's 2.5-3.3 (2560x7680, 10240x2560, 2560x10240), 6.6 against 9.5 for the 32000x2560 head.
# "mv" is torch.mv: on the 2-core Xeon with AMX, a one-row bfloat16 product streamed its weight at 24-27 GB/s
# where F.linear (oneDNN) reached 16-21 (1.22-1.68x, the 2.7B shapes); in float32 the two were within 8%.
# "gemv" is neoxja.native.bf16_gemv: on the 2-core AVX512-BF16 EPYC (2026-12-03), one bfloat16 row: 256x256
# 5 us against packed 19 and F.linear 23; 8000x256 (the bundled LM head) 63 against 80 and 165; 2560x10240
# 1.4 ms against 2.1 and 3.0; 32000x2560 7.0 against 8.1 and 10.2 (in cache: a scratch script).
KERNELS = {"linear": _linear, "bmm16": _bmm16, "onednn": _onednn, "packed": _packed, "mv": _mv, "gemv": _gemv}
ONE_ROW_KERNELS = {"mv", "gemv"}  # kernels that take exactly one row: timed and planned for rows == 1 only
ONEDNN_KERNELS = {"onednn", "packed"}  # kernels that need oneDNN to run in the weight's dtype


def linear_fake(x2: torch.Tensor, weight: torch.Tensor, *_) -> torch.Tensor:
    """The fake (meta) implementation of a product op (x2 (rows, in), weight (out, in), ...) -> (rows, out):
    what torch.compile traces in its place. Shared by neoxja::skinny_linear and neoxja::row_invariant_linear."""
    return x2.new_empty(x2.shape[0], weight.shape[0])


_skinny_linear_op = None  # the custom op, once registered


def skinny_linear_op():
    """KERNELS[kernel](x2, weight, bias) as the custom op neoxja::skinny_linear: how a compiled SkinnyLinear
    calls its plan's plain kernels, opaque to inductor. Registered on first use, not at import; SkinnyLinear
    registers it when it is made, because registering cannot happen while dynamo traces."""
    global _skinny_linear_op
    if _skinny_linear_op is None:
        _skinny_linear_op = define_op("skinny_linear", "(Tensor x2, Tensor weight, Tensor? bias, str kernel) -> Tensor",
                                      lambda x2, weight, bias, kernel: KERNELS[kernel](x2, weight, bias),
                                      linear_fake)
    return _skinny_linear_op


def inductor_generates(weight: torch.Tensor) -> bool:
    """Whether inductor's decompose_mm_pass (on in generation.DECODE_COMPILE_OPTIONS) writes a one-row product
    with this weight itself: on CPU, when both sides are at most its CPU_MAX_OTHER_DIMENSION_DECOMPOSITION."""
    try:
        from torch._inductor.fx_passes.decompose_mem_bound_mm import CPU_MAX_OTHER_DIMENSION_DECOMPOSITION as most
    except ImportError:  # a torch that moved it: its value in torch 2.13
        most = 2048
    return max(weight.shape) <= most


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_dtypes() -> frozenset:
    """The dtypes in which oneDNN's linear, on a plain and on a blocked weight, runs on this CPU. float32
    wherever oneDNN is in the build; bfloat16 and float16 only where the CPU has the instructions oneDNN's
    kernels for them need: on an AVX2-only CPU, oneDNN refuses them ("bf16 path needs the cpu support
    avx_ne_convert or avx512bw, avx512vl and avx512dq"). Found once per process by trying a tiny product."""
    if not onednn_linear_available():
        return frozenset()
    found = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = torch.ones(2, 16, dtype=dtype), torch.ones(16, 16, dtype=dtype)
        try:
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
            torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT), None,
                                               "none", [None], "")
        except RuntimeError:
            continue
        found.add(dtype)
    return frozenset(found)


def candidates(weight: torch.Tensor, pack: bool = False) -> list[str]:
    """The kernels that can take this weight: linear and mv (one row only) always, gemv (one row only) for a
    bfloat16 weight where neoxja's own kernel runs (AVX512-BF16, a C compiler), bmm16 if out % 16 == 0,
    onednn if oneDNN runs in the weight's dtype on this CPU, packed also needs leave to keep a second copy
    of the weight (pack)."""
    names = ["linear", "mv"]
    if weight.dtype == torch.bfloat16 and weight.is_contiguous() and native.available()[0]:
        names.append("gemv")
    if weight.shape[0] % SLICE == 0:
        names.append("bmm16")
    if weight.dtype in onednn_dtypes():
        names.append("onednn")
        if pack:
            names.append("packed")
    return names


_BLOCKED: dict[tuple[int, torch.dtype], tuple] = {}  # (id(weight), dtype) -> (weakref, state, storage, copy)
_FINALIZERS: dict[int, weakref.finalize] = {}  # id(weight) -> what drops its copies when it is freed


def blocked_copy(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A oneDNN-blocked copy of `weight` (out, in), in `dtype` (default: the weight's):
    `torch.ops.mkldnn._reorder_linear_weight`, the same values in oneDNN's layout (oneDNN's products with it
    equal those with the plain weight bit for bit from two rows on). Made on first use and kept while the
    weight lives; remade when the weight changes: its version counter moved (an in-place write through the
    Parameter: an optimizer step, load_state_dict) or its data was replaced (`model.to(dtype)` swaps a
    Parameter's data without moving its version; the entry holds the storage it was made from, so a new one
    cannot reuse its address and pass for it). Not seen: a write through `weight.data` (torch counts none):
    call release_blocked_copies(weight) after one. Looked up by the weight at every call, so the custom ops a
    compiled graph calls find the current copy too: nothing is made inside a graph. A new copy drops the
    weight's copies made from data it no longer holds; release_blocked_copies(weight) frees them all sooner."""
    dtype = dtype or weight.dtype
    key = (id(weight), dtype)
    state = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape))
    entry = _BLOCKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[3]
    with torch.no_grad():
        copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACK_HINT)
    for other in [k for k in list(_BLOCKED) if k[0] == key[0] and k != key]:  # made from data no longer held
        old = _BLOCKED.get(other)
        if old is not None and old[1] != state:
            _BLOCKED.pop(other, None)
    finalizer = _FINALIZERS.get(key[0])
    if finalizer is None or finalizer.peek() is None or finalizer.peek()[0] is not weight:
        _FINALIZERS[key[0]] = weakref.finalize(weight, _forget, key[0])  # once per weight
    _BLOCKED[key] = (weakref.ref(weight), state, weight.untyped_storage(), copy)
    return copy


def _forget(weight_id: int) -> None:
    release_blocked_copies(weight_id)
    _FINALIZERS.pop(weight_id, None)


def release_blocked_copies(weight: torch.Tensor | int) -> None:
    """Free the blocked copies of `weight` (in every dtype) now, not when the weight is freed."""
    weight_id = weight if isinstance(weight, int) else id(weight)
    for key in [k for k in list(_BLOCKED) if k[0] == weight_id]:  # list(): a snapshot, other threads may add
        _BLOCKED.pop(key, None)


def memory_bytes() -> int:
    """This machine's physical memory (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume little
        return 0


def pack_fits(modules) -> bool:
    """prepack="auto": blocked copies of these modules' weights take at most a quarter of the memory."""
    unique = {id(m.weight): m.weight for m in modules}.values()
    return sum(_nbytes(w) for w in unique) <= memory_bytes() / 4


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------------------
# the module


class BlockedCopyLinear(nn.Linear):
    """An nn.Linear whose products may use its weight's blocked copies (blocked_copy): .to(), .cuda() and the
    like release them first, since they replace the data the copies were made from (which each copy holds)."""

    def _apply(self, fn, recurse=True):
        release_blocked_copies(self.weight)
        return super()._apply(fn, recurse)


class SkinnyLinear(BlockedCopyLinear):
    """nn.Linear whose inference products on few rows use the kernel measured fastest for them.

    `plan` maps a row count of ROW_GRID to a kernel name; rows above the grid's top, autograd, other
    devices and other dtypes take F.linear. "packed" keeps a blocked copy of the weight (blocked_copy), made
    the first time a row count uses it. Under torch.compile, a one-row plan's kernel (mv, gemv, bmm16 or packed; not
    onednn) on a weight inductor does not generate itself runs as the custom op neoxja::skinny_linear;
    everything else is F.linear."""

    plan: dict[int, str]
    onednn_dtypes: frozenset
    gemv_runs: bool

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: dict[int, str]) -> "SkinnyLinear":
        with torch.device("meta"):  # no allocation: the Parameters are the original ones
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new.plan = dict(plan)
        new.onednn_dtypes = onednn_dtypes()  # found now: forward reads it, under torch.compile too (which cannot probe)
        new.gemv_runs = native.available()[0]  # likewise (a cached plan may name gemv where it cannot run)
        skinny_linear_op()  # registered now: forward may run under torch.compile
        return new

    def runs(self, name: str, dtype: torch.dtype) -> bool:
        """Whether the plan's kernel `name` runs here in `dtype`: oneDNN's only in the dtypes oneDNN runs on
        this CPU, gemv only in bfloat16 where neoxja's library runs (a plan measured in another dtype, after
        model.to(dtype), or read from a cache shared with another machine, falls back to F.linear)."""
        if name in ONEDNN_KERNELS:
            return dtype in self.onednn_dtypes
        if name == "gemv":
            return dtype == torch.bfloat16 and self.gemv_runs
        return True

    def kernel_for(self, rows: int) -> str:
        """The plan's kernel for `rows`: that of the largest grid point <= rows; F.linear above the grid."""
        if rows > ROW_GRID[-1] or rows < 1:
            return "linear"
        point = max(r for r in ROW_GRID if r <= rows)
        return self.plan.get(point, "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (rows and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == self.weight.dtype and self.weight.is_contiguous()):
            if not torch.compiler.is_compiling():
                name = self.kernel_for(rows)
                if not self.runs(name, x.dtype):
                    name = "linear"  # a plan measured in another dtype (model.to(dtype) after it was made)
                if name != "linear":
                    x2 = x.reshape(rows, self.in_features).contiguous()  # (rows, in)
                    return KERNELS[name](x2, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
            # Under torch.compile only one row's plan is used (a symbolic row count is >= 2, so this asks no
            # question of it, and several row counts share one graph), and only on a weight inductor does not
            # generate itself: one-row products with small weights are inductor's (it writes them itself, which
            # makes compiled decoding of small models fast; the bundled model's step was 2.5x slower with every
            # product through this op), and so is oneDNN's linear on a plain weight. The kernel runs as the
            # opaque op neoxja::skinny_linear, which inductor neither decomposes nor re-lowers (its own lowering
            # of aten.mv made the 2.7B bf16 step 2x slower than with F.linear); "packed" finds its blocked copy
            # inside the op (made outside any graph). With "packed" compiled, the 2.7B width's bf16 one-row
            # step went 15.0 -> 25.7 tok/s on a 2-core AVX512-BF16 EPYC (eager with the plan: 23.6).
            elif rows == 1:
                name = self.plan.get(1, "linear")
                if name not in ("linear", "onednn") and not inductor_generates(self.weight) and self.runs(name, x.dtype):
                    y = _skinny_linear_op(x.reshape(1, self.in_features), self.weight, self.bias, name)  # (1, out)
                    return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        changes = [f"{r}:{k}" for r, k in sorted(self.plan.items()) if k != "linear"]
        return super().extra_repr() + f", kernels={{{', '.join(changes)}}}"


# ----------------------------------------------------------------------------------------------------------
# measuring


def _same_product(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the rounding of a reordered sum (bfloat16 keeps 8 bits, float32 24)."""
    tol = 2e-2 if expected.dtype in (torch.bfloat16, torch.float16) else 1e-4
    scale = expected.float().abs().max().item() + 1e-30
    return bool(((got.float() - expected.float()).abs().max() <= tol * scale).item())


@torch.no_grad()
def measure_plan(weight: torch.Tensor, bias: torch.Tensor | None = None, repeats: int = 4,
                 rows_grid: tuple[int, ...] = ROW_GRID, timer=time.perf_counter, pack: bool = False,
                 working_set: int = 0) -> dict[int, str]:
    """Time each candidate kernel on `weight` (out, in) for each row count of the grid; the fastest per count.

    Each kernel is first checked against F.linear on random rows (a kernel that fails or disagrees is not
    used; the check is also its warm-up). Timings are interleaved kernel by kernel, `repeats` rounds of BLOCK
    consecutive calls each (a kernel's first call after another kernel's ran slower: torch.mv's one-row bf16
    product 2.63 ms against 2.30 in a run of calls, on the AMX Xeon, which ranked oneDNN's 2.52 first where
    a decoding step of mv calls was faster), and the median of each counts: read from memory, a kernel's
    calls vary (F.linear's bf16 one-row product on the AMX Xeon took 0.72-1.12 ms on the same weight), and its
    luckiest call ranked it first where its typical one, and the 2.7B decode that uses it, were 10-20% slower. F.linear wins unless another kernel is over 10%
    faster: a change of kernel must pay.
    pack: also time "packed" (oneDNN on a blocked copy, which the caller will have to keep).

    working_set: the bytes of weight a decoding step streams (the model's; plans_for passes it, capped). The
    timed calls rotate over enough copies of the weight to cover it, so that a kernel is timed reading its
    weight from memory, as in a step, and not from a cache that held the previous call's: the 2.7B layers'
    weights fit this project's Xeon's 480 MB L3 one at a time, where the ranking of kernels differs."""
    names = candidates(weight, pack)  # of the whole weight (bmm16 needs its row count divisible by 16)
    weight = weight.detach()[:MEASURE_ROWS]  # (min(out, 4096), in), a view
    bias = None if bias is None else bias.detach()[:MEASURE_ROWS]
    copies = [weight] + [weight.clone() for _ in range(min(64, -(-working_set // _nbytes(weight))) - 1)]
    if "packed" in names:
        try:
            for w in copies:  # made before any timing ("packed" looks them up per call, as in use)
                blocked_copy(w)
        except RuntimeError:  # a oneDNN build that cannot block this dtype
            names.remove("packed")
    turn = 0
    generator = torch.Generator().manual_seed(0)
    plan: dict[int, str] = {}
    for rows in rows_grid:
        x = torch.randn(rows, weight.shape[1], generator=generator).to(weight.dtype)  # (rows, in)
        expected = F.linear(x, weight, bias)
        usable = []
        for name in names:
            if name in ONE_ROW_KERNELS and rows != 1:
                continue
            try:
                if _same_product(KERNELS[name](x, copies[0], bias), expected):
                    KERNELS[name](x, copies[0], bias)  # a second untimed call: oneDNN's first ones are slower
                    usable.append(name)
            except RuntimeError:  # e.g. a oneDNN build without this dtype
                pass
        times = {name: [] for name in usable}
        for _ in range(repeats):
            for name in usable:
                t = timer()
                for _ in range(BLOCK):
                    KERNELS[name](x, copies[turn % len(copies)], bias)  # the copy read least recently
                    turn += 1
                times[name].append((timer() - t) / BLOCK)
        best = {name: statistics.median(ts) for name, ts in times.items()}
        winner = min(best, key=best.get)
        plan[rows] = winner if best[winner] < 0.9 * best["linear"] else "linear"
    return plan


def machine_key() -> str:
    """What the timings depend on besides the weight: CPU model, ISA level torch dispatches to, threads,
    torch build."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux: the CPU's marketing name, where known
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}|{torch.backends.cpu.get_cpu_capability()}|threads={torch.get_num_threads()}"
            f"|cpus={os.cpu_count()}|torch={torch.__version__}")


def cache_path() -> Path:
    """$NEOXJA_KERNEL_CACHE, else $XDG_CACHE_HOME/neoxja/linear_kernels.json (~/.cache by default)."""
    explicit = os.environ.get("NEOXJA_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "neoxja" / "linear_kernels.json"


def _read_cache(path: Path) -> dict:
    """The cached plans, or {} when the file is absent, unreadable or not this version's layout (then the
    plans are measured again and the file rewritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("plans"), dict):
        return {}
    return data["plans"]


def _valid_plan(entry) -> dict[int, str] | None:
    if not isinstance(entry, dict):
        return None
    try:
        plan = {int(rows): name for rows, name in entry.items()}
    except (TypeError, ValueError):
        return None
    if set(plan) != set(ROW_GRID) or not all(name in KERNELS for name in plan.values()) \
            or any(name in ONE_ROW_KERNELS and rows != 1 for rows, name in plan.items()):
        return None
    return plan


def _write_cache(path: Path, plans: dict) -> None:
    """Atomically (a temporary file renamed into place); a cache that cannot be written is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "plans": plans}, indent=1, sort_keys=True),
                       encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass


def plans_for(shapes: list[tuple[torch.Tensor, torch.Tensor | None]], cache: Path | None | bool = None,
              measure=None, pack: bool = False, on_measure=None) -> dict[tuple, dict[int, str]]:
    """{(out, in, dtype name): plan} for the distinct weights given, from the cache or measured (once per
    machine key, shape, dtype and leave to pack) and added to it. cache=False: measure, keep nothing.
    on_measure(path): called once before the first measurement (path: where the result will be cached, or None)."""
    measure = measure or measure_plan
    path = cache_path() if cache is None else cache
    stored = _read_cache(path) if path else {}
    machine = machine_key()
    plans, measured = {}, False
    working_set = min(sum(_nbytes(w) for w in {id(w): w for w, _ in shapes}.values()), WORKING_SET_CAP,
                      memory_bytes() // 8)
    for weight, bias in shapes:
        shape = (weight.shape[0], weight.shape[1], str(weight.dtype).removeprefix("torch."))
        if shape in plans:
            continue
        key = f"{machine}|{shape[2]}|{shape[0]}x{shape[1]}" + ("|pack" if pack else "")
        plan = _valid_plan(stored.get(key))
        if plan is None:
            if not measured and on_measure is not None:
                on_measure(path or None)
            plan = measure(weight, bias, pack=pack, working_set=working_set)
            stored[key] = {str(rows): name for rows, name in plan.items()}
            measured = True
        plans[shape] = plan
    if path and measured:
        _write_cache(path, stored)
    return plans


# ----------------------------------------------------------------------------------------------------------
# the transform


def _eligible(module: nn.Module) -> bool:
    return (type(module) in (nn.Linear, SkinnyLinear) and module.weight.device.type == "cpu" and module.weight.is_floating_point()
            and module.weight.dim() == 2)


def choose_linear_kernels(model: nn.Module, cache: Path | None | bool = None, pack: bool | str = "auto",
                          on_measure=None) -> nn.Module:
    """Give every CPU float nn.Linear of `model` the skinny-product kernels measured fastest on this machine
    (in place; returns the model). The first call per machine, dtype and weight shape times the kernels
    (seconds for the 2.7B shapes) and caches the result; later calls only read it. A model with nothing
    eligible (on a GPU, or quantized) is returned unchanged. Calling it again (say after `model.to(dtype)`)
    re-plans the layers for their current dtype.

    pack: whether the "packed" kernel may be chosen, which keeps a oneDNN-blocked copy of each weight that
    uses it (up to twice the weights' memory); "auto": when the copies take at most a quarter of this
    machine's memory (a 2.7B model in bfloat16, 5.4 GB, packs on a 24 GB machine; in float32 it does not).
    on_measure(path): called before a measurement starts (11-15 s at the 2.7B shapes on a 2-core Xeon), so a
    command can say why it waits."""
    if pack not in (True, False, "auto"):
        raise ValueError(f"pack must be True, False or 'auto', got {pack!r}")
    names = [name for name, module in model.named_modules() if _eligible(module)]
    if not names:
        return model
    modules = [model.get_submodule(name) for name in names]
    if pack == "auto":
        pack = pack_fits(modules)
    plans = plans_for([(m.weight, m.bias) for m in modules], cache=cache, pack=pack, on_measure=on_measure)
    for name, linear in zip(names, modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shape = (linear.out_features, linear.in_features, str(linear.weight.dtype).removeprefix("torch."))
        if isinstance(linear, SkinnyLinear):
            linear.plan = dict(plans[shape])
            release_blocked_copies(linear.weight)
        else:
            setattr(parent, child, SkinnyLinear.from_linear(linear, plans[shape]))
    return model


def restore_linear(model: nn.Module) -> nn.Module:
    """Undo choose_linear_kernels: every SkinnyLinear back to a plain nn.Linear (same Parameters)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SkinnyLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("meta"):
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            plain.train(module.training)
            setattr(parent, child, plain)
            release_blocked_copies(module.weight)
    return model
