"""Which kernel multiplies a few rows by a large float32 weight fastest on this CPU (the shapes of batched decoding).

Decoding a batch of B sequences multiplies B rows by every weight matrix of the model. transformers (and
nn.Linear) call F.linear, i.e. MKL's sgemm, which above 3 rows is far from the memory bandwidth these
products are bound by. This script times, interleaved round by round so that load from other jobs hits every
kernel alike, on the weight shapes of the 2.7B model:

  F.linear       what transformers runs (MKL sgemm; its gemv path for 1-3 rows)
  oneDNN         torch.ops.mkldnn._linear_pointwise on the plain weight (the op torch.compile uses on CPU)
  bmm/16         torch.bmm of the rows against 16-row slices of the weight, (N/16, B, K) x (N/16, K, 16):
                 MKL's batched small products, which read the weight once without packing a copy of it

and prints the median of each, the best, and its speed-up over F.linear. `neoxja.kernels.choose_linear_kernels`
(applied by `neoxja generate` when a decoding step has several rows) makes this measurement itself, once per
machine, dtype and weight shape, and caches it; with --plan this script also prints the table it measures
(a row count's kernel holds up to the next grid point).

    python benchmarks/bench_skinny_linear.py [--rows 1 2 4 8 12 16 32 64] [--rounds 15] [--dtype bfloat16] [--plan]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240), (32000, 2560)]  # (out, in) of the 2.7B model


def kernels(x: torch.Tensor, w: torch.Tensor) -> dict:
    rows, n = x.shape[0], w.shape[0]
    w_slices = w.view(n // 16, 16, w.shape[1])  # (N/16, 16, K)
    x_rep = x.expand(n // 16, rows, x.shape[1])  # (N/16, B, K), no copy
    out = {
        "F.linear": lambda: F.linear(x, w),
        "bmm/16": lambda: torch.bmm(x_rep, w_slices.transpose(1, 2)).transpose(0, 1).reshape(rows, n),
    }
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        out["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--plan", action="store_true", help="also print neoxja.kernels.measure_plan per shape")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    with torch.no_grad():
        for rows in args.rows:
            totals: dict[str, float] = {}
            for n, k in SHAPES:
                w, x = torch.randn(n, k).to(dtype), torch.randn(rows, k).to(dtype)
                fns = kernels(x, w)
                expected = F.linear(x, w)
                for name, fn in fns.items():
                    tol = 1e-3 if dtype == torch.float32 else 5e-2
                    torch.testing.assert_close(fn(), expected, rtol=tol, atol=tol * k ** 0.5, msg=name)
                times: dict[str, list] = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
                med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
                for name, t in med.items():
                    totals[name] = totals.get(name, 0.0) + t
                best = min(med, key=med.get)
                print(f"rows {rows:>3}  {n:>5}x{k:<5} " + "  ".join(
                    f"{name} {t * 1e3:6.2f} ms ({n * k * w.element_size() / t / 1e9:4.1f} GB/s)" for name, t in med.items())
                    + f"  best {best}, {med['F.linear'] / med[best]:.2f}x F.linear", flush=True)
            best = min(totals, key=totals.get)
            print(f"rows {rows:>3}  all five shapes: best {best}, {totals['F.linear'] / totals[best]:.2f}x F.linear\n",
                  flush=True)
        if args.plan:
            from neoxja.kernels import measure_plan

            for n, k in SHAPES:
                plan = measure_plan(torch.randn(n, k).to(dtype))
                print(f"plan {n:>5}x{k:<5} " + " ".join(f"{r}:{name}" for r, name in plan.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
