"""Characters per token of one or more vocabularies on held-out text.

    .venv/bin/python scripts/eval_vocab.py /tmp/aozora/val.jsonl.gz DIR [DIR...]

Each DIR holds vocab.txt and emoji.json (ours or abeja's). Encodes every document with neoxja's
tokenizer when it is importable, else with transformers' (`--reference` forces transformers').
Also reports how many tokens are lossy placeholders (<KIGOU>, <U2000U2BFF>) and byte fallbacks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from neoxja.vocab import list_input_files, read_documents  # noqa: E402


def load_tokenizer(vocab_dir: Path, reference: bool):
    if not reference:
        try:
            from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

            return "neoxja", GPTNeoXJapaneseTokenizer(str(vocab_dir / "vocab.txt"), str(vocab_dir / "emoji.json"))
        except ImportError:
            pass
    from transformers import GPTNeoXJapaneseTokenizer

    return "transformers", GPTNeoXJapaneseTokenizer(str(vocab_dir / "vocab.txt"), str(vocab_dir / "emoji.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", help="held-out text: file, directory or .jsonl(.gz)")
    p.add_argument("vocab_dirs", nargs="+", type=Path)
    p.add_argument("--reference", action="store_true", help="use transformers' tokenizer")
    args = p.parse_args(argv)
    docs = [d for path in list_input_files([args.text]) for d in read_documents(path)]
    chars = sum(len(d) for d in docs)
    print(f"{args.text}: {len(docs)} documents, {chars:,} characters")
    for vocab_dir in args.vocab_dirs:
        impl, tok = load_tokenizer(vocab_dir, args.reference)
        ids = [i for d in docs for i in tok.encode(d)]
        special = {tok.convert_tokens_to_ids(t) for t in ("<KIGOU>", "<U2000U2BFF>")}
        byte_ids = {tok.convert_tokens_to_ids(f"<|byte{b}|>") for b in range(256)}
        lossy = sum(i in special for i in ids)
        fallback = sum(i in byte_ids for i in ids)
        print(f"{str(vocab_dir):60s} {len(tok):6d} ids  "
              f"{len(ids):9,d} tokens  {chars / len(ids):.3f} chars/token  "
              f"byte tokens {fallback:,}  placeholders {lossy:,}  ({impl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
