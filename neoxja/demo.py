"""`neoxja demo`: the main job of `make demo`.

With the bundled model: generate a continuation of a Japanese prompt, offline.
Without it (or with --tokenizer-only): tokenize and decode a sample sentence.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SAMPLE = "吾輩は猫である🐯。実は慶応(慶應)大学出身"
PROMPT = "吾輩は猫である。"
# The abeja tokenizer files sit in ../shared beside a checkout; the package never copies them.
SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "abeja-gpt-neox-japanese-2.7b"


def tokenizer_demo(tokenizer_dir: Path, text: str) -> None:
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok.encode(text)
    print(f"text:    {text}")
    print(f"tokens:  {tok.convert_ids_to_tokens(ids)}")
    print(f"ids:     {ids}")
    print(f"decoded: {tok.decode(ids)}")


def generation_demo(model_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> None:
    import torch

    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(str(model_dir))
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    input_ids = tok(prompt, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(
        input_ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, generator=generator,
        vocab_limit=len(tok),
    )
    seconds = time.perf_counter() - start
    print(f"model:  {model_dir} ({model.num_parameters() / 1e6:.1f}M parameters; a small demonstration model)")
    print(f"prompt: {prompt}")
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    new = out.shape[1] - max(input_ids.shape[1], 1)  # an empty prompt starts from BOS, which generate() adds
    print(f"[{new} new tokens in {seconds:.2f}s, {new / seconds:.1f} tokens/s]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoxja demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=PROMPT, help=f"text to continue (default {PROMPT})")
    parser.add_argument("--max-new-tokens", type=int, default=80, metavar="N", help="new tokens (default 80)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed of the sampling (temperature 0.8, top-p 0.95) (default 0)")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="only tokenize and decode a sample, even with the bundled model (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")

    from neoxja.assets import bundled_model_dir

    model_dir = bundled_model_dir()
    if model_dir is not None and not args.tokenizer_only:
        try:
            generation_demo(model_dir, args.prompt, args.max_new_tokens, args.seed)
        except ValueError as err:  # e.g. a prompt longer than the model's positions
            print(f"neoxja demo: error: {err}", file=sys.stderr)
            return 2
        return 0
    tokenizer_dir = model_dir or (SHARED_TOKENIZER if (SHARED_TOKENIZER / "vocab.txt").is_file() else None)
    if tokenizer_dir is None:
        print("neoxja demo: no bundled model and no tokenizer files found", file=sys.stderr)
        return 1
    tokenizer_demo(tokenizer_dir, SAMPLE)
    return 0
