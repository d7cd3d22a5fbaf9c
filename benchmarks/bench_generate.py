"""Decoding speed, side by side with transformers in one run (CPU).

Default shape: the full 2.7B width (hidden 2560, 32 heads, vocab 32000) with 4 layers; prompt 32 tokens,
64 new tokens, greedy, batch 1 -- plus our int8 model and our batch-8 throughput. Random weights (speed
does not depend on them); EOS is disabled so that every run makes exactly the requested number of tokens.

Decoding one token reads every weight once, so the ceiling is (weight bytes per token) / (memory read
bandwidth). The bandwidth is measured in the same run with a large read (a sum over a 1 GiB tensor), and
each result is printed as a fraction of that bound.

    python benchmarks/bench_generate.py                 # the issue's checks; exits 1 if one fails
    python benchmarks/bench_generate.py --layers 32 --table --skip-checks   # README table (slow)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--table", action="store_true", help="also bfloat16 for both (README table)")
    p.add_argument("--skip-checks", action="store_true", help="print numbers without checking the goals")
    p.add_argument("--no-batch", action="store_true", help="skip the batch-8 measurement")
    args = p.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"quantized engine {torch.backends.quantized.engine}", flush=True)
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

    dtypes = [torch.float32] + ([torch.bfloat16] if args.table else [])
    for dtype in dtypes:
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
