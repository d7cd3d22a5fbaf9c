"""Copy a trained model into the package as the bundled model, with half-precision weights.

    .venv/bin/python scripts/export_bundled_model.py /tmp/aozora-small/train/final

reads the Hugging Face directory that `neoxja train` wrote (OUT/final), stores its weights as
float16 (half the size; both neoxja and transformers load them, and the demo upcasts to float32),
and writes config.json, model.safetensors and the tokenizer files to neoxja/assets/aozora-small/
(or --out). Refuses to write more than 20 MB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

MAX_BYTES = 20 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    import torch

    from neoxja.assets import default_model_dir
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trained", type=Path, help="directory written by `neoxja train` (OUT/final)")
    p.add_argument("--out", type=Path, default=default_model_dir())
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = p.parse_args(argv)

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(str(args.trained), dtype=torch.float32)
    model = model.to(getattr(torch, args.dtype))
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(str(args.trained))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    files = sorted(f for f in args.out.iterdir() if f.is_file())
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"  {f.name:28s} {f.stat().st_size:>12,d} bytes")
    print(f"{args.out}: {model.num_parameters() / 1e6:.2f}M parameters ({args.dtype}), {total / 1e6:.2f} MB in total")
    if total > MAX_BYTES:
        print(f"error: the bundled model must stay within {MAX_BYTES:,} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
