"""Reading a training corpus: the one home of input listing and document reading for `neoxja prepare`
and `neoxja vocab build`.

Inputs are files and directories. A directory is searched recursively, in sorted order, for the corpus
formats only: `.txt` (a whole file is one document), `.jsonl` and `.jsonl.gz` (one JSON object a line,
its text in a field); hidden entries and other files (README.md, .json, ...) are skipped and counted.
A file named explicitly is read whatever its name: a `.jsonl` / `.jsonl.gz` as JSON lines, else as text.

What to do with bad input is the caller's policy: `read_documents(..., on_bad=...)` calls
`on_bad(message, whole_file)` for each problem (the default raises CorpusError); messages name the file,
line and byte offset. Imports nothing of ours.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

CORPUS_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class CorpusError(ValueError):
    """Input that cannot be read: the message names the file (and line / byte offset)."""


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def list_input_files(inputs: Iterable[str | Path], skipped: list[Path] | None = None) -> list[Path]:
    """The files to read: named files as given, directories expanded (recursively, sorted, corpus formats only).

    Files a directory holds in other formats are appended to `skipped` when a list is given.
    """
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in found.relative_to(path).parts):
                    continue
                if found.name.endswith(CORPUS_SUFFIXES):
                    files.append(found)
                elif skipped is not None:
                    skipped.append(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"{path}: no such file or directory")
    return files


def _raise(message: str, whole_file: bool) -> None:
    raise CorpusError(message)


def _utf8_error(path: Path, offset: int, err: UnicodeDecodeError, where: str = "") -> str:
    return (
        f"{path}{where}: not valid UTF-8 at byte offset {offset + err.start}"
        f"{' (of the decompressed data)' if path.name.endswith('.gz') else ''}: {err.reason}"
    )


def read_documents(path: Path, text_field: str = "text",
                   on_bad: Callable[[str, bool], None] = _raise) -> Iterator[str]:
    """Yield the documents of one input file, empty ones included; bad input goes to `on_bad`.

    When `on_bad` returns instead of raising, the bad line (or, for a text file, the whole file) is left out.
    """
    if not is_jsonl(path):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            on_bad(_utf8_error(path, 0, err), True)
            return
        except OSError as err:
            on_bad(f"{path}: cannot read: {err.strerror or err}", True)
            return
        yield text
        return

    opener = gzip.open if path.name.endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                line_start, offset = offset, offset + len(raw)
                where = f":{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    on_bad(_utf8_error(path, line_start, err, where), False)
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    on_bad(f"{path}{where}: invalid JSON: {err.msg} (column {err.colno})", False)
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    on_bad(f"{path}{where}: no string field {text_field!r}", False)
                    continue
                try:  # JSON can escape half a surrogate pair ("\ud800"), which is no text
                    record[text_field].encode("utf-8")
                except UnicodeEncodeError as err:
                    on_bad(f"{path}{where}: field {text_field!r} holds a lone surrogate at character {err.start}",
                           False)
                    continue
                yield record[text_field]
    except (OSError, EOFError, zlib.error) as err:  # e.g. a truncated, damaged or non-gzip .gz file
        on_bad(f"{path}: cannot read: {err}", True)
