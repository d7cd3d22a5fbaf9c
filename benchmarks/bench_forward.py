"""Forward-pass speed: neoxja vs transformers, side by side, same weights, same input.

Config: the full 2.7B width (hidden 2560, 32 heads, vocab 32000) with 4 layers; batch 1, 512 tokens, float32, CPU.
Both sides run the same full forward (logits for all 512 positions); runs alternate between the two so that
load from other processes on the machine hits both alike, and the median of each is reported.
Goal: ours / transformers speed ratio >= 0.95x.

    .venv/bin/python benchmarks/bench_forward.py [--repeats 5] [--tokens 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def flops_per_forward(hidden: int, layers: int, vocab: int, tokens: int) -> float:
    """Multiply-adds x2 of the matmuls: per layer qkv 3C^2, out C^2, MLP 8C^2 per token, attention scores and
    weighted sum 2 T^2 C (full square, as a non-causal-aware kernel computes), plus the LM head V C per token."""
    per_layer = 2 * tokens * 12 * hidden * hidden + 2 * 2 * tokens * tokens * hidden
    return layers * per_layer + 2 * tokens * vocab * hidden


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    import transformers

    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    transformers.logging.set_verbosity_error()
    shape = dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=args.layers, num_attention_heads=32,
                 tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**shape)).eval()
    with torch.device("meta"):
        ours = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**shape))
    ours.load_state_dict(ref.state_dict(), assign=True)  # shares the reference's weight tensors: same memory
    ours.tie_weights()
    ours.eval()

    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = ref(ids, use_cache=False).logits, ours(ids, use_cache=False).logits  # warm-up
        diff = (expected - got).abs().max().item()
        times = {"transformers": [], "neoxja": [], "neoxja_last_only": []}
        for _ in range(args.repeats):
            for name, run in (("transformers", lambda: ref(ids, use_cache=False)),
                              ("neoxja", lambda: ours(ids, use_cache=False)),
                              ("neoxja_last_only", lambda: ours(ids, use_cache=False, logits_to_keep=1))):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    flops = flops_per_forward(2560, args.layers, 32000, args.tokens)
    ref_t, ours_t, last_t = (statistics.median(times[k]) for k in ("transformers", "neoxja", "neoxja_last_only"))
    print(f"forward: batch 1 x {args.tokens} tokens, hidden 2560, 32 heads, {args.layers} layers, vocab 32000, "
          f"float32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (runs alternate)")
    print(f"max |logits difference|      {diff:.2e}")
    print(f"transformers                 {ref_t * 1e3:8.1f} ms   {flops / ref_t / 1e9:7.1f} GFLOP/s")
    print(f"neoxja                       {ours_t * 1e3:8.1f} ms   {flops / ours_t / 1e9:7.1f} GFLOP/s")
    print(f"neoxja, LM head on last only {last_t * 1e3:8.1f} ms   (what generation's prefill does)")
    ratio = ref_t / ours_t
    print(f"speed ratio neoxja / transformers: {ratio:.3f}x  (goal >= 0.95x: {'met' if ratio >= 0.95 else 'NOT met'})")
    print(f"all times (s): { {k: [round(t, 4) for t in v] for k, v in times.items()} }")
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
