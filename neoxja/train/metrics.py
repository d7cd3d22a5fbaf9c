"""metrics.jsonl (one JSON object per optimizer step) and the loss plot drawn from it with matplotlib
(the `neoxja[train]` extra)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a torn last line (process killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """Appends one line per step and flushes it, so a killed run loses at most the line being written."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Fresh run: start empty. Resumed run: keep the lines up to the checkpoint's step; the steps
        # after it are recomputed and logged again.
        keep = [] if resume_step is None else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- loss curve

PLOT_HINT = ("the loss plot needs matplotlib, which is not installed: pip install 'neoxja[train]', then draw it with "
             "python -m neoxja.train.metrics {metrics} {png}")


def loss_figure(records: list[dict], log_y: bool = False):
    """A matplotlib Figure: training and validation loss against step (log-scale loss with `log_y`), and the
    learning rate on a second y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    lines = []
    if train:
        lines += ax.plot(*zip(*train), color="tab:blue", linewidth=1, label="training loss")
    if val:
        lines += ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if lr:
        lr_ax = ax.twinx()
        lines += lr_ax.plot(*zip(*lr), color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    return fig


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, log_y: bool = False) -> Path | None:
    """Draw OUT/metrics.jsonl into a PNG (see loss_figure). Without matplotlib (the `train` extra), print how
    to get the plot and return None: the run itself needs no plot."""
    png_path = Path(png_path)
    try:
        fig = loss_figure(read_metrics(metrics_path), log_y)
    except ImportError:
        print(PLOT_HINT.format(metrics=metrics_path, png=png_path), file=sys.stderr)
        return None
    import matplotlib.pyplot as plt

    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)  # never a half-written picture
    return png_path


def main(argv: list[str] | None = None) -> int:
    """python -m neoxja.train.metrics METRICS_JSONL PNG [--log-y]: (re)draw a run's loss plot."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m neoxja.train.metrics", description=main.__doc__)
    p.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    p.add_argument("png", type=Path, help="the picture to write")
    p.add_argument("--log-y", action="store_true", help="loss on a log scale (default: linear)")
    args = p.parse_args(argv)
    if not args.metrics.is_file():
        print(f"error: {args.metrics}: no such file", file=sys.stderr)
        return 2
    return 0 if plot_loss_curve(args.metrics, args.png, args.log_y) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
