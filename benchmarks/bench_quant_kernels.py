"""The weight products of one decoding step at batch 1, kernel by kernel (CPU): which kernel to quantize for.
With --rows M, the same products times M activation rows: a prefill chunk or a batch of M sequences.

One step at the 2.7B width with 4 layers reads, per layer, the qkv (7680x2560), attention output (2560x2560),
MLP up (10240x2560) and down (2560x10240) weights, then the LM head (32000x2560), each times one row. Every
round runs the whole set once per kernel, in a rotated order; printed: the best and median time of a set and
each kernel's speed relative to FBGEMM's dynamic int8 linear (what `quantize(model, "int8")` uses), as the
median of per-round ratios (a shared machine: load comes in bursts).

Kernels: float32 and bfloat16 F.linear; FBGEMM int8 (`torch.ops.quantized.linear_dynamic`, per-channel
weights, activations quantized per call); `torch._weight_int8pack_mm` (weight-only int8, bfloat16
activations); torch's CPU int4 kernel `torch._weight_int4pack_mm_for_cpu` at group sizes 32, 128, 256
(bfloat16 activations; with float32 activations it is tens of times slower); neoxja's own int4 kernels
(`neoxja.native`: "avx512_bf16", what `quantize(model, "int4")` chooses where it runs, and "avx2", its choice
on CPUs with AVX2 but no AVX512-BF16) at groups 128 and 256, each where this CPU runs it. To see what an AVX2
CPU gets on a newer one, cap every library at AVX2 (torch's kernels, FBGEMM, oneDNN):
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_quant_kernels.py
(the avx512_bf16 rows then show what AVX2 CPUs lack; the memory system stays this machine's);
with --compile, inductor's
code for gpt-fast's weight-only int8 linear (F.linear(x, w.to(x.dtype)) * scales), with freezing on.

With --int4-alternatives, two more ways to an int4 product from what torch ships (group 128, float32
activations), measured for issue 13's int4 goal and not used by neoxja:
  inductor nibbles  the product written in torch ops over packed nibbles (uint8, low nibble = column k, high
                    = column k + K/2; scale and minimum per group), compiled whole by torch.compile, which
                    fuses the unpacking, the multiply-add and the per-group scaling into one generated kernel;
  FBGEMM 4-bit bag  FBGEMM's 4-bit row-wise embedding bag (`quantized::embedding_bag_4bit_rowwise_offsets`) as
                    a matrix-vector product: the weight's transpose cut into rows of 128 outputs (fp16 scale
                    and bias each), bag j sums the K rows of output block j weighted by the activations.

    python benchmarks/bench_quant_kernels.py --rounds 15
    python benchmarks/bench_quant_kernels.py --rounds 15 --int4-alternatives
    python benchmarks/bench_quant_kernels.py --rounds 7 --rows 256   # a prefill chunk
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from neoxja import native  # noqa: E402
from neoxja.quantization import Int4WeightOnlyLinear, Int8DynamicLinear  # noqa: E402

from _cpu import cpu_flags  # noqa: E402  (benchmarks/ is the script's directory)

SHAPES = [(7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240)] * 4 + [(32000, 2560)]


def kernels(args) -> dict:
    g = torch.Generator().manual_seed(0)
    linears = []
    for n, k in SHAPES:
        linear = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        linears.append(linear)
    x32 = {k: torch.randn(args.rows, k, generator=g) for k in (2560, 10240)}
    x16 = {k: v.bfloat16() for k, v in x32.items()}
    out = {}
    int8 = [Int8DynamicLinear.from_float(m) for m in linears]
    out["FBGEMM int8"] = lambda: [q(x32[q.in_features]) for q in int8]
    for gs in (32, 128, 256):
        int4 = [Int4WeightOnlyLinear.from_float(m, gs, kernel="torch") for m in linears]
        out[f"int4 group {gs}"] = lambda int4=int4: [q(x16[q.in_features]) for q in int4]
    for isa in native.ISAS:
        ok, why = native.available(isa)
        if ok:
            for gs in (128, 256):
                int4 = [Int4WeightOnlyLinear.from_float(m, gs, kernel=isa) for m in linears]
                xs = x32 if isa == "avx2" else x16  # the activations each kernel takes (no casts around it)
                out[f"int4 neoxja {isa} group {gs}"] = lambda int4=int4, xs=xs: [q(xs[q.in_features]) for q in int4]
        else:
            print(f"neoxja's {isa} int4 kernel left out: {why}", flush=True)
    packs = []
    for m in linears:
        w = m.weight.detach()
        scales = w.abs().amax(dim=1) / 127
        packs.append((torch.round(w / scales[:, None]).to(torch.int8), scales.bfloat16()))
    out["_weight_int8pack_mm"] = lambda: [torch._weight_int8pack_mm(x16[w.shape[1]], w, s) for w, s in packs]
    w16 = [m.weight.detach().bfloat16() for m in linears]
    out["bfloat16"] = lambda: [F.linear(x16[w.shape[1]], w) for w in w16]
    w32 = [m.weight.detach() for m in linears]
    out["float32"] = lambda: [F.linear(x32[w.shape[1]], w) for w in w32]
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True

        class WeightOnlyInt8(torch.nn.Module):  # gpt-fast's WeightOnlyInt8Linear
            def __init__(self, w, s):
                super().__init__()
                self.register_buffer("weight", w)
                self.register_buffer("scales", s)

            def forward(self, x):
                return F.linear(x, self.weight.to(x.dtype)) * self.scales

        for dtype in (torch.float32, torch.bfloat16):
            xs = x32 if dtype == torch.float32 else x16
            mods = [torch.compile(WeightOnlyInt8(w, s.to(dtype)).eval()) for w, s in packs]
            out[f"inductor int8 ({str(dtype)[6:]})"] = lambda mods=mods, xs=xs: [
                m(xs[m._orig_mod.weight.shape[1]]) for m in mods]
    if args.int4_alternatives:
        nibbles = [int4_nibbles(m.weight.detach()) for m in linears]
        out["int4 inductor nibbles (group 128)"] = lambda: [f(x32[k]) for f, k in nibbles]
        bags = [int4_bag(m.weight.detach()) for m in linears]
        out["int4 FBGEMM 4-bit bag (128 outputs)"] = lambda: [f(x32[k]) for f, k in bags]
    return out


def int4_nibbles(w: torch.Tensor, group: int = 128):
    """(product, in_features): w (N, K) as packed nibbles, multiplied by a compiled torch function."""
    N, K = w.shape
    G = K // 2 // group  # groups in each half of the columns
    wg = w.view(N, K // group, group)
    low, high = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(1e-8) / 15
    q = ((wg - low) / scale).round().clamp(0, 15).to(torch.uint8).view(N, K)
    packed = (q[:, :K // 2] | (q[:, K // 2:] << 4)).contiguous()  # (N, K/2)
    scale, low = scale.view(N, K // group), low.view(N, K // group)

    @torch.compile(dynamic=False)
    def product(x):  # x (1, K) -> (1, N)
        xg = x.view(2, G, group)
        lo = (packed & 15).to(torch.float32).view(N, G, group)
        hi = (packed >> 4).to(torch.float32).view(N, G, group)
        sums = (lo * xg[0]).sum(-1) * scale[:, :G] + (hi * xg[1]).sum(-1) * scale[:, G:]  # (N, G)
        return (sums.sum(-1) + (low * x.view(K // group, group).sum(-1)).sum(-1)).view(1, N)

    return product, K


def int4_bag(w: torch.Tensor, block: int = 128):
    """(product, in_features): w (N, K) as FBGEMM 4-bit embedding rows, summed by an embedding bag."""
    N, K = w.shape
    rows = w.view(N // block, block, K).transpose(1, 2).reshape(N // block * K, block)  # row (j, k): W[jb:jb+b, k]
    packed = torch.ops.quantized.embedding_bag_4bit_prepack(rows.contiguous())
    indices = torch.arange(N // block * K, dtype=torch.int32)
    offsets = torch.arange(0, N // block * K + 1, K, dtype=torch.int32)  # bag j: rows j*K .. j*K + K - 1

    def product(x):  # x (1, K) -> (1, N)
        weights = x.reshape(K).repeat(N // block)
        return torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
            packed, indices, offsets, False, 0, False, weights, None, True).view(1, N)

    return product, K


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int)
    p.add_argument("--rows", type=int, default=1, help="activation rows per product (default 1: a decoding step)")
    p.add_argument("--compile", action="store_true", help="add inductor's weight-only int8 (compiles first)")
    p.add_argument("--int4-alternatives", action="store_true",
                   help="add two int4 products built from torch's ops (see above; compiles first)")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows must be at least 1, got {args.rows}")
    if args.int4_alternatives and args.rows > 1:
        p.error("--int4-alternatives takes one activation row (--rows 1)")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads; one decoding step's products, 2.7B width, 4 layers + LM head, "
          f"times {args.rows} activation row{'s' if args.rows > 1 else ''}",
          flush=True)
    with torch.no_grad():
        ks = kernels(args)
        for f in ks.values():
            f()
            f()
        names = list(ks)
        t = {k: [] for k in names}
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                ks[k]()
                t[k].append((time.perf_counter() - start) * 1e3)
    base = "FBGEMM int8"
    print(f"\n| kernel | best ms | median ms | speed vs {base} (median of per-round ratios) |\n|---|---|---|---|")
    for k in names:
        ratio = statistics.median(a / b for a, b in zip(t[base], t[k]))
        print(f"| {k} | {min(t[k]):.2f} | {statistics.median(t[k]):.2f} | {ratio:.2f}x |")
    print("(a shared machine: figures are provisional)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
