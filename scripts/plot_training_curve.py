"""Draw the training curve of a `neoxja train` run (OUT/metrics.jsonl) for the docs.

    /path/to/python-with-matplotlib scripts/plot_training_curve.py OUT/metrics.jsonl docs/bundled-model-loss.png

Dev-time tool for the docs' figure: needs matplotlib (`pip install 'neoxja[train]'`, which also gives
`neoxja train` its OUT/loss.png). Plots training loss (per step, and its 10-step mean) and validation loss, in nats per
token, against tokens seen.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str]) -> int:
    metrics_path, png_path = argv
    with open(metrics_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    tokens, loss = zip(*train)
    smooth = [sum(loss[max(0, i - 9): i + 1]) / len(loss[max(0, i - 9): i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([t / 1e6 for t in tokens], loss, color="tab:blue", alpha=0.3, linewidth=1, label="training loss (per step)")
    ax.plot([t / 1e6 for t in tokens], smooth, color="tab:blue", linewidth=1.5, label="training loss (10-step mean)")
    if val:
        ax.plot([t / 1e6 for t, _ in val], [v for _, v in val], "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("neoxja bundled model (aozora-small): training on Aozora Bunko")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
