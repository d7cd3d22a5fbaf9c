"""float32 against bfloat16, side by side in one run (CPU): prefill, batch-8 decode, training.

Default shape: the 2.7B width (hidden 2560, 32 heads, vocab 32000) with 4 layers, random weights (speed does
not depend on them), EOS off. The same weights in both precisions. Three measurements, each timed in rounds
that alternate the two sides (rotated order), the ratio taken within a round and the median over rounds
reported, so a burst of load from other jobs on a shared machine cannot favour one side:

  forward over 512 tokens    one sequence through the model without a cache (what a long prompt costs)
  greedy decode, batch 8     8 prompts of 32 tokens, 32 new tokens each; tokens/s (both models get
                             neoxja.kernels.choose_linear_kernels, as `neoxja generate` applies it)
  training tokens/s          the steps of `neoxja train` (CausalLMLoss, AdamW fused, gradient clipping) on
                             one float32 model: plain float32 against bf16 autocast with the same float32
                             master weights, alternating step by step (batch 2 x 256 tokens by default),
                             with glibc told to keep freed blocks, as `neoxja train` does (train/memory.py)

Goals where the CPU has AMX-BF16 (issue 13): prefill >= 3.5x, batch-8 decode >= 2x, training >= 2.5x.
Where it has AVX512-BF16 without AMX, preferred_dtype is still bfloat16, so the check is that the choice
costs nothing: each of the three >= 1.0x (measured on an AMD EPYC with AVX512-BF16: 3.87x, 1.70x, 3.54x).
Where it has neither, neoxja.preferred_dtype is float32 and nothing is checked.
Prints the CPU flags it ran on. Training needs ~10 GB of memory at the default shape (float32 weights,
gradients and AdamW state of 480M parameters); `--skip-inference --layers 1` needs ~4.5 GB.

    python benchmarks/bench_bf16.py [--rounds 3] [--layers 4] [--threads N] [--skip-train] [--skip-inference]
                                    [--skip-checks]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu import cpu_flags  # noqa: E402  (benchmarks/ is the script's directory)

import torch  # noqa: E402

from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.hardware import cpu_bf16_feature, dtype_choice  # noqa: E402
from neoxja.kernels import choose_linear_kernels  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM  # noqa: E402



def config(layers: int) -> GPTNeoXJapaneseConfig:
    return GPTNeoXJapaneseConfig(vocab_size=32000, hidden_size=2560, num_hidden_layers=layers, num_attention_heads=32,
                                 eos_token_id=None, bos_token_id=31996, attention_dropout=0.0, hidden_dropout=0.0)


def alternate(calls: dict, rounds: int, label: str, work: float, unit: str) -> dict[str, list[float]]:
    """Time each call once per round, in a rotated order; returns `work / seconds` per call per round."""
    rates = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            calls[name]()
            rates[name].append(work / (time.perf_counter() - t))
        print(f"  {label} round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f} {unit}" for n, v in rates.items()),
              flush=True)
    return rates


def ratio(rates: dict[str, list[float]]) -> float:
    return statistics.median(b / f for f, b in zip(rates["float32"], rates["bfloat16"]))


def report(name: str, rates: dict, unit: str) -> float:
    r = ratio(rates)
    print(f"{name:<28} float32 {statistics.median(rates['float32']):8.2f} {unit}   bfloat16 "
          f"{statistics.median(rates['bfloat16']):8.2f} {unit}   ratio {r:.2f}x (median of per-round ratios)",
          flush=True)
    return r


def inference(args) -> dict[str, float]:
    torch.manual_seed(0)
    fp32 = GPTNeoXJapaneseForCausalLM(config(args.layers)).eval()
    bf16 = GPTNeoXJapaneseForCausalLM(config(args.layers)).to(torch.bfloat16).eval()
    bf16.load_state_dict(fp32.state_dict())
    t = time.perf_counter()
    for model in (fp32, bf16):
        choose_linear_kernels(model)
    print(f"kernel choice (measured once per machine, then cached): {time.perf_counter() - t:.1f} s", flush=True)
    models = {"float32": fp32, "bfloat16": bf16}
    g = torch.Generator().manual_seed(1)
    long = torch.randint(0, 31000, (1, args.prefill), generator=g)
    prompts = torch.randint(0, 31000, (8, args.prompt), generator=g)
    results = {}
    with torch.no_grad():
        forward = {name: (lambda m=m: m(long, use_cache=False)) for name, m in models.items()}
        for call in forward.values():
            call()  # warm-up
        rates = alternate(forward, args.rounds, f"forward {args.prefill} tokens", args.prefill, "tok/s")
        results["prefill"] = report(f"forward over {args.prefill} tokens", rates, "tok/s")

        a = fp32.generate(prompts, max_new_tokens=8, do_sample=False)
        b = bf16.generate(prompts, max_new_tokens=8, do_sample=False)
        agree = (a[:, args.prompt:] == b[:, args.prompt:]).float().mean().item()
        print(f"  greedy tokens of bf16 equal to float32's over 8 steps: {agree:.0%} (rounding differs; "
              f"random weights make near-ties common)", flush=True)
        decode = {name: (lambda m=m: m.generate(prompts, max_new_tokens=args.new, min_new_tokens=args.new,
                                                 do_sample=False)) for name, m in models.items()}
        for call in decode.values():
            call()
        rates = alternate(decode, args.rounds, "decode batch 8", 8 * args.new, "tok/s")
        results["decode8"] = report("greedy decode, batch 8", rates, "tok/s")
    return results


def training(args) -> float:
    """One float32 model and optimizer; steps alternate between plain float32 and bf16 autocast, as the
    training loop runs them (its CausalLMLoss, fused AdamW, gradient clipping)."""
    from neoxja.train.loop import CausalLMLoss, _clip_gradients
    from neoxja.train.memory import retain_freed_memory
    from neoxja.train.optim import make_optimizer

    print(f"  retain_freed_memory() as `neoxja train` calls it: {retain_freed_memory()}", flush=True)
    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(config(args.layers)).float().train()
    loss_module = CausalLMLoss(model)
    optimizer = make_optimizer(loss_module, 1e-4, 0.1, device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(2)
    tokens = args.train_batch * args.train_seq

    def step(dtype):
        x = torch.randint(0, 31000, (args.train_batch, args.train_seq + 1), generator=g)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_module(x[:, :-1], x[:, 1:])
        loss.backward()
        _clip_gradients(loss_module, optimizer, scaler, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    calls = {"float32": lambda: step(torch.float32), "bfloat16": lambda: step(torch.bfloat16)}
    for call in calls.values():
        call()  # warm-up (optimizer state allocated)
    rates = alternate(calls, args.rounds, f"train step {args.train_batch}x{args.train_seq}", tokens, "tok/s")
    return report("training tokens/s", rates, "tok/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512, help="tokens of the forward pass (default 512)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per decoded sequence (default 32)")
    p.add_argument("--new", type=int, default=32, help="new tokens per decoded sequence (default 32)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--threads", type=int, help="torch.set_num_threads for both sides (default: torch's choice)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-checks", action="store_true", help="print numbers without checking the goals")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype, reason = dtype_choice("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
          f"flags: {cpu_flags()}; preferred_dtype: {str(dtype).removeprefix('torch.')} ({reason}); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; 2.7B width, {args.layers} layers, "
          f"{args.rounds} rounds", flush=True)
    results = {}
    if not args.skip_inference:
        results.update(inference(args))
        gc.collect()
    if not args.skip_train:
        results["train"] = training(args)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}", flush=True)

    if dtype != torch.bfloat16:
        print("this CPU has no fast bfloat16: auto is float32 here, the goals do not apply")
        return 0
    if cpu_bf16_feature() == "AMX-BF16":
        goals = {"prefill": ("prefill >= 3.5x", 3.5), "decode8": ("batch-8 decode >= 2x", 2.0),
                 "train": ("training tokens/s >= 2.5x", 2.5)}
    else:  # AVX512-BF16 only: the goals are AMX's; auto picks bfloat16 here too, so it must not lose
        print(f"no AMX here ({reason}): the AMX goals do not apply; auto picks bfloat16, so it must not be slower")
        goals = {key: (f"{what} >= 1.0x (no regression)", 1.0)
                 for key, what in (("prefill", "prefill"), ("decode8", "batch-8 decode"), ("train", "training tokens/s"))}
    failed = False
    for key, value in results.items():
        name, goal = goals[key]
        ok = value >= goal
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f}x", flush=True)
    return 1 if failed and not args.skip_checks else 0


if __name__ == "__main__":
    sys.exit(main())
