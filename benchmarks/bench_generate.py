"""Decoding speed, side by side with transformers in one run (CPU).

Default shape: the full 2.7B width (hidden 2560, 32 heads, vocab 32000) with 4 layers; prompt 32 tokens,
64 new tokens, greedy, batch 1 -- plus our int8 and int4 models, our batch-8 throughput, and CTranslate2
float32 and int8 on the same weights (`neoxja.export(..., to="ctranslate2")`; skipped when ctranslate2 is
not installed; each runs in a worker process of its own, benchmarks/_engine_worker.py, because in this
process its OpenMP team would slow torch's). CTranslate2 float32's greedy tokens must equal ours: that is
the check that it computes the same model (the script fails otherwise). int8 runs eager and compiled
(`generate(compile=True)`, as `neoxja generate --quantize int8 --compile`); the CTranslate2 goal is checked
on the compiled one, and the eager ratio printed beside it. Random weights (speed
does not depend on them); EOS is disabled so that every run makes exactly the requested number of tokens.

Decoding one token reads every weight once, so the ceiling is (weight bytes per token) / (memory read
bandwidth). The bandwidth is measured beside every round (the faster of a sum and a matrix-vector product
over 1 GiB), and each result is printed as a fraction of that bound. The contenders are timed in rounds,
in a rotated order, and each ratio is the median of the per-round ratios: on a shared machine, load from
other jobs comes in bursts, and timing one side after the other can swing a ratio by 2x.

One more contender does only the float32 weight products a generation needs (the same F.linear calls as
transformers, nothing else): transformers' time over its time is the largest float32 speed-up any
implementation on these kernels can reach on this machine, and the script prints it.

    python benchmarks/bench_generate.py                 # the issue's checks; exits 1 if one fails
    python benchmarks/bench_generate.py --table --layers 32 --new 16   # README table (slow: ~1 token/s)
    python benchmarks/bench_generate.py --pair bfloat16 --layers 32 --new 16 --rounds 4   # one dtype, alternately
    python benchmarks/bench_generate.py --int4-memory --layers 32    # 2.7B shape in int4: RSS loading, generating
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu import cpu_flags  # noqa: E402  (benchmarks/ is the script's directory)

import torch  # noqa: E402

from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM  # noqa: E402
from neoxja.kernels import choose_linear_kernels  # noqa: E402
from neoxja import native  # noqa: E402
from neoxja.quantization import Int4WeightOnlyLinear, Int8DynamicLinear, choose_int4_kernel, quantize  # noqa: E402


# the goals `make bench` enforces: name -> (numerator, denominator, minimum ratio of their tokens/s).
# float32 >= 1.15x transformers is retired (issue 4): the float32 weight products alone stay under it.
LIVE_GOALS = {
    "int8 >= 3x transformers float32": ("neoxja int8 batch 1", "transformers float32 batch 1", 3.0),
    "batch 8 >= 4x our batch 1 (float32)": ("neoxja float32 batch 8", "neoxja float32 batch 1", 4.0),
    "int8 batch 8 >= 3x int8 batch 1": ("neoxja int8 batch 8", "neoxja int8 batch 1", 3.0),
}


def large_read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes/s of the fastest large sequential read we know here: the best of `repeats` passes of a sum and
    of a matrix-vector product over the same 1 GiB of float32 (the product is what decoding does, and on
    some machines it streams faster than a reduction). A larger bandwidth makes every fraction smaller."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    matrix = x.view(-1, 2048)  # (N, 2048)
    vector = torch.ones(2048)
    best = float("inf")
    for _ in range(repeats):
        for read in (x.sum, lambda: torch.mv(matrix, vector)):
            t = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t)
    del x, matrix
    return gib * 2**30 / best


def full_width_config(layers: int, **extra) -> dict:
    """Config keywords (for neoxja and transformers alike) of the 2.7B width with `layers` layers; EOS is
    off so that every run makes exactly the tokens asked for."""
    return dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=layers, num_attention_heads=32,
                eos_token_id=None, bos_token_id=31996, **extra)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of matrix weights a decoding step reads: every linear layer (the LM head included) once."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int8DynamicLinear):
            total += module.in_features * module.out_features  # int8: one byte per weight
        elif isinstance(module, Int4WeightOnlyLinear):
            total += sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n != "bias")
    return total


def weight_products(model: torch.nn.Module, prompt_length: int, new_tokens: int):
    """A callable doing only the matrix products a float32 generation of `new_tokens` must do, with the same
    F.linear calls (MKL) that transformers makes: the prompt's rows through every layer's weights and one
    row through the LM head, then one row through every weight per further step. Its time is a floor
    for any implementation built on these kernels."""
    import torch.nn.functional as F

    head = model.get_output_embeddings().weight
    layer_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not head]
    prompt_rows = [torch.ones(prompt_length, w.shape[1]) for w in layer_weights]
    one_row = [torch.ones(1, w.shape[1]) for w in layer_weights]
    head_row = torch.ones(1, head.shape[1])

    @torch.no_grad()
    def run():
        for w, x in zip(layer_weights, prompt_rows):
            F.linear(x, w)
        F.linear(head_row, head)
        for _ in range(new_tokens - 1):
            for w, x in zip(layer_weights, one_row):
                F.linear(x, w)
            F.linear(head_row, head)

    return run


class StepClock:
    """A streamer (generate's `streamer=`) that notes when each new token arrives, so that one generation
    gives its decode rate apart from its prefill: (new tokens - 1) / (last token's time - first token's)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, ids) -> None:  # the prompt first, then each new token
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def run(self, generate):
        self.times = []
        return generate(streamer=self)

    def decode_tok_s(self) -> float:
        return (len(self.times) - 2) / (self.times[-1] - self.times[1])


def time_in_products(model: torch.nn.Module, generate, new_tokens: int) -> tuple[float, float]:
    """(ms per token in the weight products, ms per token in everything else) of one call of `generate`:
    every linear layer's forward is timed where it runs, inside the generation."""
    linear_types = (torch.nn.Linear, Int8DynamicLinear, Int4WeightOnlyLinear)
    inside = [0.0]

    def start(module, inputs):
        module._bench_t0 = time.perf_counter()

    def stop(module, inputs, output):
        inside[0] += time.perf_counter() - module._bench_t0

    hooks = [h for m in model.modules() if isinstance(m, linear_types)
             for h in (m.register_forward_pre_hook(start), m.register_forward_hook(stop))]
    try:
        t = time.perf_counter()
        generate()
        total = time.perf_counter() - t
    finally:
        for h in hooks:
            h.remove()
    return inside[0] / new_tokens * 1e3, (total - inside[0]) / new_tokens * 1e3


def build_side_by_side(args):
    """Our float32 model, transformers' with the same weights, an int8 copy of ours and two int4 ones (bfloat16
    activations: torch's CPU int4 kernel is fast only with them): with --int4-kernel (default "auto", what
    `quantize` chooses: neoxja's AVX512-BF16 kernel where it runs, else its AVX2 one) and with torch's."""
    import copy

    import transformers

    cfg = full_width_config(args.layers, tie_word_embeddings=False)
    torch.manual_seed(0)
    ours = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**cfg)).eval()
    ref = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**cfg)).eval()
    ref.load_state_dict(ours.state_dict())
    ours_int8 = quantize(copy.deepcopy(ours), "int8")
    choose_linear_kernels(ours)  # the skinny-product kernels `neoxja generate` applies for batches
    kernel = choose_int4_kernel(args.int4_kernel, "cpu", args.group_size)
    # neoxja's AVX2 kernel takes float32 activations: an AVX2 CPU runs the rest of the model in float32
    int4_dtype = native.INT4_ACTIVATIONS.get(kernel, torch.bfloat16)
    ours_int4 = quantize(copy.deepcopy(ours).to(int4_dtype), "int4", group_size=args.group_size, kernel=kernel)
    ours_int4_torch = quantize(copy.deepcopy(ours).to(torch.bfloat16), "int4", group_size=args.group_size,
                               kernel="torch")
    return ours, ref, ours_int8, ours_int4, ours_int4_torch


def ctranslate2_contenders(model, prompt, new: int, threads: int, workdir: Path) -> dict:
    """{"CTranslate2 float32": (run, model dir), "CTranslate2 int8": ...}: `run()` generates `new` greedy
    tokens for the one-row `prompt` and returns their ids. Each runs in a worker process of its own
    (_engine_worker.py: in this process its OpenMP team would slow torch's, and ours its). Empty when
    ctranslate2 is not installed."""
    try:
        import ctranslate2  # noqa: F401  (only to know it is there: the workers import it)
    except ImportError:
        return {}
    from _engine_worker import EngineProcess
    from neoxja.engines import ctranslate2_tokens
    from neoxja.exporters import export

    out = {}
    for quantization, compute_type in (("float32", "float32"), ("int8", "int8_float32")):
        path = export(model, workdir / f"ct2-{quantization}", to="ctranslate2", quantization=quantization, force=True)
        worker = EngineProcess({"engine": "ctranslate2", "path": str(path), "compute_type": compute_type,
                                "threads": threads, "tokens": ctranslate2_tokens(prompt[0].tolist(), path),
                                "new": new})
        atexit.register(worker.close)
        out[f"CTranslate2 {quantization}"] = (lambda worker=worker: worker.generate()[0], path)
    return out


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
    cfg = full_width_config(args.layers)
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

    bandwidth = large_read_bandwidth()
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


def run_side_by_side(args) -> int:
    """The issue's checks. Every round times each contender once, in a rotated order, with the read
    bandwidth measured beside them; ratios are taken within a round and the median over rounds is
    reported, so that a burst of load from other jobs on a shared machine cannot favour one side."""
    import statistics

    import tempfile

    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"quantized engine {torch.backends.quantized.engine}, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.layers} layers, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy; {args.rounds} rounds", flush=True)
    ours, ref, ours_int8, ours_int4, ours_int4_torch = build_side_by_side(args)
    int4_kernel = next(m.kernel for m in ours_int4.modules() if isinstance(m, Int4WeightOnlyLinear))
    print(f"int4 kernel: {int4_kernel} (--int4-kernel {args.int4_kernel})", flush=True)
    prompt = torch.randint(0, 31000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    batch_prompt = prompt.repeat(8, 1)
    new = args.new

    # the comparison means something only if both sides do the same work
    a = ours.generate(prompt, max_new_tokens=8)
    b = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if not torch.equal(a, b):
        print("WARNING: greedy tokens differ from transformers'", flush=True)
    failures = []
    ct2 = {} if args.no_ctranslate2 else ctranslate2_contenders(
        ours, prompt, new, torch.get_num_threads(), Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-")))
    if ct2:
        ours_tokens = ours.generate(prompt, max_new_tokens=new)[0, args.prompt:].tolist()
        theirs = ct2["CTranslate2 float32"][0]()
        same = next((i for i, (x, y) in enumerate(zip(ours_tokens, theirs)) if x != y), min(len(ours_tokens), len(theirs)))
        print(f"CTranslate2 float32 greedy tokens equal to neoxja float32: first {same} of {new}", flush=True)
        if theirs != ours_tokens:
            failures.append("CTranslate2 float32 greedy tokens differ from neoxja float32: it is not the same model")
        int8_tokens = ours_int8.generate(prompt, max_new_tokens=new)[0, args.prompt:].tolist()
        theirs8 = ct2["CTranslate2 int8"][0]()
        print(f"(for information) greedy tokens equal to neoxja float32: neoxja int8 "
              f"{sum(x == y for x, y in zip(int8_tokens, ours_tokens))}/{new}, CTranslate2 int8 "
              f"{sum(x == y for x, y in zip(theirs8, ours_tokens))}/{new} (random weights: logits are close, so "
              f"int8 rounding flips greedy choices)", flush=True)
    elif not args.no_ctranslate2:
        print("ctranslate2 is not installed (pip install -e '.[export]'): CTranslate2 contenders skipped", flush=True)

    contenders = {  # name: (generate call, rows, model whose weights each step reads)
        "transformers float32 batch 1": (lambda: ref.generate(prompt, max_new_tokens=new, min_new_tokens=0,
                                                               do_sample=False, pad_token_id=0), 1, ref),
        "neoxja float32 batch 1": (lambda: ours.generate(prompt, max_new_tokens=new), 1, ours),
        # int8 and int4 also clock their decode steps apart from the prefill (StepClock)
        "neoxja int8 batch 1": (lambda: clocks["neoxja int8 batch 1"].run(
            lambda **kw: ours_int8.generate(prompt, max_new_tokens=new, **kw)), 1, ours_int8),
        # as `neoxja generate --quantize int8 --compile` runs it: the decode step through torch.compile (the
        # int8 products as the custom op neoxja::int8_dynamic_linear, the small ops between them fused)
        "neoxja int8 compiled batch 1": (lambda: clocks["neoxja int8 compiled batch 1"].run(
            lambda **kw: ours_int8.generate(prompt, max_new_tokens=new, compile=True, **kw)), 1, ours_int8),
        "neoxja int4 batch 1": (lambda: clocks["neoxja int4 batch 1"].run(
            lambda **kw: ours_int4.generate(prompt, max_new_tokens=new, **kw)), 1, ours_int4),
        "neoxja int4 torch-kernel batch 1": (lambda: clocks["neoxja int4 torch-kernel batch 1"].run(
            lambda **kw: ours_int4_torch.generate(prompt, max_new_tokens=new, **kw)), 1, ours_int4_torch),
        "neoxja int4 compiled batch 1": (lambda: clocks["neoxja int4 compiled batch 1"].run(
            lambda **kw: ours_int4.generate(prompt, max_new_tokens=new, compile=True, **kw)), 1, ours_int4),
    }
    clocks = {"neoxja int8 batch 1": StepClock(), "neoxja int8 compiled batch 1": StepClock(),
              "neoxja int4 batch 1": StepClock(), "neoxja int4 torch-kernel batch 1": StepClock(),
              "neoxja int4 compiled batch 1": StepClock()}
    decode_tok_s = {name: [] for name in clocks}
    for name, (run, path) in ct2.items():
        # weights per step: read the same matrices as ours at its precision (for the bandwidth fraction)
        contenders[name] = (run, 1, ours if name.endswith("float32") else ours_int8)
    contenders["float32 weight products alone"] = (weight_products(ours, args.prompt, new), 1, ours)
    if not args.no_batch:
        contenders["neoxja float32 batch 8"] = (lambda: ours.generate(batch_prompt, max_new_tokens=new), 8, ours)
        contenders["neoxja int8 batch 8"] = (lambda: ours_int8.generate(batch_prompt, max_new_tokens=new), 8,
                                             ours_int8)
        contenders["neoxja int4 batch 8"] = (lambda: ours_int4.generate(batch_prompt, max_new_tokens=new), 8,
                                             ours_int4)
    for call, _, _ in contenders.values():
        call()  # warm-up
    names = list(contenders)
    tok_s = {name: [] for name in names}
    fraction = {name: [] for name in names}
    bandwidths = []
    for r in range(args.rounds):
        bandwidth = large_read_bandwidth()
        bandwidths.append(bandwidth)
        line = []
        for name in names[r % len(names):] + names[:r % len(names)]:
            call, rows, model = contenders[name]
            t = time.perf_counter()
            call()
            seconds = time.perf_counter() - t
            tok_s[name].append(rows * new / seconds)
            if name in clocks:
                decode_tok_s[name].append(clocks[name].decode_tok_s())
            bound = bandwidth / weight_bytes_per_token(model)  # steps/s if a step only read the weights
            fraction[name].append((new / seconds) / bound)
            line.append(f"{name.replace('neoxja ', '').replace('transformers', 'tf').replace('weight products alone', 'products').replace('CTranslate2', 'ct2').replace(' batch ', ' b')} "
                        f"{rows * new / seconds:.1f}")
        print(f"round {r + 1}: {bandwidth / 1e9:.1f} GB/s; tok/s: " + ", ".join(line), flush=True)

    print(f"\nlarge-read bandwidth: median {statistics.median(bandwidths) / 1e9:.1f} GB/s "
          f"(min {min(bandwidths) / 1e9:.1f}, max {max(bandwidths) / 1e9:.1f})")
    for name in names:
        _, rows, model = contenders[name]
        bound = f"  {statistics.median(fraction[name]):5.1%} of the bandwidth bound" if rows == 1 else ""
        print(f"{name:<30} {statistics.median(tok_s[name]):7.2f} tok/s (median; best {max(tok_s[name]):.2f})  "
              f"weights/step {weight_bytes_per_token(model) / 1e9:.2f} GB{bound}", flush=True)

    def ratio(num: str, den: str) -> float:
        return statistics.median(x / y for x, y in zip(tok_s[num], tok_s[den]))

    ceiling = ratio("float32 weight products alone", "transformers float32 batch 1")
    print(f"ceiling: the float32 weight products alone (the MKL calls both sides make, nothing else) run "
          f"{ceiling:.2f}x as fast as transformers' whole generate; no float32 implementation that calls "
          f"these kernels can beat transformers by more")
    print(f"(for information, a retired goal) float32 / transformers: "
          f"{ratio('neoxja float32 batch 1', 'transformers float32 batch 1'):.2f}x")
    checks = [(name, ratio(num, den), goal) for name, (num, den, goal) in LIVE_GOALS.items()
              if not (args.no_batch and "batch 8" in num)]
    if ct2:
        print(f"(for information) neoxja int8 eager / CTranslate2 int8: "
              f"{ratio('neoxja int8 batch 1', 'CTranslate2 int8'):.2f}x")
        checks.append(("int8 >= 1.0x CTranslate2 int8 (neoxja int8 compiled: generate --quantize int8 --compile)",
                       ratio("neoxja int8 compiled batch 1", "CTranslate2 int8"), 1.0))
        print(f"(for information) neoxja float32 / CTranslate2 float32: "
              f"{ratio('neoxja float32 batch 1', 'CTranslate2 float32'):.2f}x")
    for name, rates in decode_tok_s.items():
        print(f"{name + ', decode steps':<30} {statistics.median(rates):7.2f} tok/s (median; best {max(rates):.2f}; "
              f"the same generations, prefill and first token left out)")
    decode_ratio = statistics.median(x / y for x, y in zip(decode_tok_s["neoxja int4 batch 1"],
                                                            decode_tok_s["neoxja int8 batch 1"]))
    print(f"(for information) int4 ({int4_kernel} kernel) / int8 end to end, the {args.prompt}-token prefill "
          f"included: {ratio('neoxja int4 batch 1', 'neoxja int8 batch 1'):.2f}x (on a prompt's many rows the "
          f"products are bound by arithmetic, not by the weights' bytes: there the AVX512 int4 kernel runs near "
          f"FBGEMM int8's speed, the AVX2 one below it)")
    if not args.no_batch:
        print(f"(for information) int4 / int8 at batch 8: {ratio('neoxja int4 batch 8', 'neoxja int8 batch 8'):.2f}x "
              f"(8 rows: each weight chunk loaded once for 4 rows on the AVX512 kernel, 3 on the AVX2 one)")
    torch_ratio = statistics.median(x / y for x, y in zip(decode_tok_s["neoxja int4 torch-kernel batch 1"],
                                                          decode_tok_s["neoxja int8 batch 1"]))
    print(f"(for information) int4 with torch's kernel / int8, decode steps: {torch_ratio:.2f}x; int4 "
          f"({int4_kernel}) / int4 (torch's kernel), decode steps: " + "{:.2f}x".format(statistics.median(
              x / y for x, y in zip(decode_tok_s["neoxja int4 batch 1"],
                                    decode_tok_s["neoxja int4 torch-kernel batch 1"]))))
    checks.append((f"int4 ({int4_kernel} kernel) >= 1.3x our int8 (decode steps)", decode_ratio, 1.3))
    print("(for information) both compiled (generate(compile=True)), int4 / int8, decode steps: {:.2f}x".format(
        statistics.median(x / y for x, y in zip(decode_tok_s["neoxja int4 compiled batch 1"],
                                                decode_tok_s["neoxja int8 compiled batch 1"]))))
    # where a batch-1 token's time goes (one more generation each, linear layers timed in place)
    for name in ("neoxja float32 batch 1", "neoxja int8 batch 1", "neoxja int4 batch 1"):
        call, _, model = contenders[name]
        products, rest = time_in_products(model, call, new)
        print(f"(for information) {name}, per new token (prefill included): {products:.1f} ms in the weight "
              f"products, {rest:.1f} ms in everything else (attention, norms, rotary, cache writes, sampling, Python)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (a shared machine: the ratios are provisional)",
          flush=True)
    failed = False
    for name, value, goal in checks:
        ok = value >= goal
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f}x (median of per-round ratios)", flush=True)
    for failure in failures:
        print(f"FAIL  {failure}", flush=True)
    return 1 if failures or (failed and not args.skip_checks) else 0


def run_pair(args) -> int:
    """neoxja and transformers in one dtype, in one process, alternately for `rounds` rounds (the table's
    rows run one after another in separate processes, where a change of load between them shows up as a
    difference between implementations)."""
    import statistics

    import transformers

    dtype = getattr(torch, args.pair)
    cfg = full_width_config(args.layers)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no float32 copy on the way
    ours = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**cfg)).eval()
    ref = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**cfg)).eval()
    ref.load_state_dict(ours.state_dict())
    torch.set_default_dtype(torch.float32)
    prompt = torch.randint(0, 31000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    calls = {"neoxja": lambda: ours.generate(prompt, max_new_tokens=args.new),
             "transformers": lambda: ref.generate(prompt, max_new_tokens=args.new, do_sample=False, pad_token_id=0)}
    for call in calls.values():
        call()  # warm-up
    tok_s = {name: [] for name in calls}
    for r in range(args.rounds):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            t = time.perf_counter()
            calls[name]()
            tok_s[name].append(args.new / (time.perf_counter() - t))
        print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.3f} tok/s" for name, v in tok_s.items()), flush=True)
    ratio = statistics.median(a / b for a, b in zip(tok_s["neoxja"], tok_s["transformers"]))
    print(f"{args.pair}, {args.layers} layers: neoxja/transformers {ratio:.3f}x (median of per-round ratios)")
    return 0


def write_random_checkpoint(directory: Path, layers: int) -> Path:
    """A bfloat16 checkpoint of the 2.7B shape (random weights, one shard per layer, as from_pretrained
    reads it), written one layer at a time so that writing it never holds the whole model either."""
    import json

    from safetensors.torch import save_file

    cfg = GPTNeoXJapaneseConfig(**full_width_config(layers, tie_word_embeddings=False))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = GPTNeoXJapaneseForCausalLM(cfg)
    groups: dict[str, dict] = {}
    for name, p in skeleton.state_dict().items():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        groups.setdefault(layer, {})[name] = p
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for i, (layer, params) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, p in params.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(p.shape, dtype=torch.bfloat16)
            elif name.endswith("bias"):
                tensors[name] = torch.zeros(p.shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    cfg.save_pretrained(directory)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def int4_memory_row(args) -> int:
    """In this (fresh) process: load the checkpoint quantized to int4 layer by layer, then generate; print
    the peak RSS of each phase (VmHWM, Linux)."""
    import json

    from neoxja.quantization import load_quantized

    t = time.perf_counter()
    model = load_quantized(args.int4_memory_row, "int4", group_size=args.group_size, dtype=torch.bfloat16,
                           kernel=args.int4_kernel)
    load_seconds = time.perf_counter() - t
    gc.collect()
    load_peak, after_load = rss_gib("VmHWM"), rss_gib("VmRSS")
    prompt = torch.randint(0, 31000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    model.generate(prompt[:, :4], max_new_tokens=2)  # warm-up
    reset_peak_rss()
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=args.new)
    seconds = time.perf_counter() - t
    assert out.shape[1] == args.prompt + args.new
    print("ROW " + json.dumps(dict(load_seconds=load_seconds, load_peak_gib=load_peak, after_load_gib=after_load,
                                   generate_peak_gib=rss_gib("VmHWM"), tokens_per_s=args.new / seconds,
                                   weights_gb=weight_bytes_per_token(model) / 1e9)), flush=True)
    return 0


def run_int4_memory(args) -> int:
    """The 2.7B shape in int4: a bfloat16 checkpoint on disk (written once into --workdir), loaded by
    `load_quantized` in a fresh process. Goal: RSS <= 2.0 GiB while generating."""
    import json
    import subprocess
    import tempfile

    directory = write_random_checkpoint(Path(args.workdir or tempfile.mkdtemp(prefix="bench-int4-")) / "ckpt",
                                        args.layers)
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    cmd = [sys.executable, __file__, "--int4-memory-row", str(directory), "--layers", str(args.layers),
           "--prompt", str(args.prompt), "--new", str(args.new), "--group-size", str(args.group_size),
           "--int4-kernel", args.int4_kernel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        print(f"failed:\n{proc.stderr[-3000:]}")
        return 1
    r = json.loads(lines[-1][4:])
    print(f"CPU flags: {cpu_flags()}; {args.layers} layers at the 2.7B width, checkpoint {size / 2**30:.2f} GiB "
          f"(bfloat16), int4 group {args.group_size}, weights read per step {r['weights_gb']:.2f} GB")
    print(f"loading (quantized layer by layer): {r['load_seconds']:.1f} s, peak RSS {r['load_peak_gib']:.2f} GiB, "
          f"RSS after loading {r['after_load_gib']:.2f} GiB")
    print(f"generating (prompt {args.prompt}, {args.new} new, batch 1): {r['tokens_per_s']:.2f} tok/s, "
          f"peak RSS {r['generate_peak_gib']:.2f} GiB")
    ok = r["generate_peak_gib"] <= 2.0
    print(f"{'PASS' if ok else 'FAIL'}  RSS while generating <= 2.0 GiB: {r['generate_peak_gib']:.2f} GiB")
    return 0 if ok or args.skip_checks else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the side-by-side checks (median reported)")
    p.add_argument("--table", action="store_true",
                   help="README table: transformers and neoxja in float32 and bfloat16, neoxja int8, each in its "
                        "own process, tokens/s and peak memory")
    p.add_argument("--row", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--pair", choices=["float32", "bfloat16", "float16"],
                   help="only neoxja vs transformers in this dtype, alternately in one process")
    p.add_argument("--skip-checks", action="store_true", help="print numbers without checking the goals")
    p.add_argument("--no-batch", action="store_true", help="skip the batch-8 measurements")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for both sides (default: torch's choice)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--int4-kernel", choices=("auto", "torch", "avx512_bf16", "avx2"), default="auto",
                   help="the int4 kernel of the int4 contenders and of --int4-memory (default auto: what quantize "
                        "chooses here); with FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 "
                        "ONEDNN_MAX_CPU_ISA=AVX2 and --int4-kernel avx2, what an AVX2 CPU runs")
    p.add_argument("--no-ctranslate2", action="store_true", help="skip the CTranslate2 contenders")
    p.add_argument("--workdir", help="where exports and checkpoints go (default: a temporary directory)")
    p.add_argument("--int4-memory", action="store_true",
                   help="the 2.7B shape (use --layers 32) in int4: peak RSS loading and generating, in a fresh process")
    p.add_argument("--int4-memory-row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        table_row(args.row[0], args.row[1], args)
        return 0
    if args.table:
        return run_table(args)
    if args.pair:
        return run_pair(args)
    if args.int4_memory_row:
        return int4_memory_row(args)
    if args.int4_memory:
        return run_int4_memory(args)
    return run_side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
