"""`neoxja eval`: how well a model predicts a text: bits per character, perplexity, tokens.

    neoxja eval --data val.jsonl.gz                       # the bundled model on a text file
    neoxja eval --model runs/x/final --data data/corpus   # a directory written by `neoxja prepare` (--split val)

Each document is scored from its start, after the <|endoftext|> that separates documents in training,
in windows of the model's context (max_position_embeddings) that do not overlap: the sum of
-log2 p(token) over the document's tokens (a closing <|endoftext|> excluded). Bits per character
divide that by the characters of the decoded document (the text the tokenizer sees: tags such as
<SP> count as the one character they stand for), so the figure compares across vocabularies;
perplexity is per token, exp of the mean negative log-likelihood in nats.

Text inputs: .txt (one document per file), .jsonl and .jsonl.gz (one document per line, in --text-field).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neoxja eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="model directory or hub id (default: the bundled model)")
    p.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                   help="a .txt, .jsonl or .jsonl.gz file, or a directory written by `neoxja prepare` (required; "
                        "no default)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="split of a prepared directory (default val)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--max-documents", type=int, metavar="N", help="score only the first N documents (default: all)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward (default 8)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON here (default: none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar on stderr (default: on)")
    return p


class EvalError(ValueError):
    pass


def prepared_documents(data_dir: Path, split: str, tokenizer, limit: int | None):
    """(token ids, characters) of each document of a prepared split, its closing <|endoftext|> dropped."""
    import numpy as np

    from neoxja.train.data import DataError, load_manifest, open_tokens

    try:
        manifest = load_manifest(data_dir)
        tokens = open_tokens(data_dir, split, manifest)
    except DataError as e:
        raise EvalError(str(e)) from None
    recorded = manifest["tokenizer"].get("vocab_size")
    if recorded is not None and recorded != len(tokenizer):
        raise EvalError(f"{data_dir} was prepared with a tokenizer of {recorded} ids, the model's has "
                        f"{len(tokenizer)}: prepare it again with this model's tokenizer")
    offsets_file = data_dir / manifest[split].get("document_offsets", f"{split}_docs.npy")
    if not offsets_file.is_file():
        raise EvalError(f"{offsets_file} not found: prepare the data again (`neoxja prepare`)")
    offsets = np.load(offsets_file)
    eos = tokenizer.eos_token_id
    for a, b in list(zip(offsets[:-1], offsets[1:]))[:limit]:
        ids = tokens[a:b].tolist()
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        if ids:
            yield ids, len(tokenizer.decode(ids))


def text_documents(path: Path, text_field: str, tokenizer, limit: int | None):
    from neoxja.train.prepare import CorpusError, SkipLog, read_documents

    if not path.name.endswith((".txt", ".jsonl", ".jsonl.gz")):
        raise EvalError(f"{path}: give a .txt, .jsonl or .jsonl.gz file, or a directory written by `neoxja prepare`")
    try:
        for i, text in enumerate(read_documents(path, text_field, SkipLog(skip_bad=False))):
            if limit is not None and i >= limit:
                return
            ids = tokenizer.encode(text)
            if ids:
                yield ids, len(tokenizer.decode(ids))
    except CorpusError as e:
        raise EvalError(str(e)) from None


def score(model, documents, eos: int, batch_size: int, progress) -> dict:
    """Sum of -log p over every document's tokens, each document scored after an EOS in windows of the
    model's context; windows of several documents share a forward (right-padded targets are ignored)."""
    import torch

    window = model.config.max_position_embeddings
    device = model.device
    nats = 0.0
    tokens = chars = docs = 0
    pending: list[list[int]] = []

    def run(chunks: list[list[int]]) -> float:
        width = max(len(c) for c in chunks)
        inputs = torch.zeros(len(chunks), width - 1, dtype=torch.long)  # (B, T)
        targets = torch.full((len(chunks), width - 1), -100, dtype=torch.long)  # (B, T)
        for row, c in enumerate(chunks):
            inputs[row, : len(c) - 1] = torch.tensor(c[:-1])
            targets[row, : len(c) - 1] = torch.tensor(c[1:])
        with torch.no_grad():  # causal: the padding after a row's tokens changes none of their logits
            logits = model(inputs.to(device)).logits.float()  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(),
                                                 ignore_index=-100, reduction="sum")
        progress.update(int((targets != -100).sum()))
        return float(loss)

    for ids, n_chars in documents:
        seq = [eos] + ids
        for start in range(0, len(seq) - 1, window):
            pending.append(seq[start : start + window + 1])
            if len(pending) == batch_size:
                nats += run(pending)
                pending = []
        tokens += len(ids)
        chars += n_chars
        docs += 1
    if pending:
        nats += run(pending)
    if tokens == 0:
        raise EvalError("no tokens to score: the data holds no non-empty document")
    bits = nats / math.log(2)
    return {"documents": docs, "tokens": tokens, "characters": chars, "bits_per_character": bits / chars,
            "bits_per_token": bits / tokens, "perplexity": math.exp(nats / tokens)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str, code: int = 2) -> int:
        print(f"neoxja eval: error: {message}", file=sys.stderr)
        return code

    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_documents is not None and args.max_documents < 1:
        return fail(f"--max-documents must be >= 1, got {args.max_documents}")
    data = Path(args.data)
    if not data.exists():
        return fail(f"--data {data}: no such file or directory")
    from neoxja.generate_cli import resolve_model

    try:
        model_path = resolve_model(args.model)
    except FileNotFoundError as e:
        return fail(str(e))

    import torch
    from tqdm import tqdm

    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    try:
        tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(model_path)
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype),
                                                           device=torch.device(args.device)).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        return fail(f"cannot load the model from {model_path!r}: {e}", 1)
    eos = tokenizer.eos_token_id
    if data.is_dir():
        documents = prepared_documents(data, args.split, tokenizer, args.max_documents)
    else:
        documents = text_documents(data, args.text_field, tokenizer, args.max_documents)
    start = time.perf_counter()
    try:
        with tqdm(desc="scoring", unit="tok", disable=not args.progress, file=sys.stderr, mininterval=1.0) as bar:
            results = score(model, documents, eos, args.batch_size, bar)
    except EvalError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    results = {"model": model_path, "data": str(data), **({"split": args.split} if data.is_dir() else {}),
               **results, "seconds": round(time.perf_counter() - start, 2)}
    print(f"bits per character {results['bits_per_character']:.4f}, perplexity {results['perplexity']:.2f} "
          f"(per token), {results['bits_per_token']:.4f} bits per token; {results['tokens']:,} tokens, "
          f"{results['characters']:,} characters, {results['documents']:,} documents")
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
