"""Draw float32 against bf16-autocast training curves of the same `neoxja train` run for docs/bf16.md.

    /path/to/python-with-matplotlib scripts/plot_bf16_loss.py docs/bf16/metrics-float32.jsonl \\
        docs/bf16/metrics-bfloat16.jsonl docs/bf16-loss.png [--steps 200]

Dev-time tool (matplotlib is not a dependency of neoxja, as for scripts/plot_training_curve.py). Top: both
training losses (per step, faint; 10-step means, bold) and validation losses. Bottom: bf16 minus float32
per step, against the band of the float32 curve's own step-to-step noise (+-1 standard deviation of the
loss around its 9-step centred mean). Prints the numbers the docs quote.
"""

from __future__ import annotations

import argparse
import json

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str, steps: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if r["step"] <= steps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("float32")
    p.add_argument("bfloat16")
    p.add_argument("png")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    runs = {"float32": read(args.float32, args.steps), "bfloat16": read(args.bfloat16, args.steps)}
    loss = {k: np.array([r["loss"] for r in v]) for k, v in runs.items()}
    steps = np.array([r["step"] for r in runs["float32"]])
    assert len(loss["float32"]) == len(loss["bfloat16"]) == args.steps, "both runs need every step"

    fp32 = loss["float32"]
    centred = np.convolve(fp32, np.ones(9) / 9, mode="valid")  # (steps - 8,)
    noise = float(np.std(fp32[4:-4] - centred))
    diff = loss["bfloat16"] - fp32

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    colours = {"float32": "tab:blue", "bfloat16": "tab:red"}
    for name, values in loss.items():
        mean10 = [values[max(0, i - 9): i + 1].mean() for i in range(len(values))]
        top.plot(steps, values, color=colours[name], alpha=0.2, linewidth=1)
        top.plot(steps, mean10, color=colours[name], linewidth=1.6,
                 label=f"{name}{' autocast (float32 master weights)' if name == 'bfloat16' else ''}: "
                       "training loss, 10-step mean")
        val = [(r["step"], r["val_loss"]) for r in runs[name] if "val_loss" in r]
        if val:
            top.plot(*zip(*val), "o--", color=colours[name], markersize=4, linewidth=0.8,
                     label=f"{name}: validation loss")
    top.set_ylabel("cross-entropy (nats per token)")
    top.set_title(f"bundled-model recipe, first {args.steps} steps: float32 vs bf16 autocast (same seed and batches)", fontsize=10)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.axhspan(-noise, noise, color="tab:blue", alpha=0.12, label=f"float32 step-to-step noise (±{noise:.3f})")
    bottom.plot(steps, diff, color="tab:red", linewidth=1, label="bf16 − float32, per step")
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_xlabel("optimizer step (16 × 256 tokens each)")
    bottom.set_ylabel("loss difference")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)

    print(f"float32 step-to-step noise (sd around the 9-step centred mean): {noise:.4f}")
    print(f"bf16 - float32 per step: max |d| {np.abs(diff).max():.4f}, sd {diff.std():.4f}")
    for lo, hi in ((1, 50), (51, 100), (101, 150), (151, 200)):
        print(f"  steps {lo}-{hi}: mean {diff[lo - 1:hi].mean():+.4f}")
    for name, run in runs.items():
        print(f"{name} validation: " + ", ".join(f"step {r['step']} {r['val_loss']:.4f}" for r in run if "val_loss" in r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
