"""`neoxja prepare`: tokenize a corpus into memory-mapped token files for training.

Inputs are text files (one document each), JSON-lines files (`.jsonl`, `.jsonl.gz`; one document per
line, text in `--field`) and directories, searched recursively in sorted order for `.txt`, `.jsonl` and
`.jsonl.gz` files only (see neoxja.corpus). `--out` may not lie inside an input directory, and replacing
data prepared before needs `--force`.

Output directory:
  train.bin, val.bin          token ids (uint16 while the vocabulary fits, else uint32), each document
                              followed by <|endoftext|>, so documents are separated by it
  train_docs.npy, val_docs.npy int64 offsets of document starts (plus the end), i.e. the boundaries
  tokenizer/                  the tokenizer's files (training exports them with the model)
  manifest.json               tokenizer, dtype, counts, sources, skipped input

The validation split is made of whole documents: those of `--val-input` when given, otherwise a
share (`--val-fraction`) chosen by a fixed-seed permutation; by default, documents holding 1% of the
text but at least MIN_VAL_CHARS characters (or 10% of the text, whichever is less). The output is the same for the same
input, whatever the number of processes (results are written in input order).
Every file is read twice: once to validate it and count documents (cheap next to tokenizing),
then to tokenize; bad input is therefore reported before any tokenizing starts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from neoxja import corpus
from neoxja.corpus import CorpusError, list_input_files  # noqa: F401 -- CorpusError: prepare's error type

MANIFEST_VERSION = 1
MIN_VAL_CHARS = 50_000  # the default validation split: enough text for a few evaluation batches
SPLIT_SEED = 0  # fixed: the split is a property of the corpus, not of a training run
DOCUMENTS_IN_FLIGHT = 4096  # documents handed to the tokenizer processes at a time


# ----------------------------------------------------------------------------- reading input


@dataclass
class SkipLog:
    """What --skip-bad left out; reported on stderr and in the manifest, never dropped silently."""

    skip_bad: bool
    quiet: bool = False  # the second pass: every problem was reported by the first
    files: int = 0
    lines: int = 0
    empty_documents: int = 0
    messages: list[str] = field(default_factory=list)

    def bad(self, message: str, whole_file: bool) -> None:
        if not self.skip_bad:
            raise CorpusError(message)
        if whole_file:
            self.files += 1
        else:
            self.lines += 1
        self.messages.append(message)
        if not self.quiet:
            print(f"warning: skipping: {message}", file=sys.stderr)


def read_documents(path: Path, text_field: str, skips: SkipLog) -> Iterator[str]:
    """Yield the non-empty documents of one input file (empty ones are counted in `skips`)."""
    for text in corpus.read_documents(path, text_field, on_bad=skips.bad):
        if text:
            yield text
        else:
            skips.empty_documents += 1


# ----------------------------------------------------------------------------- tokenizing


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what a tokenizer maps ids to (its vocabulary lines and emoji table), not of where it lives.

    Two tokenizers with the same fingerprint give every text the same ids; `neoxja train --init-from`
    compares the model's with the one the data was prepared with.
    """
    import hashlib

    digest = hashlib.sha256()
    digest.update("".join(",".join(spellings) + "\n" for spellings in tokenizer.ids_to_tokens).encode("utf-8"))
    digest.update(json.dumps(tokenizer.emoji, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()

_worker_tokenizer = None
_worker_dtype = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    _worker_tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tokenizer_dir)
    _worker_dtype = np.dtype(dtype)


def _encode_document(text: str) -> np.ndarray:
    """Token ids of one document followed by <|endoftext|>."""
    ids = _worker_tokenizer.encode(text)
    ids.append(_worker_tokenizer.eos_token_id)
    return np.asarray(ids, dtype=_worker_dtype)


def choose_validation_documents(num_documents: int, val_fraction: float) -> np.ndarray:
    """Boolean mask of the documents held out for validation (whole documents, fixed seed)."""
    is_val = np.zeros(num_documents, dtype=bool)
    if val_fraction <= 0 or num_documents < 2:
        return is_val
    num_val = min(max(1, round(val_fraction * num_documents)), num_documents - 1)
    is_val[np.random.default_rng(SPLIT_SEED).permutation(num_documents)[:num_val]] = True
    return is_val


def choose_validation_by_length(lengths: np.ndarray) -> np.ndarray:
    """The default split: whole documents, in the fixed-seed order, until they hold 1% of the characters but
    at least MIN_VAL_CHARS or 10% of them, whichever is less (so a corpus of a few long documents still
    gives a few evaluation batches); never every document."""
    is_val = np.zeros(len(lengths), dtype=bool)
    if len(lengths) < 2:
        return is_val
    total = int(lengths.sum())
    target = max(0.01 * total, min(MIN_VAL_CHARS, 0.1 * total))
    held = 0
    for i in np.random.default_rng(SPLIT_SEED).permutation(len(lengths))[: len(lengths) - 1]:
        if held >= target:
            break
        is_val[i] = True
        held += int(lengths[i])
    return is_val


def _tokenize_into(files, text_field, is_val, tokenizer_dir, dtype, num_proc, tmp, splits) -> int:
    """Tokenize every document in input order into the split's file; returns the last document's index."""
    from tqdm.auto import tqdm

    def documents() -> Iterator[str]:
        quiet = SkipLog(skip_bad=True, quiet=True)  # pass 1 already reported every problem
        for path in files:
            yield from read_documents(path, text_field, quiet)

    def in_batches(pool) -> Iterator[np.ndarray]:
        # Pool.imap would read the whole corpus ahead into its task queue; batches bound the memory.
        docs = documents()
        while batch := list(itertools.islice(docs, DOCUMENTS_IN_FLIGHT)):
            yield from pool.imap(_encode_document, batch, chunksize=max(1, len(batch) // (4 * num_proc)))

    index = -1
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
        sinks = {"train": f_train, "val": f_val}
        if num_proc == 1:
            _init_worker(tokenizer_dir, dtype)
            encoded, pool = map(_encode_document, documents()), None
        else:
            pool = multiprocessing.get_context().Pool(num_proc, _init_worker, (tokenizer_dir, dtype))
            encoded = in_batches(pool)
        try:
            with tqdm(total=len(is_val), unit="doc", desc="tokenizing", mininterval=1.0) as bar:
                for index, ids in enumerate(encoded):
                    split = "val" if is_val[index] else "train"
                    sinks[split].write(ids.tobytes())
                    splits[split].append(splits[split][-1] + len(ids))
                    bar.update()
        finally:
            if pool is not None:
                pool.terminate()
    return index


# ----------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neoxja prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, directory, or .jsonl / .jsonl.gz")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of documents held out (default: whole documents holding 1%% of the text, but at "
                        f"least {MIN_VAL_CHARS:,} characters or 10%% of it, whichever is less)")
    p.add_argument("--val-input", action="append", default=[], metavar="INPUT",
                   help="documents to hold out for validation instead of a random share (repeatable; default none)")
    p.add_argument("--num-proc", type=int, default=max(1, os.cpu_count() or 1),
                   help="tokenizer processes (default: the CPU count, %(default)s here)")
    p.add_argument("--field", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--skip-bad", action="store_true", help="warn about and count bad input instead of failing (default: fail)")
    p.add_argument("--force", action="store_true", help="replace the prepared data already in --out (default: refuse)")
    return p


def prepare(args: argparse.Namespace) -> dict:
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.num_proc < 1:
        raise CorpusError(f"--num-proc must be >= 1, got {args.num_proc}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file; give a directory")
    for name in args.inputs + args.val_input:  # its own output would be read as input the next time
        given = Path(name).resolve()
        if given.is_dir() and (out.resolve() == given or given in out.resolve().parents):
            raise CorpusError(f"--out {out} is inside the input directory {name}; write the prepared data elsewhere")
    if not args.force and any((out / name).exists() for name in ("manifest.json", "train.bin", "val.bin")):
        raise CorpusError(f"--out {out} already holds prepared data; pass --force to replace it")
    skipped_files: list[Path] = []
    val_files = list_input_files(args.val_input, skipped_files)
    train_files = list_input_files(args.inputs, skipped_files)
    if skipped_files:
        print(f"note: skipped {len(skipped_files)} file(s) in the input directories that are not "
              f"{', '.join(corpus.CORPUS_SUFFIXES)} (e.g. {skipped_files[0]})", file=sys.stderr)
    train_resolved = {path.resolve(): path for path in train_files}
    for path in val_files:
        if path.resolve() in train_resolved:  # however it is spelt, the same file in both splits
            raise CorpusError(f"{path} is both an INPUT and a --val-input (as {train_resolved[path.resolve()]})")
    files = train_files + val_files

    # Pass 1: validate everything and count documents (and their characters, for the default split).
    skips = SkipLog(skip_bad=args.skip_bad)
    sources = []
    lengths: list[int] = []
    for path in files:
        before = len(lengths)
        lengths.extend(len(text) for text in read_documents(path, args.field, skips))
        sources.append({"path": str(path), "documents": len(lengths) - before,
                        "split": "val" if path in val_files else "train"})
    num_documents = sum(s["documents"] for s in sources)
    if num_documents == 0:
        raise CorpusError(f"empty corpus: no documents in {', '.join(args.inputs + args.val_input)}")
    if val_files:  # the validation documents are given: exactly those
        is_val = np.concatenate([np.full(s["documents"], s["split"] == "val") for s in sources])
    elif args.val_fraction is None:
        is_val = choose_validation_by_length(np.asarray(lengths, dtype=np.int64))
        if not is_val.any():
            print("warning: a single document cannot be split; the validation split is empty", file=sys.stderr)
    else:
        is_val = choose_validation_documents(num_documents, args.val_fraction)
        if args.val_fraction > 0 and not is_val.any():
            print("warning: a single document cannot be split; the validation split is empty", file=sys.stderr)

    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    try:
        tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as err:  # missing files, unknown hub id, offline without a cache
        raise CorpusError(f"--tokenizer {args.tokenizer}: cannot load it: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the directory is "prepared" again only when complete
    tokenizer_dir = out / "tokenizer"
    if tokenizer_dir.is_dir():  # left by an earlier run: no stale files may travel with the new model
        shutil.rmtree(tokenizer_dir)
    tokenizer.save_pretrained(str(tokenizer_dir))
    # every id the tokenizer can emit, special tokens included, must fit the model and the dtype
    vocab_size = max(len(tokenizer), max(tokenizer.all_special_ids) + 1)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"

    # Pass 2: tokenize in input order, writing aside; rename into place only when complete.
    splits = {"train": [0], "val": [0]}  # document start offsets, per split
    tmp = {name: out / f"{name}.bin.tmp" for name in splits}
    start = time.perf_counter()
    try:
        index = _tokenize_into(files, args.field, is_val, str(tokenizer_dir), dtype, args.num_proc, tmp, splits)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - start
    if index + 1 != num_documents:  # the files changed between the two passes
        raise CorpusError(f"input changed while preparing: expected {num_documents} documents, read {index + 1}")

    for name in splits:
        np.save(out / f"{name}_docs.npy", np.asarray(splits[name], dtype=np.int64))
        os.replace(tmp[name], out / f"{name}.bin")
    num_tokens = splits["train"][-1] + splits["val"][-1]
    manifest = {
        "format_version": MANIFEST_VERSION,
        "dtype": dtype,
        "tokenizer": {
            "source": str(args.tokenizer),
            "dir": "tokenizer",
            "vocab_size": vocab_size,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "separator": "<|endoftext|> after every document",
        "val_fraction": None if val_files else "auto" if args.val_fraction is None else args.val_fraction,
        "split_seed": SPLIT_SEED,
        "train": {"file": "train.bin", "documents": len(splits["train"]) - 1, "tokens": splits["train"][-1],
                  "document_offsets": "train_docs.npy"},
        "val": {"file": "val.bin", "documents": len(splits["val"]) - 1, "tokens": splits["val"][-1],
                "document_offsets": "val_docs.npy"},
        "text_field": args.field,
        "sources": sources,
        "skipped": {"files": skips.files, "lines": skips.lines, "empty_documents": skips.empty_documents,
                    "messages": skips.messages},
    }
    tmp_manifest = out / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, out / "manifest.json")

    rate = num_tokens / elapsed if elapsed > 0 else math.inf
    print(
        f"prepared {num_documents:,} documents, {num_tokens:,} tokens "
        f"(train {manifest['train']['tokens']:,}, val {manifest['val']['tokens']:,}) in {elapsed:.1f} s: "
        f"{rate:,.0f} tokens/s with {args.num_proc} process(es) -> {out}"
    )
    if skips.files or skips.lines or skips.empty_documents:
        print(
            f"skipped {skips.files} file(s) and {skips.lines} line(s) of bad input, "
            f"{skips.empty_documents} empty document(s)",
            file=sys.stderr,
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except CorpusError as err:
        print(f"neoxja prepare: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment: a full disk, a read-only --out
        from neoxja.train.failures import describe

        print(f"neoxja prepare: error: {describe(err, args.out)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nneoxja prepare: interrupted (run the command again to prepare the data)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
