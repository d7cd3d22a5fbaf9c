"""Batches from the token files written by `neoxja prepare`.

The token stream is cut into windows of seq_len + 1 tokens (inputs and their next-token targets),
windows i and i + 1 overlapping by one token. Training visits the windows in a fresh permutation
per epoch, drawn from (seed, epoch) alone, so sample k of the run is a pure function of k:
resuming needs nothing but the number of samples consumed, and every process can compute its
own rows of a global batch without talking to the others.

A global batch (one micro-step) is samples [s, s + B) with B = world_size * batch_size and s the
samples consumed so far; rank r takes rows [r * batch_size, (r + 1) * batch_size) of it.
N processes with batch b therefore see exactly the rows one process with batch N * b sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A prepared-data directory that cannot be used."""


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if Path(data_dir).is_file():
        raise DataError(f"--data {data_dir} is a file, not prepared data: prepare it first with `neoxja prepare "
                        f"--tokenizer DIR_OR_HUB_ID --out DIR {data_dir}`, then train with --data DIR")
    if not path.is_file():
        raise DataError(f"{path} not found: run `neoxja prepare --out {data_dir} ...` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    for key in ("dtype", "train", "val", "tokenizer"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}")
    return manifest


def open_tokens(data_dir: str | Path, split: str, manifest: dict) -> np.ndarray:
    """The token ids of one split as a read-only memory map (an empty array for an empty split)."""
    path = Path(data_dir) / manifest[split]["file"]
    dtype = np.dtype(manifest["dtype"])
    if not path.is_file():
        raise DataError(f"{path} not found")
    size = path.stat().st_size
    expected = manifest[split]["tokens"] * dtype.itemsize
    if size != expected:
        raise DataError(f"{path}: {size} bytes, but the manifest promises {expected} (truncated or replaced?)")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows:
    """Windows of seq_len + 1 tokens over one token array, in a seeded order per epoch (or in file order)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:  # one permutation at a time: batches move forward
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._epoch_order[1]

    def window_index(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_windows)
        return int(self._order(epoch)[i]) if self.shuffle else i

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first_sample .. first_sample + batch_size - 1 as (inputs, targets), each (B, T) int64."""
        T = self.seq_len
        starts = [self.window_index(k) * T for k in range(first_sample, first_sample + batch_size)]
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class DistributedBatches:
    """This rank's rows of the global batch that starts at a given sample."""

    def __init__(self, windows: TokenWindows, batch_size: int, rank: int = 0, world_size: int = 1):
        self.windows = windows
        self.batch_size = batch_size
        self.rank = rank
        self.global_batch_size = batch_size * world_size

    def __call__(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(first_sample + self.rank * self.batch_size, self.batch_size)
