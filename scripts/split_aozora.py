"""Write the train / validation split of the Aozora corpus as JSON lines, for `neoxja vocab build`.

The split is the one `neoxja prepare --val-fraction F` makes of the same file (whole works, chosen
by its fixed-seed permutation), so the vocabulary is built without the works the model is
validated on, and its characters per token can be measured on them.

    .venv/bin/python scripts/split_aozora.py ../shared/corpus/aozora-train.jsonl.gz --val-fraction 0.03 --out /tmp/aozora
writes /tmp/aozora/train.jsonl.gz and /tmp/aozora/val.jsonl.gz (records unchanged, input order kept).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from neoxja.train.prepare import choose_validation_documents  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path, help=".jsonl.gz corpus, one work per line")
    p.add_argument("--val-fraction", type=float, default=0.03)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    with gzip.open(args.corpus, "rb") as f:
        lines = [line for line in f if line.strip()]
    is_val = choose_validation_documents(len(lines), args.val_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", False), ("val", True)):
        # mtime=0: the same bytes every time
        with open(args.out / f"{name}.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.writelines(line for line, v in zip(lines, is_val) if v == keep)
    print(f"{args.out}: {int((~is_val).sum())} train works, {int(is_val.sum())} validation works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
