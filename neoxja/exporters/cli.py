"""`neoxja export`: write a model in a format other inference engines load.

    neoxja export --to gpt-neox --model DIR_OR_HUB_ID --out DIR              # transformers, vLLM, TGI
    neoxja export --to ctranslate2 --quantization int8 --model DIR --out DIR
    neoxja export --to gguf --type q8_0 --model DIR --out model.gguf        # llama.cpp

Without --model, the bundled model is exported. See docs/engines.md for running each engine.
"""

from __future__ import annotations

import argparse
import sys
import time

from neoxja.exporters import FORMATS


def build_parser() -> argparse.ArgumentParser:
    from neoxja.exporters.ctranslate2 import QUANTIZATIONS
    from neoxja.exporters.gguf import TYPES

    p = argparse.ArgumentParser(prog="neoxja export", description="Export a model for another inference engine.")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="model directory or hub id (default: the bundled model)")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory (gguf: output file)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model's)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="ctranslate2 weight type (default float32)")
    p.add_argument("--type", choices=TYPES, help="gguf tensor type (default f32)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="gpt-neox shard size (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from neoxja.exporters import ExportError, export
    from neoxja.generate_cli import resolve_model

    try:
        model = resolve_model(args.model)
        start = time.perf_counter()
        out = export(model, args.out, to=args.to, tokenizer=args.tokenizer, quantization=args.quantization,
                     type=args.type, force=args.force, max_shard_size=args.max_shard_size)
    except (ExportError, FileNotFoundError) as e:
        print(f"neoxja export: error: {e}", file=sys.stderr)
        return 2
    detail = {"ctranslate2": f" ({args.quantization or 'float32'})", "gguf": f" ({args.type or 'f32'})"}.get(args.to, "")
    print(f"exported {model} to {out} as {args.to}{detail} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
