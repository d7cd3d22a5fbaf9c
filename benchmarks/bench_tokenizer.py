"""Tokenizer throughput: neoxja against transformers' GPTNeoXJapaneseTokenizer, in one run.

Two workloads from the Aozora Bunko corpus: one long document (1M characters) and many short
documents (2,000 of at most 200 characters).  For each: encode and decode throughput of both
tokenizers and their ratio, after checking that the ids are identical apart from the comma
(defect 1 of the port: it encodes "," as <|byte44|>).

    .venv/bin/python benchmarks/bench_tokenizer.py [--chars 1000000] [--docs 2000] [--doc-chars 200]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def load_works(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def short_documents(works: list[str], count: int, size: int) -> list[str]:
    """count pieces of size characters, taken round-robin from all works (so every work contributes)."""
    pieces, offset = [], 0
    while len(pieces) < count:
        before = len(pieces)
        for work in works:
            if offset + size <= len(work):
                pieces.append(work[offset : offset + size])
                if len(pieces) == count:
                    break
        if len(pieces) == before:
            raise SystemExit("corpus too small for the requested documents")
        offset += 10 * size
    return pieces


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-dir", type=Path, default=SHARED / "tokenizers" / "abeja-gpt-neox-japanese-2.7b")
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus" / "aozora-train.jsonl.gz")
    parser.add_argument("--chars", type=int, default=1_000_000, help="length of the long document")
    parser.add_argument("--docs", type=int, default=2000, help="number of short documents")
    parser.add_argument("--doc-chars", type=int, default=200, help="length of each short document")
    parser.add_argument("--repeat", type=int, default=3, help="runs of neoxja (best is kept); transformers runs once")
    args = parser.parse_args(argv)

    from transformers import GPTNeoXJapaneseTokenizer as PortTokenizer

    from neoxja import tokenizer as tokmod
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    ours = GPTNeoXJapaneseTokenizer.from_pretrained(args.vocab_dir)
    ours_python = GPTNeoXJapaneseTokenizer.from_pretrained(args.vocab_dir, use_compiled=False)
    port = PortTokenizer(str(args.vocab_dir / "vocab.txt"), str(args.vocab_dir / "emoji.json"))
    comma, byte44 = ours.vocab[","], ours.vocab["<|byte44|>"]

    works = load_works(args.corpus)
    long_doc = "\n".join(works)[: args.chars]
    docs = short_documents(works, args.docs, args.doc_chars)
    n_short_chars = sum(map(len, docs))
    print(f"compiled scan: {'yes' if tokmod._CScanner is not None else 'NO (pure Python)'}")
    print(f"long document: {len(long_doc):,} characters; short documents: {len(docs):,}, {n_short_chars:,} characters")

    def as_port_ids(ids):
        return [byte44 if i == comma else i for i in ids]

    rows = []

    # --- one long document
    t_ours, ids = best_time(lambda: ours.encode(long_doc), args.repeat)
    t_port, port_ids = best_time(lambda: port(long_doc)["input_ids"], 1)
    t_py, py_ids = best_time(lambda: ours_python.encode(long_doc), 1)
    same = as_port_ids(ids) == port_ids and py_ids == ids
    rows.append(("long: encode", len(long_doc) / t_ours, len(long_doc) / t_port, "chars/s", same))
    rows.append(("long: encode, pure-Python fallback", len(long_doc) / t_py, len(long_doc) / t_port, "chars/s", same))
    d_ours, _ = best_time(lambda: ours.decode(ids), args.repeat)
    d_port, _ = best_time(lambda: port.decode(port_ids), 1)
    rows.append(("long: decode", len(ids) / d_ours, len(ids) / d_port, "tokens/s", None))
    n_commas = ids.count(comma)

    # --- many short documents
    t_ours, batch = best_time(lambda: ours(docs)["input_ids"], args.repeat)
    t_port, port_batch = best_time(lambda: port(docs)["input_ids"], 1)
    t_py, py_batch = best_time(lambda: ours_python(docs)["input_ids"], 1)
    same = [as_port_ids(x) for x in batch] == port_batch and py_batch == batch
    rows.append(("short: encode", n_short_chars / t_ours, n_short_chars / t_port, "chars/s", same))
    rows.append(("short: encode, pure-Python fallback", n_short_chars / t_py, n_short_chars / t_port, "chars/s", same))
    n_tokens = sum(map(len, batch))
    d_ours, _ = best_time(lambda: ours.batch_decode(batch), args.repeat)
    d_port, _ = best_time(lambda: port.batch_decode(port_batch), 1)
    rows.append(("short: decode", n_tokens / d_ours, n_tokens / d_port, "tokens/s", None))
    n_commas += sum(x.count(comma) for x in batch)

    print(f"\n{'workload':38s} {'neoxja':>14s} {'transformers':>14s} {'ratio':>8s}  ids identical*")
    for name, ours_rate, port_rate, unit, identical in rows:
        flag = "" if identical is None else ("yes" if identical else "NO")
        print(f"{name:38s} {ours_rate:14,.0f} {port_rate:14,.0f} {ours_rate / port_rate:7.1f}x  {flag}  ({unit})")
    print(f"\n* apart from the comma: {n_commas:,} commas are 31596 here and <|byte44|> in transformers")
    ok = all(identical is not False for *_, identical in rows)
    if not ok:
        print("ERROR: the ids differ from transformers' beyond the comma")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
