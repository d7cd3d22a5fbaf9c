"""The serving engine's throughput by weight format: what `neoxja serve --quantize int8|int4` computes per second.

The 2.7B width (hidden 2560, 32 heads, vocab 32000) with few layers and random weights, the same weights in
each format: float32 as `neoxja serve` runs it (batch-invariant products), int8 (FBGEMM), int4 (neoxja's kernel,
`quantize(model, "int4")`), and int4 on torch's kernel (`kernel="torch"`, `torch._weight_int4pack_mm_for_cpu`:
what int4 would be without neoxja's kernels). Each round gives every
format the same requests (concurrent prompts of --prompt-len tokens, --max-tokens greedy tokens each, ignore_eos)
through `neoxja.serving.engine.Engine` directly, no HTTP, in a rotated order. Printed: output tokens per second
(median over rounds) and ratios as medians of per-round ratios, with the CPU flags.

    python benchmarks/bench_engine_quant.py --threads 2
    python benchmarks/bench_engine_quant.py --concurrency 4 --layers 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from neoxja.assets import default_model_dir  # noqa: E402
from neoxja.batch_invariant import make_batch_invariant  # noqa: E402
from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM  # noqa: E402
from neoxja.quantization import Int4WeightOnlyLinear, quantize  # noqa: E402
from neoxja.sampling import SamplingParams  # noqa: E402
from neoxja.serving.engine import Engine, Request  # noqa: E402
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer  # noqa: E402

from _cpu import cpu_flags  # noqa: E402  (benchmarks/ is the script's directory)


TORCH_INT4 = "int4, torch's kernel"


def models(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = GPTNeoXJapaneseConfig(hidden_size=2560, num_attention_heads=32, num_hidden_layers=args.layers,
                                vocab_size=32000, max_position_embeddings=args.prompt_len + args.max_tokens)
    weights = GPTNeoXJapaneseForCausalLM(cfg).eval().state_dict()
    out = {}
    for kind in ("float32", "int8", "int4", TORCH_INT4):
        model = GPTNeoXJapaneseForCausalLM(cfg).eval()
        model.load_state_dict(weights)
        if kind == "float32":
            make_batch_invariant(model)  # as `neoxja serve` runs float32
        elif kind == TORCH_INT4:
            quantize(model, "int4", kernel="torch")
        else:
            quantize(model, kind)
        out[kind] = model
    return out


def throughput(model, tokenizer, args) -> float:
    """Output tokens per second of --concurrency requests run to their --max-tokens through one Engine."""
    engine = Engine(model, tokenizer, max_num_seqs=args.concurrency, max_model_len=args.prompt_len + args.max_tokens)
    try:
        for i in range(args.concurrency):
            prompt = [(7 * i + j) % 31990 + 5 for j in range(args.prompt_len)]
            engine.add_request(Request(str(i), prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                                                      ignore_eos=True), lambda out: None))
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    return args.concurrency * args.max_tokens / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16, help="requests at once (the engine's slots; default 16)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("layers", "concurrency", "prompt_len", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(default_model_dir())
    with torch.no_grad():
        formats = models(args)
        kernel = next(m.kernel for m in formats["int4"].modules() if isinstance(m, Int4WeightOnlyLinear))
        runs = {name: (lambda model=model: throughput(model, tokenizer, args)) for name, model in formats.items()}
        print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads; 2.7B width, "
              f"{args.layers} layers (random weights), {args.concurrency} requests at once, prompt {args.prompt_len}, "
              f"{args.max_tokens} greedy tokens each; int4 kernel {kernel}", flush=True)
        names = list(runs)
        for run in runs.values():
            run()  # warm-up
        tok_s = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                tok_s[name].append(runs[name]())
            print(f"round {r + 1}: " + ", ".join(f"{n} {tok_s[n][-1]:.1f}" for n in names) + " tok/s", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(tok_s[a], tok_s[b]))

    print("\n| format | output tok/s (median) |\n|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(tok_s[name]):.1f} |")
    print(f"\nint4 / int8 {ratio('int4', 'int8'):.2f}x, int4 / float32 {ratio('int4', 'float32'):.2f}x, "
          f"int4 / int4 on torch's kernel {ratio('int4', TORCH_INT4):.2f}x, int8 / float32 "
          f"{ratio('int8', 'float32'):.2f}x (medians of per-round ratios; a shared machine: provisional)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
