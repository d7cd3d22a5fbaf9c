"""Decoding speed, side by side with transformers in one run (CPU).

Default shape: the full 2.7B width (hidden 2560, 32 heads, vocab 32000) with 4 layers; prompt 32 tokens,
64 new tokens, greedy, batch 1 -- plus our int8 model and our batch-8 throughput. Random weights (speed
does not depend on them); EOS is disabled so that every run makes exactly the requested number of tokens.

Decoding one token reads every weight once, so the ceiling is (weight bytes per token) / (memory read
bandwidth). The bandwidth is measured in the same run with a large read (a sum over a 1 GiB tensor), and
each result is printed as a fraction of that bound.

    python benchmarks/bench_generate.py                 # the issue's checks; exits 1 if one fails
    python benchmarks/bench_generate.py --table --layers 32 --new 16   # README table (slow: ~1 token/s)
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM  # noqa: E402
from neoxja.quantize import Int8DynamicLinear, quantize  # noqa: E402


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large sequential read (best of `repeats`)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    del x
    return gib * 2**30 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of matrix weights a decoding step reads: every linear layer (the LM head included) once."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int8DynamicLinear):
            total += module.in_features * module.out_features  # int8: one byte per weight
    return total


def timed_generate(generate, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    generate()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_models(args, dtype):
    cfg = dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=args.layers, num_attention_heads=32,
               eos_token_id=None, bos_token_id=31996, tie_word_embeddings=False)
    torch.manual_seed(0)
    ours = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**cfg)).eval().to(dtype)
    return ours, cfg


def make_reference(cfg: dict, state_dict, dtype):
    import transformers

    ref = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**cfg)).eval()
    ref.load_state_dict(state_dict)
    return ref.to(dtype)


def rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def table_row(impl: str, dtype_name: str, args) -> dict:
    """One row of the README table, measured in a fresh process: build, warm up, time one generation."""
    import json

    dtype = getattr(torch, "float32" if dtype_name == "int8" else dtype_name)
    cfg = dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=args.layers, num_attention_heads=32,
               eos_token_id=None, bos_token_id=31996)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no float32 copy on the way
    if impl == "transformers":
        import transformers

        model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**cfg)).eval()
        model.generation_config.pad_token_id = 0
        run = lambda n: model.generate(prompt, max_new_tokens=n, do_sample=False)  # noqa: E731
    else:
        model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**cfg)).eval()
        if dtype_name == "int8":
            quantize(model, "int8")
        run = lambda n: model.generate(prompt, max_new_tokens=n)  # noqa: E731
    torch.set_default_dtype(torch.float32)
    gc.collect()
    prompt = torch.randint(0, 31000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    load_peak = rss_gib("VmHWM")
    model.generate(prompt[:, :4], max_new_tokens=2)  # warm-up (a short prompt: prefill is costly at 32 layers)
    reset_peak_rss()
    t = time.perf_counter()
    out = run(args.new)
    seconds = time.perf_counter() - t
    assert out.shape[1] == args.prompt + args.new
    row = dict(impl=impl, dtype=dtype_name, layers=args.layers, tokens_per_s=args.new / seconds,
               seconds=seconds, load_peak_gib=load_peak, generate_peak_gib=rss_gib("VmHWM"),
               weights_gb=weight_bytes_per_token(model) / 1e9)
    print("ROW " + json.dumps(row), flush=True)
    return row


def run_table(args) -> int:
    """All rows, each in its own process (so that peak memory is that row's alone)."""
    import json
    import subprocess

    bandwidth = read_bandwidth()
    print(f"large-read bandwidth: {bandwidth / 1e9:.1f} GB/s; {args.layers} layers, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, batch 1", flush=True)
    rows = []
    for impl, dtype in [("transformers", "float32"), ("neoxja", "float32"), ("transformers", "bfloat16"),
                        ("neoxja", "bfloat16"), ("neoxja", "int8")]:
        cmd = [sys.executable, __file__, "--row", impl, dtype, "--layers", str(args.layers),
               "--prompt", str(args.prompt), "--new", str(args.new)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not lines:
            print(f"{impl} {dtype}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(lines[-1][4:]))
        r = rows[-1]
        print(f"{impl:<13} {dtype:<9} {r['tokens_per_s']:6.2f} tok/s  peak RSS {r['load_peak_gib']:.1f} GiB "
              f"(while generating {r['generate_peak_gib']:.1f} GiB)", flush=True)
    print("\n| implementation | dtype | tokens/s | vs transformers float32 | fraction of bandwidth bound "
          "| peak RSS (load) | peak RSS (generating) |")
    print("|---|---|---|---|---|---|---|")
    base = next((r["tokens_per_s"] for r in rows if r["impl"] == "transformers" and r["dtype"] == "float32"), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        frac = r["tokens_per_s"] * r["weights_gb"] * 1e9 / bandwidth
        print(f"| {r['impl']} | {r['dtype']} | {r['tokens_per_s']:.2f} | {ratio} | {frac:.0%} "
              f"| {r['load_peak_gib']:.1f} GiB | {r['generate_peak_gib']:.1f} GiB |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--table", action="store_true",
                   help="README table: transformers and neoxja in float32 and bfloat16, neoxja int8, each in its "
                        "own process, tokens/s and peak memory")
    p.add_argument("--row", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--skip-checks", action="store_true", help="print numbers without checking the goals")
    p.add_argument("--no-batch", action="store_true", help="skip the batch-8 measurement")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for both sides (default: torch's choice). "
                   "On a 2-core machine that other jobs share, waking a second thread costs a scheduler "
                   "tick per parallel op, and one thread decodes faster")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        table_row(args.row[0], args.row[1], args)
        return 0
    if args.table:
        return run_table(args)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"quantized engine {torch.backends.quantized.engine}, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    bandwidth = read_bandwidth()
    print(f"large-read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)

    prompt = torch.randint(0, 31000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    results = {}

    def report(name, model, seconds, batch=1, params_model=None):
        tps = batch * args.new / seconds
        per_token = weight_bytes_per_token(params_model or model)
        bound = bandwidth / per_token  # tokens/s for batch 1 if only the weights were read
        results[name] = tps
        frac = f"{(tps / batch) / bound:5.1%} of the bandwidth bound ({bound:.1f} tok/s)" if batch == 1 else ""
        print(f"{name:<34} {tps:7.2f} tok/s  ({seconds:.2f} s)  weights/token {per_token / 1e9:.2f} GB  {frac}"
              f"  peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)

    for dtype in [torch.float32]:
        tag = str(dtype).replace("torch.", "")
        ours, cfg = make_models(args, dtype)
        ref = make_reference(cfg, ours.state_dict(), dtype)
        # identical greedy tokens first: the comparison is only meaningful if both do the same work
        a = ours.generate(prompt, max_new_tokens=8)
        b = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        if dtype == torch.float32 and not torch.equal(a, b):
            print("WARNING: greedy tokens differ from transformers'", flush=True)

        t_ref = timed_generate(lambda: ref.generate(prompt, max_new_tokens=args.new, min_new_tokens=0,
                                                    do_sample=False, pad_token_id=0), args.repeats)
        report(f"transformers {tag} batch 1", ref, t_ref)
        del ref
        gc.collect()
        t_ours = timed_generate(lambda: ours.generate(prompt, max_new_tokens=args.new), args.repeats)
        report(f"neoxja {tag} batch 1", ours, t_ours)
        print(f"  ratio neoxja/transformers ({tag}): {results[f'neoxja {tag} batch 1'] / results[f'transformers {tag} batch 1']:.2f}x",
              flush=True)
        if dtype == torch.float32 and not args.no_batch:
            batch_prompt = prompt.repeat(8, 1)
            t8 = timed_generate(lambda: ours.generate(batch_prompt, max_new_tokens=args.new), args.repeats)
            report("neoxja float32 batch 8", ours, t8, batch=8)
        if dtype == torch.float32:
            ours = quantize(ours.float(), "int8")
            t_q = timed_generate(lambda: ours.generate(prompt, max_new_tokens=args.new), args.repeats)
            report("neoxja int8 batch 1", ours, t_q)
        del ours
        gc.collect()

    print(f"load average at the end: {os.getloadavg()[0]:.2f}", flush=True)
    ref32 = results["transformers float32 batch 1"]
    checks = [
        ("float32 >= 1.15x transformers", results["neoxja float32 batch 1"] / ref32, 1.15),
        ("int8 >= 3x transformers float32", results["neoxja int8 batch 1"] / ref32, 3.0),
    ]
    if "neoxja float32 batch 8" in results:
        checks.append(("batch 8 >= 4x our batch 1", results["neoxja float32 batch 8"] / results["neoxja float32 batch 1"], 4.0))
    failed = False
    for name, value, goal in checks:
        ok = value >= goal
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f}x", flush=True)
    return 1 if failed and not args.skip_checks else 0


if __name__ == "__main__":
    sys.exit(main())
