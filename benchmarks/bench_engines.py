"""neoxja side by side with real inference engines, on the same weights exported by `neoxja.export`.

Same random weights at the 2.7B width (hidden 2560, 32 heads, vocab 32000) with 4 layers; prompt 32 tokens,
64 new tokens, greedy, batch 1, EOS off. Contenders:
  neoxja float32 (plain, and with `neoxja generate`'s measured kernels), int8 (FBGEMM), bfloat16 (where the CPU has AMX-BF16 or AVX512-BF16);
  int8 and bfloat16 also compiled (`generate(compile=True)`, as `neoxja generate --compile` runs them);
  CTranslate2 float32 and int8 (`neoxja.export(..., to="ctranslate2")`);
  llama.cpp F32, F16, Q8_0, Q4_0 (`to="gguf"`) through llama-cpp-python, where it is importable
  (it is not a dependency of this project: it compiles llama.cpp; see docs/engines.md).
CTranslate2 and llama.cpp each run in a worker process of their own (benchmarks/_engine_worker.py: one
process holding torch's OpenMP team and another engine's slows both), timed from here around the call
(the pipe's round trip is well under a millisecond of a >1 s generation).
Every round times each contender once, in a rotated order; each figure is the median over rounds, and
each ratio the median of per-round ratios, so that load from other jobs on a shared machine cannot
favour one side. Printed: tokens/s, size on disk, ratios, and the CPU flags.

Correctness checks printed beside the speeds (the benchmark means something only if the engines compute
the same model): CTranslate2 float32 greedy tokens must equal neoxja float32 (exit 1 otherwise); for
llama.cpp F32, the number of the 64 greedy tokens equal to neoxja's and the first-step logits' max
difference (llama.cpp's GELU is the tanh approximation, ours the exact erf).

    python benchmarks/bench_engines.py                    # 3 rounds
    python benchmarks/bench_engines.py --rounds 5 --threads 2
    PYTHONPATH=/path/to/llama-cpp-python/site-packages python benchmarks/bench_engines.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu import cpu_flag_set as cpu_flags  # noqa: E402  ({flag: present})
from _engine_worker import EngineProcess  # noqa: E402

import torch  # noqa: E402

from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.exporters import export  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM  # noqa: E402
from neoxja.kernels import choose_linear_kernels  # noqa: E402
from neoxja.quantization import quantize  # noqa: E402


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    workers = []  # the engines' worker processes: stopped however the run ends
    try:
        return side_by_side(argv, workers)
    finally:
        for worker in workers:
            worker.close()


def side_by_side(argv, workers: list) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if llama-cpp-python is importable")
    p.add_argument("--workdir", help="where the exports go (default: a temporary directory)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    print(f"CPU flags: {' '.join(f'{k}={int(v)}' for k, v in flags.items())}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.layers} layers at the 2.7B width, prompt "
          f"{args.prompt}, {args.new} new tokens, greedy, batch 1, {args.rounds} rounds", flush=True)

    cfg = GPTNeoXJapaneseConfig(vocab_size=32000, hidden_size=2560, num_hidden_layers=args.layers,
                                num_attention_heads=32, eos_token_id=None, bos_token_id=31996,
                                tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(cfg).eval()
    prompt = torch.randint(0, 31000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    ids = prompt[0].tolist()
    new = args.new

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-engines-"))
    contenders = {}  # name -> (run() -> list of new ids, size in bytes)

    def neoxja_run(m, compile=False):
        return lambda: m.generate(prompt, max_new_tokens=new, do_sample=False,
                                  compile=compile)[0, args.prompt:].tolist()

    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    contenders["neoxja float32"] = (neoxja_run(model), fp32_bytes)
    # what `neoxja generate` runs: the skinny-product kernels measured on this machine (neoxja.kernels)
    contenders["neoxja float32 kernels"] = (neoxja_run(choose_linear_kernels(copy.deepcopy(model))), fp32_bytes)
    int8 = quantize(copy.deepcopy(model), "int8")
    contenders["neoxja int8"] = (neoxja_run(int8), None)
    # as `neoxja generate --compile` runs them: the decode step through torch.compile (compiled on first use)
    contenders["neoxja int8 compiled"] = (neoxja_run(int8, compile=True), None)
    if flags["amx_bf16"] or flags["avx512_bf16"]:
        # as `neoxja generate --dtype bfloat16` runs it: with the kernels measured on this machine
        bf16 = choose_linear_kernels(copy.deepcopy(model).to(torch.bfloat16))
        contenders["neoxja bfloat16"] = (neoxja_run(bf16), fp32_bytes // 2)
        contenders["neoxja bfloat16 compiled"] = (neoxja_run(bf16, compile=True), fp32_bytes // 2)

    # each engine in a worker process of its own (_engine_worker.py): in this process, its OpenMP team and
    # torch's would slow each other down (libgomp stops its idle workers spinning once they outnumber the CPUs)

    def worker_run(spec):
        worker = EngineProcess({**spec, "threads": args.threads, "new": new})
        workers.append(worker)
        return lambda: worker.generate()[0]

    for quant in ("float32", "int8"):
        out = export(model, work / f"ct2-{quant}", to="ctranslate2", quantization=quant, force=True)
        vocab = json.loads((out / "neoxja_vocabulary.json").read_text())
        run = worker_run({"engine": "ctranslate2", "path": str(out), "tokens": [vocab[i] for i in ids],
                          "compute_type": "float32" if quant == "float32" else "int8_float32"})
        contenders[f"CTranslate2 {quant}"] = (run, size_on_disk(out / "model.bin"))

    llama_note = None
    llama_f32 = None
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # only here, for its version and build flags: the workers run it
        except ImportError:
            llama_note = "llama.cpp: llama-cpp-python is not importable here; skipped"
        else:
            # a llama.cpp built with AMX by GCC 12 crashes (SIGSEGV) evaluating a prompt in batches (docs/engines.md):
            # with AMX in the build, prompts go one token per batch (slower prefill, the same tokens)
            amx_build = "AMX" in llama_cpp.llama_print_system_info().decode()
            safe = dict(n_batch=1, n_ubatch=1) if amx_build else {}
            if amx_build:
                print("llama.cpp was built with AMX: n_batch=1 (avoids GCC 12's AMX tile-config crash)")
            for kind in ("f32", "f16", "q8_0", "q4_0"):
                path = export(model, work / f"model-{kind}.gguf", to="gguf", type=kind, force=True)
                run = worker_run({"engine": "llama.cpp", "path": str(path), "ids": ids, "n_ctx": args.prompt + new + 8,
                                  "safe": safe})
                if kind == "f32":
                    llama_f32 = workers[-1]
                contenders[f"llama.cpp {kind.upper()}"] = (run, size_on_disk(path))
            llama_note = f"llama.cpp: llama-cpp-python {llama_cpp.__version__}"

    # correctness, once, before timing
    reference = contenders["neoxja float32"][0]()
    failures = []
    results = {name: run() for name, (run, _) in contenders.items()}
    for name, tokens in results.items():
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
        print(f"  {name:<20} greedy tokens equal to neoxja float32: first {same} of {new}", flush=True)
    if results["CTranslate2 float32"] != reference:
        failures.append("CTranslate2 float32 greedy tokens differ from neoxja float32")
    if llama_f32 is not None:
        import numpy as np

        theirs = np.array(llama_f32.first_logits())
        with torch.no_grad():
            ours = model(prompt).logits[0, -1].numpy()
        print(f"  llama.cpp F32 first-step logits: max |difference| {np.abs(theirs - ours).max():.4g} "
              f"(logits up to {np.abs(ours).max():.3g}; tanh GELU vs erf)", flush=True)
    if llama_note:
        print(llama_note, flush=True)

    # timing: rounds in rotated order
    names = list(contenders)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = time.perf_counter()
            out = contenders[name][0]()
            times[name].append(time.perf_counter() - t)
            assert len(out) == new, (name, len(out))
        print(f"round {r + 1}: " + ", ".join(f"{n} {new / times[n][-1]:.1f}" for n in names), flush=True)

    def ratio(a, b):
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    print(f"\n| engine | tok/s (median of {args.rounds}) | size on disk | vs neoxja float32 |")
    print("|---|---|---|---|")
    for n in names:
        size = contenders[n][1]
        print(f"| {n} | {new / statistics.median(times[n]):.1f} | "
              f"{f'{size / 1e9:.2f} GB' if size else '-'} | {ratio(n, 'neoxja float32'):.2f}x |")
    pairs = [("neoxja int8", "CTranslate2 int8"), ("neoxja int8 compiled", "CTranslate2 int8"),
             ("neoxja float32", "CTranslate2 float32"), ("neoxja float32 kernels", "CTranslate2 float32"),
             ("neoxja int8", "llama.cpp Q8_0"), ("neoxja bfloat16", "llama.cpp F16"),
             ("neoxja bfloat16 compiled", "llama.cpp F16"), ("neoxja float32", "llama.cpp F32")]
    print("\nratios (median of per-round ratios; >1 means neoxja is faster):")
    for a, b in pairs:
        if a in times and b in times:
            print(f"  {a} / {b}: {ratio(a, b):.2f}x")
    print("(taken on a shared machine: other jobs load the cores; treat the ratios as provisional)")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
