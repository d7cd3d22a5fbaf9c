"""`neoxja prepare`: token files, document boundaries, split, manifest, determinism, bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from neoxja.train.data import load_manifest, open_tokens
from neoxja.train.prepare import choose_validation_documents, main

DOCS = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。\n何でも薄暗いじめじめした所で泣いていた事だけは記憶している。",
    "国境の長いトンネルを抜けると雪国であった。",
    "メロスは激怒した。必ず、かの邪智暴虐の王を除かなければならぬと決意した。",
    "山路を登りながら、こう考えた。智に働けば角が立つ。",
    "Hello, world! 123 😀",
]


@pytest.fixture(scope="module")
def tokenizer(abeja_dir):
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    return GPTNeoXJapaneseTokenizer.from_pretrained(str(abeja_dir))


@pytest.fixture
def corpus(tmp_path):
    """Two plain-text documents in a directory (plus a nested one) and four JSON-lines documents (gzip)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text(DOCS[1], encoding="utf-8")
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (root / "sub" / "c.txt").write_text(DOCS[2], encoding="utf-8")
    (root / ".hidden.txt").write_bytes(b"\xff not read")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in DOCS[3:]:
            f.write(json.dumps({"text": doc, "title": "t"}, ensure_ascii=False) + "\n")
        f.write("\n")  # blank lines are not documents
    # expected document order: directory sorted (a, b, sub/c), then the JSON lines in order
    return [str(root), str(tmp_path / "more.jsonl.gz")]


def run(abeja_dir, out, inputs, *extra):
    return main(["--tokenizer", str(abeja_dir), "--out", str(out), *map(str, extra), *map(str, inputs)])


def documents(out, split):
    manifest = load_manifest(out)
    tokens = open_tokens(out, split, manifest)
    offsets = np.load(out / manifest[split]["document_offsets"])
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def test_token_files_hold_every_document_once_with_separators(abeja_dir, tokenizer, corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert run(abeja_dir, out, corpus, "--val-fraction", "0.34", "--num-proc", "1") == 0
    assert "tokens/s" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest["dtype"] == "uint16"
    assert (out / "train.bin").stat().st_size == 2 * manifest["train"]["tokens"]
    assert manifest["train"]["documents"] == 4 and manifest["val"]["documents"] == 2  # round(0.34 * 6)
    assert [s["documents"] for s in manifest["sources"]] == [1, 1, 1, 3]

    eos = tokenizer.eos_token_id
    expected = [tokenizer.encode(doc) + [eos] for doc in DOCS]
    train, val = documents(out, "train"), documents(out, "val")
    is_val = choose_validation_documents(len(DOCS), 0.34)
    assert train == [e for e, v in zip(expected, is_val) if not v]
    assert val == [e for e, v in zip(expected, is_val) if v]
    for doc in train + val:  # <|endoftext|> ends each document and occurs nowhere else
        assert doc[-1] == eos and eos not in doc[:-1]
    assert manifest["tokenizer"]["eos_token_id"] == eos
    assert manifest["tokenizer"]["vocab_size"] > max(max(d) for d in expected)
    # the tokenizer travels with the data (training exports it with the model)
    saved = type(tokenizer).from_pretrained(str(out / "tokenizer"))
    assert saved.get_vocab() == tokenizer.get_vocab() and saved.encode(DOCS[1]) == tokenizer.encode(DOCS[1])


def test_output_is_deterministic_whatever_the_process_count(abeja_dir, corpus, tmp_path):
    assert run(abeja_dir, tmp_path / "one", corpus, "--num-proc", "1", "--val-fraction", "0.2") == 0
    assert run(abeja_dir, tmp_path / "two", corpus, "--num-proc", "2", "--val-fraction", "0.2") == 0
    for name in ("train.bin", "val.bin", "train_docs.npy", "val_docs.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one == two


def test_validation_split_is_whole_documents_and_never_everything():
    assert not choose_validation_documents(10, 0.0).any()
    assert not choose_validation_documents(1, 0.5).any()  # one document cannot be split
    assert choose_validation_documents(10, 0.001).sum() == 1  # a positive fraction holds out at least one
    assert choose_validation_documents(3, 0.99).sum() == 2  # and never all
    mask = choose_validation_documents(1000, 0.1)
    assert mask.sum() == 100 and np.array_equal(mask, choose_validation_documents(1000, 0.1))
    assert mask[:500].sum() not in (0, 100)  # spread over the corpus, not a tail


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_corpus_is_an_error(abeja_dir, tmp_path, capsys, content):
    (tmp_path / "in.jsonl").write_bytes(content)
    assert run(abeja_dir, tmp_path / "out", [tmp_path / "in.jsonl"]) == 2
    assert "empty corpus" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_input_is_an_error(abeja_dir, tmp_path, capsys):
    assert run(abeja_dir, tmp_path / "out", [tmp_path / "nope.txt"]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err


def test_non_utf8_text_file_names_file_and_byte_offset(abeja_dir, tmp_path, capsys):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(DOCS[0], encoding="utf-8")
    bad.write_bytes("猫".encode() + b"\x80abc")  # the stray byte is at offset 3
    assert run(abeja_dir, tmp_path / "out", [good, bad]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not valid UTF-8 at byte offset 3" in err
    assert not (tmp_path / "out" / "manifest.json").exists()

    # --skip-bad: a warning naming the same place, a count, and the rest prepared
    assert run(abeja_dir, tmp_path / "out", [good, bad], "--skip-bad", "--val-fraction", "0") == 0
    captured = capsys.readouterr()
    assert f"{bad}: not valid UTF-8 at byte offset 3" in captured.err and "skipped 1 file(s)" in captured.err
    manifest = load_manifest(tmp_path / "out")
    assert manifest["skipped"]["files"] == 1 and manifest["train"]["documents"] == 1


def test_bad_jsonl_lines_name_file_line_and_offset(abeja_dir, tmp_path, capsys):
    path = tmp_path / "in.jsonl.gz"
    first = (json.dumps({"text": DOCS[0]}, ensure_ascii=False) + "\n").encode()
    with gzip.open(path, "wb") as f:
        f.write(first + b'{"text": "\xe3\x81"}\n' + b"{not json}\n" + b'{"body": "x"}\n' + b'{"text": ""}\n')
    assert run(abeja_dir, tmp_path / "out", [path]) == 2
    err = capsys.readouterr().err
    # the truncated 3-byte character starts 10 bytes into line 2
    assert f"{path}:2: not valid UTF-8 at byte offset {len(first) + 10}" in err

    assert run(abeja_dir, tmp_path / "out", [path], "--skip-bad", "--val-fraction", "0") == 0
    err = capsys.readouterr().err
    assert f"{path}:3: invalid JSON" in err and f"{path}:4: no string field 'text'" in err
    skipped = load_manifest(tmp_path / "out")["skipped"]
    assert (skipped["files"], skipped["lines"], skipped["empty_documents"]) == (0, 3, 1)


def test_lone_surrogate_and_damaged_gzip_are_reported_in_the_checking_pass(abeja_dir, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    good = json.dumps({"text": DOCS[0]}, ensure_ascii=False)
    path.write_text(good + "\n" + '{"text": "abc\\ud800def"}\n', encoding="utf-8")  # JSON escapes half a pair
    assert run(abeja_dir, tmp_path / "out", [path]) == 2
    assert f"{path}:2: field 'text' holds a lone surrogate at character 3" in capsys.readouterr().err
    assert run(abeja_dir, tmp_path / "out", [path], "--skip-bad", "--val-fraction", "0") == 0
    assert load_manifest(tmp_path / "out")["train"]["documents"] == 1

    damaged = tmp_path / "damaged.jsonl.gz"
    data = bytearray(gzip.compress((good + "\n").encode() * 50))
    data[20] ^= 0xFF  # inside the deflate stream: zlib.error, which is no OSError
    damaged.write_bytes(bytes(data))
    assert run(abeja_dir, tmp_path / "out2", [damaged]) == 2
    assert f"{damaged}: cannot read" in capsys.readouterr().err


def test_out_that_is_a_file_and_an_interrupted_rerun(abeja_dir, corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    assert run(abeja_dir, tmp_path / "afile", corpus) == 2
    assert "is a file" in capsys.readouterr().err
    out = tmp_path / "data"
    assert run(abeja_dir, out, corpus) == 0
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GPTNeoXJapaneseTokenizer, "save_pretrained", interrupted)
    assert run(abeja_dir, out, corpus, "--force") == 130  # Ctrl-C: one line, no traceback
    assert not (out / "manifest.json").exists()  # no longer "prepared": training refuses it


def test_field_option_and_bad_arguments(abeja_dir, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"body": DOCS[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert run(abeja_dir, tmp_path / "out", [path], "--field", "body") == 0
    assert load_manifest(tmp_path / "out")["train"]["documents"] == 1
    assert run(abeja_dir, tmp_path / "out", [path], "--field", "body", "--val-fraction", "1.5") == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert run(abeja_dir, tmp_path / "out", [path], "--field", "body", "--num-proc", "0") == 2


def test_validation_documents_can_be_given(abeja_dir, tokenizer, corpus, tmp_path, capsys, monkeypatch):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS[:2]), "utf-8")
    out = tmp_path / "data"
    assert run(abeja_dir, out, corpus, "--val-input", held_out, "--num-proc", "1") == 0
    eos = tokenizer.eos_token_id
    assert documents(out, "val") == [tokenizer.encode(d) + [eos] for d in DOCS[:2]]
    assert documents(out, "train") == [tokenizer.encode(d) + [eos] for d in DOCS]  # every input document
    manifest = load_manifest(out)
    assert [s["split"] for s in manifest["sources"]] == ["train"] * 4 + ["val"]
    assert run(abeja_dir, tmp_path / "x", [held_out], "--val-input", held_out) == 2
    assert "both an INPUT and a --val-input" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the same file, spelt two ways
    assert run(abeja_dir, tmp_path / "x", ["held_out.jsonl"], "--val-input", held_out) == 2
    assert "both an INPUT" in capsys.readouterr().err


def test_directories_give_corpus_files_only_and_out_may_not_be_inside(abeja_dir, tmp_path, capsys):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (root / "sub" / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}, ensure_ascii=False) + "\n", encoding="utf-8")
    (root / "README.md").write_text("# about this corpus", encoding="utf-8")
    (root / "meta.json").write_text('{"source": "x"}', encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\xff\xfe")
    assert run(abeja_dir, tmp_path / "out", [root], "--val-fraction", "0") == 0
    manifest = load_manifest(tmp_path / "out")
    assert [s["path"] for s in manifest["sources"]] == [str(root / "a.txt"), str(root / "sub" / "b.jsonl")]
    assert "skipped 3 file(s)" in capsys.readouterr().err
    # a file named explicitly is read whatever its name
    assert run(abeja_dir, tmp_path / "out2", [root / "README.md"], "--val-fraction", "0") == 0
    capsys.readouterr()

    for inside in (root / "prepared", root):
        assert run(abeja_dir, inside, [root]) == 2
        assert "inside the input directory" in capsys.readouterr().err
    assert not (root / "prepared").exists()


def test_replacing_prepared_data_needs_force(abeja_dir, corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert run(abeja_dir, out, corpus) == 0
    before = (out / "train.bin").read_bytes()
    capsys.readouterr()
    assert run(abeja_dir, out, corpus[:1]) == 2
    assert "already holds prepared data; pass --force" in capsys.readouterr().err
    assert (out / "train.bin").read_bytes() == before and (out / "manifest.json").exists()  # untouched
    assert run(abeja_dir, out, corpus[:1], "--force") == 0
    assert (out / "train.bin").read_bytes() != before


def test_skip_bad_warns_once_per_problem(abeja_dir, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": DOCS[0]}, ensure_ascii=False) + "\n{broken\n", encoding="utf-8")
    assert run(abeja_dir, tmp_path / "out", [path], "--skip-bad", "--num-proc", "1") == 0
    assert capsys.readouterr().err.count(f"{path}:2: invalid JSON") == 1


def test_the_default_validation_split_holds_enough_text(abeja_dir, tmp_path, capsys):
    from neoxja.train.prepare import MIN_VAL_CHARS, choose_validation_by_length

    # 50 documents of 10,000 characters: 1% of the documents (one) would be 1% of the text, a single batch or two
    lengths = np.full(50, 10_000)
    is_val = choose_validation_by_length(lengths)
    assert lengths[is_val].sum() >= MIN_VAL_CHARS and 1 <= (~is_val).sum()
    # a small corpus: at most about 10% of it
    small = np.full(50, 100)
    assert 0.1 * small.sum() <= small[choose_validation_by_length(small)].sum() <= 0.1 * small.sum() + 100
    # a large one: 1%
    large = np.full(10_000, 1_000)
    assert large[choose_validation_by_length(large)].sum() == 0.01 * large.sum()
    assert not choose_validation_by_length(np.array([5])).any()
    assert choose_validation_by_length(np.array([5, 5])).sum() == 1  # never every document

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": d * 20}, ensure_ascii=False) + "\n" for d in DOCS * 10), "utf-8")
    assert run(abeja_dir, tmp_path / "out", [path], "--num-proc", "1") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["val_fraction"] == "auto"
    assert manifest["val"]["documents"] >= 0.1 * (manifest["val"]["documents"] + manifest["train"]["documents"]) - 1


def test_one_home_for_corpus_reading_and_checkpoint_errors(tmp_path):
    """prepare and vocab build list and read input with the same code; only the bad-input policy differs."""
    import neoxja.checkpoint
    import neoxja.train.checkpoint
    from neoxja import corpus, vocab
    from neoxja.train import prepare

    assert vocab.list_input_files is prepare.list_input_files is corpus.list_input_files
    assert neoxja.train.checkpoint.CheckpointError is neoxja.checkpoint.CheckpointError
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{bad\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(corpus.CorpusError, match="c.jsonl:2: invalid JSON"):
        list(vocab.read_documents(path))
    problems = []
    assert list(corpus.read_documents(path, on_bad=lambda message, whole_file: problems.append(message))) == ["a", "b"]
    assert len(problems) == 1 and ":2: invalid JSON" in problems[0]


def test_a_full_disk_while_preparing_is_one_line_naming_the_output(abeja_dir, corpus, tmp_path, capsys, monkeypatch):
    import errno

    def save_on_a_full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save_on_a_full_disk)
    assert run(abeja_dir, tmp_path / "data", corpus, "--num-proc", "1") == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'data'}: the disk is full" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "manifest.json").exists()  # not marked prepared
