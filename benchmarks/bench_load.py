"""Checkpoint loading: peak memory and time, neoxja vs transformers' from_pretrained, on the same files.

Writes a synthetic bfloat16 checkpoint of the full abeja/gpt-neox-japanese-2.7b shape (32 layers, hidden 2560,
vocab 32000, untied head; about 5.4 GB as safetensors shards) under a temporary directory in /tmp, loads it
once with each library in its own subprocess (so each peak RSS is clean), and deletes it afterwards.
Each side loads (dtype as stored: bfloat16), then reads every weight once, so lazily mapped pages count too.
Goal: neoxja's peak resident memory <= 1.25x the checkpoint's size on disk.

    .venv/bin/python benchmarks/bench_load.py [--layers 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_checkpoint(directory: Path, layers: int) -> int:
    """Synthetic bf16 checkpoint, written one layer at a time; returns the bytes on disk."""
    import torch

    from neoxja.checkpoint import save_pretrained
    from neoxja.config import GPTNeoXJapaneseConfig
    from neoxja.model import GPTNeoXJapaneseForCausalLM

    config = GPTNeoXJapaneseConfig(num_hidden_layers=layers, tie_word_embeddings=False)
    with torch.device("meta"):
        model = GPTNeoXJapaneseForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    # fill each parameter with cheap pseudo-random bf16 values (the content does not matter, the bytes do)
    pattern = (torch.rand(1 << 20, generator=generator) * 0.04 - 0.02).to(torch.bfloat16)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            data = pattern.repeat(p.numel() // pattern.numel() + 1)[: p.numel()].view(p.shape).clone()
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    model.gpt_neox_japanese.rotary_emb.inv_freq = model.gpt_neox_japanese.rotary_emb.compute_inv_freq(config)
    save_pretrained(model, directory, max_shard_size="2GB")
    del model
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def measure(side: str, directory: str) -> dict:
    """Runs in a fresh subprocess: import, load, touch every weight; report time and memory."""
    import torch

    if side == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        load = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained
    else:
        sys.path.insert(0, str(REPO))
        from neoxja.model import GPTNeoXJapaneseForCausalLM

        load = GPTNeoXJapaneseForCausalLM.from_pretrained
    baseline = rss_mb()
    start = time.perf_counter()
    model = load(directory)
    seconds = time.perf_counter() - start
    checksum = 0.0
    with torch.no_grad():  # read every weight once, in chunks so that the check itself allocates little
        for p in model.parameters():
            for chunk in p.detach().reshape(-1).split(1 << 22):
                checksum += float(chunk.sum(dtype=torch.float32))
    seconds_touched = time.perf_counter() - start
    return {"side": side, "seconds": seconds, "seconds_incl_touch": seconds_touched, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb(), "final_rss_mb": rss_mb(), "dtype": str(model.dtype),
            "parameters": sum(p.numel() for p in model.parameters()), "checksum": checksum}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--keep", help="use/keep the checkpoint in this directory instead of a temporary one")
    parser.add_argument("--measure", nargs=2, metavar=("SIDE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0

    sys.path.insert(0, str(REPO))
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="neoxja-bench-load-", dir="/tmp"))
    try:
        if not (directory / "config.json").exists():
            start = time.perf_counter()
            size = write_checkpoint(directory, args.layers)
            print(f"wrote synthetic checkpoint in {time.perf_counter() - start:.1f} s")
        size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        results = {}
        for side in ("neoxja", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--measure", side, str(directory)], capture_output=True,
                                 text=True, check=True)
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    gb = size / 1e9
    print(f"checkpoint: {args.layers} layers, hidden 2560, vocab 32000, bfloat16 safetensors (2GB shards), "
          f"{gb:.2f} GB on disk")
    print(f"{'':14s} {'load s':>8s} {'+touch s':>9s} {'peak RSS GB':>12s} {'peak/disk':>10s} "
          f"{'import RSS GB':>14s} {'(peak-import)/disk':>19s}")
    for side, r in results.items():
        peak = r["peak_rss_mb"] * 2**20 / 1e9
        base = r["baseline_rss_mb"] * 2**20 / 1e9
        print(f"{side:14s} {r['seconds']:8.2f} {r['seconds_incl_touch']:9.2f} {peak:12.2f} {peak / gb:9.2f}x "
              f"{base:14.2f} {(peak - base) / gb:18.2f}x")
    assert results["neoxja"]["checksum"] == results["transformers"]["checksum"], "the two loads differ"
    assert results["neoxja"]["dtype"] == results["transformers"]["dtype"] == "torch.bfloat16"
    ours_peak = results["neoxja"]["peak_rss_mb"] * 2**20
    ratio = ours_peak / size
    print(f"neoxja peak RSS / size on disk: {ratio:.2f}x (goal <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'}); "
          f"time neoxja / transformers: {results['neoxja']['seconds'] / results['transformers']['seconds']:.2f}x")
    return 0 if ratio <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
