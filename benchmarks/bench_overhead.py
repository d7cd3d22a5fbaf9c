"""Per-token overhead: the bundled model's batch-1 greedy decoding speed, side by side in one run (CPU).

Contenders, each in its own worker process (so each imports its own neoxja), timed in interleaved rounds in a
rotated order; each ratio is the median of the per-round ratios (load from other jobs comes in bursts):
  main      today's path: generate() of the git main checkout at --main (default /work/main), if present;
  main-comp that checkout's generate(compile=True);
  eager     this tree's generate() (step functions, eager);
  compiled  this tree's generate(compile=True) (decode steps through torch.compile, several per call on a small
            model: generation.decode_steps; compile time printed
            apart, it is paid once per process and shape);
  products  only the weight products of the same decode steps (each linear once per token at one row, one
            oneDNN/MKL call each): what any implementation that calls these library kernels spends at the
            least. The compiled path does not call them for weights of at most 2048 x 2048 (inductor
            generates those products itself: generation.DECODE_COMPILE_OPTIONS), so it can beat this.
All run in --dtype (default auto: what `neoxja generate` picks; float32 gives the numbers of earlier runs).
The bundled model (5.2M parameters, 10 MB of weights) spends nearly all of a token on Python and small ops,
so this measures the overhead per token. The issue's goal: >= 1,500 tok/s batch-1 greedy.
--width LAYERS runs the same contenders on the 2.7B width with LAYERS layers and random weights instead (no goal
is checked); --kernels applies the measured skinny-product kernels in every contender, as `neoxja generate` does
(products then calls each linear's planned kernel).

--invariance instead measures what batch invariance costs (neoxja.batch_invariant.make_batch_invariant:
oneDNN linear with >= 2 rows) at batch 1 and batch 8, on the 2.7B width with 4 layers and random weights,
plain model vs transformed one, interleaved in one process.

    python benchmarks/bench_overhead.py                     # main vs eager vs compiled, bundled model
    python benchmarks/bench_overhead.py --new 200 --rounds 5
    python benchmarks/bench_overhead.py --invariance --new 16
    python benchmarks/bench_overhead.py --width 4 --kernels --threads 2 --new 32 --rounds 3   # 2.7B width
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu import cpu_flags  # noqa: E402  (benchmarks/ is the script's directory)


# ---- worker: one contender in its own process, driven over stdin/stdout ----

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import neoxja
from neoxja.assets import default_model_dir
mode, prompt, new, threads, dtype = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
width_layers, kernels = int(sys.argv[7]), sys.argv[8] == "1"
torch.set_num_threads(threads)
dtype = neoxja.preferred_dtype("cpu") if dtype == "auto" else getattr(torch, dtype)
if width_layers:  # the 2.7B width with that many layers, the same random weights in every worker
    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig(vocab_size=32000, hidden_size=2560, num_hidden_layers=width_layers,
                                          num_attention_heads=32, eos_token_id=None, bos_token_id=31996)
    model = neoxja.GPTNeoXJapaneseForCausalLM(config).to(dtype).eval()
else:
    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(default_model_dir(), dtype=dtype).eval()
if kernels:  # the measured skinny-product kernels, as `neoxja generate` applies them
    from neoxja.kernels import choose_linear_kernels
    choose_linear_kernels(model)
ids = torch.randint(0, model.config.vocab_size - 10, (1, prompt), generator=torch.Generator().manual_seed(0))
kw = dict(max_new_tokens=new, eos_token_id=[])
if mode == "compiled":
    kw["compile"] = True
generate = lambda: model.generate(ids, **kw)
if mode == "products":  # only the weight products of `new` decode steps: every linear once per token, at M=1
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, m.in_features, dtype=dtype) for m in linears]

    @torch.no_grad()
    def generate():
        for _ in range(new):
            for m, x in zip(linears, xs):
                m(x)
t = time.perf_counter()
out = generate()  # warm-up (and compilation)
first = time.perf_counter() - t
print(json.dumps(dict(ready=True, first_call_s=first, tokens=None if out is None else out[0, prompt:].tolist(),
                      module=neoxja.__file__, dtype=str(dtype).removeprefix("torch."))), flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    generate()
    print(json.dumps(dict(seconds=time.perf_counter() - t)), flush=True)
"""


class Worker:
    def __init__(self, label: str, root: Path, mode: str, args):
        self.label = label
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(root), mode, str(args.prompt), str(args.new),
                                      str(args.threads), args.dtype, str(args.width), str(int(args.kernels))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(root))
        self.ready = json.loads(self.proc.stdout.readline())

    def run(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run_overhead(args) -> int:
    contenders = []
    main_root = Path(args.main)
    if (main_root / "neoxja" / "generation.py").is_file() and main_root.resolve() != REPO:
        contenders += [("main", main_root, "eager"), ("main-comp", main_root, "compiled")]
    else:
        print(f"(no main checkout at {main_root}: comparing this tree's eager and compiled paths only)")
    contenders += [("eager", REPO, "eager"), ("compiled", REPO, "compiled"), ("products", REPO, "products")]
    workers = []
    for label, root, mode in contenders:  # started one after another: compilation does not overlap the others
        workers.append(Worker(label, root, mode, args))
        print(f"{label:9s} ready: first call {workers[-1].ready['first_call_s']:.2f} s "
              f"({workers[-1].ready['module']})", flush=True)
    times = {w.label: [] for w in workers}
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for w in order:
            times[w.label].append(w.run())
    for w in workers:
        w.close()

    base = workers[0].label
    shape = f"2.7B width x {args.width} layers, random weights" if args.width else "bundled model"
    kernels = ", measured kernels (choose_linear_kernels, as `neoxja generate`)" if args.kernels else ""
    print(f"\n{shape}{kernels}, batch 1, greedy, {workers[0].ready['dtype']} (--dtype {args.dtype}), "
          f"prompt {args.prompt}, {args.new} new tokens, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; CPU: {cpu_flags()}")
    print("shared, loaded machine: absolute numbers vary with the load, ratios are from the same rounds")
    print(f"{'path':9s} {'tok/s (best)':>13s} {'tok/s (median)':>15s} {'x ' + base + ' (median ratio)':>24s}")
    for w in workers:
        best, med = args.new / min(times[w.label]), args.new / statistics.median(times[w.label])
        ratio = statistics.median(b / t for b, t in zip(times[base], times[w.label]))
        print(f"{w.label:9s} {best:13.0f} {med:15.0f} {ratio:24.2f}")
    reference = workers[0].ready["tokens"]
    for w in workers[1:]:
        if w.ready["tokens"] is not None:
            same = w.ready["tokens"] == reference
            print(f"greedy tokens of {w.label} {'equal' if same else 'DIFFER from'} {base}'s"
                  + ("" if same or w.ready["dtype"] == "float32" else
                     f" ({w.ready['dtype']}: inductor's fused small ops round differently; in float32 they are equal)"))
    if "main-comp" in times:
        ratio = statistics.median(b / t for b, t in zip(times["main-comp"], times["compiled"]))
        print(f"compiled / main-comp (this tree's compiled path against main's, median of per-round ratios): "
              f"{ratio:.2f}x")
    fast = args.new / statistics.median(times["compiled"])
    bound = args.new / statistics.median(times["products"])
    generates = "" if args.width else ", which generates the small ones itself,"
    print(f"the weight products alone as library calls (every linear of a decode step at one row, nothing else): "
          f"{bound:.0f} tok/s; compiled{generates} reaches {fast / bound:.0%} of that")
    if args.width:  # the goal is the bundled model's
        return 0
    met = fast >= 1500
    print(f"goal >= 1500 tok/s batch-1 greedy (compiled path, median): {fast:.0f} tok/s -> "
          f"{'met' if met else 'not met'} on this machine under its present load")
    return 0 if met else 1


# ---- the cost of batch invariance on the 2.7B width ----

def run_invariance(args) -> int:
    import torch

    from benchmarks.bench_generate import full_width_config
    from neoxja.batch_invariant import RowInvariantLinear
    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**full_width_config(args.layers))).eval()
    swaps = []  # (parent, name, plain module, row-invariant module sharing its parameters)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                inv = RowInvariantLinear.wrap(child)
                inv.prepack = inv.op is not None  # as make_batch_invariant(prepack=True): oneDNN-blocked weights
                swaps.append((parent, name, child, inv))

    def use(invariant: bool):
        for parent, name, plain, inv in swaps:
            setattr(parent, name, inv if invariant else plain)

    results = {}
    for batch in (1, 8):
        ids = torch.randint(0, 32000, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        kw = dict(max_new_tokens=args.new, eos_token_id=[])
        for invariant in (False, True):  # warm-up
            use(invariant)
            model.generate(ids[:, :4], max_new_tokens=2, eos_token_id=[])
        times = {False: [], True: []}
        for r in range(args.rounds):
            for invariant in ((False, True) if r % 2 == 0 else (True, False)):
                use(invariant)
                t = time.perf_counter()
                model.generate(ids, **kw)
                times[invariant].append(time.perf_counter() - t)
        results[batch] = times
    use(False)
    print(f"2.7B width x {args.layers} layers, random weights, float32, greedy, prompt {args.prompt}, {args.new} new, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds; CPU: {cpu_flags()}")
    print("shared, loaded machine: ratios are medians of per-round ratios")
    print(f"{'batch':>5s} {'plain tok/s':>12s} {'invariant tok/s':>16s} {'invariant/plain':>16s}")
    for batch, times in results.items():
        plain = batch * args.new / statistics.median(times[False])
        inv = batch * args.new / statistics.median(times[True])
        ratio = statistics.median(p / i for p, i in zip(times[False], times[True]))
        print(f"{batch:5d} {plain:12.1f} {inv:16.1f} {ratio:16.2f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", default=os.environ.get("NEOXJA_MAIN", "/work/main"),
                        help="a checkout of today's main to compare with (default /work/main)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="every contender's weights; auto (the default): neoxja.preferred_dtype, what "
                             "`neoxja generate` picks (bfloat16 on a CPU with AMX-BF16 or AVX512-BF16)")
    parser.add_argument("--invariance", action="store_true", help="the cost of batch invariance instead")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=0, metavar="LAYERS",
                        help="instead of the bundled model, the 2.7B width with LAYERS layers and random weights")
    parser.add_argument("--kernels", action="store_true",
                        help="apply neoxja.kernels.choose_linear_kernels in every contender, as `neoxja generate` does")
    args = parser.parse_args(argv)
    if args.invariance:
        if args.new == 200:
            args.new = 16
        return run_invariance(args)
    return run_overhead(args)


if __name__ == "__main__":
    sys.exit(main())
