"""metrics.jsonl (one JSON object per optimizer step) and the loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np


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


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draw training loss (and validation loss where logged) against step.

    Uses matplotlib when it is installed (labelled axes); otherwise draws the curves with numpy and
    writes the PNG with zlib, so the picture exists in every installation.
    """
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    png_path = Path(png_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(png_path, _draw_curves(train, val))
        return png_path
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


WHITE, GRID, AXIS = (255, 255, 255), (225, 225, 225), (0, 0, 0)
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # train, validation (matplotlib's first two colours)
# 3x5 pixel glyphs for the axis numbers, row by row
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "+": "000010111010000",
}


def _draw_text(image: np.ndarray, text: str, row: int, col: int, scale: int = 2) -> None:
    """Draw `text` with its top-left corner at (row, col)."""
    for i, char in enumerate(text):
        glyph = np.array([int(b) for b in GLYPHS.get(char, "0" * 15)], dtype=bool).reshape(5, 3)
        glyph = glyph.repeat(scale, 0).repeat(scale, 1)
        top, left = row, col + i * 4 * scale
        region = image[top : top + glyph.shape[0], left : left + glyph.shape[1]]
        region[glyph[: region.shape[0], : region.shape[1]]] = AXIS


def _text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale - scale


def _draw_curves(train, val, width: int = 800, height: int = 500, margin: int = 64) -> np.ndarray:
    """Train loss in blue, validation loss in orange with markers; loss values at the grid lines,
    first and last step under the x axis."""
    image = np.full((height, width, 3), WHITE, dtype=np.uint8)
    points = train + val
    if not points:
        return image
    steps = np.array([p[0] for p in points], dtype=float)
    losses = np.array([p[1] for p in points], dtype=float)
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
    y0, y1 = losses.min(), losses.max()
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def to_pixels(step, loss):
        col = margin + (np.asarray(step, float) - x0) / (x1 - x0) * (width - 2 * margin)
        row = height - margin - (np.asarray(loss, float) - y0) / (y1 - y0) * (height - 2 * margin)
        return np.rint(row).astype(int), np.rint(col).astype(int)

    for frac in np.linspace(0, 1, 6):  # horizontal grid lines, labelled with their loss
        row = int(margin + frac * (height - 2 * margin))
        image[row, margin : width - margin] = GRID
        label = f"{y1 - frac * (y1 - y0):.3g}"
        _draw_text(image, label, row - 5, margin - 6 - _text_width(label))
    for step in (x0, x1):
        label = f"{step:.0f}"
        col = to_pixels(step, y0)[1] - _text_width(label) // 2
        _draw_text(image, label, height - margin + 8, max(0, min(col, width - _text_width(label))))
    image[margin : height - margin + 1, margin] = AXIS
    image[height - margin, margin : width - margin + 1] = AXIS

    def polyline(series, colour):
        rows, cols = to_pixels(*zip(*series))
        for r0, c0, r1, c1 in zip(rows[:-1], cols[:-1], rows[1:], cols[1:]):
            n = max(abs(r1 - r0), abs(c1 - c0), 1) + 1
            image[np.rint(np.linspace(r0, r1, n)).astype(int), np.rint(np.linspace(c0, c1, n)).astype(int)] = colour
        return rows, cols

    if train:
        polyline(train, BLUE)
    if val:
        for r, c in zip(*polyline(val, ORANGE)):
            image[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4] = ORANGE
    return image


def _write_png(path: Path, image: np.ndarray) -> None:
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter type 0 per row
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
