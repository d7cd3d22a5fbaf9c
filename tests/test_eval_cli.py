"""`neoxja eval` (issue 14, item 14): bits per character, perplexity and tokens, on text files or a prepared split."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neoxja import eval_cli
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

DOCS = ["吾輩は猫である。名前はまだ無い。" * 25,  # about 400 tokens: two windows of the 256-token context
        "山路を登りながら、こう考えた。", "智に働けば角が立つ。情に棹させば流される。"]


def reference(model_dir, docs) -> tuple[float, int, int]:
    """Nats, tokens, characters: each document alone, after an EOS, in non-overlapping windows."""
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(model_dir)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    window = model.config.max_position_embeddings
    nats, tokens, chars = 0.0, 0, 0
    for text in docs:
        ids = tok.encode(text)
        seq = torch.tensor([[tok.eos_token_id] + ids])
        for start in range(0, seq.shape[1] - 1, window):
            chunk = seq[:, start : start + window + 1]
            with torch.no_grad():
                logits = model(chunk[:, :-1]).logits
            nats += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        tokens += len(ids)
        chars += len(tok.decode(ids))
    return nats, tokens, chars


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    return path


def evaluate(capsys, *argv) -> dict:
    code = eval_cli.main([*argv, "--no-progress", "--json", str(argv[argv.index("--data") + 1]) + ".result.json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("bits per character ")
    with open(str(argv[argv.index("--data") + 1]) + ".result.json", encoding="utf-8") as f:
        return json.load(f)


def test_text_file_matches_a_document_by_document_reference(bundled_dir, corpus, capsys):
    nats, tokens, chars = reference(bundled_dir, DOCS)
    got = evaluate(capsys, "--data", str(corpus), "--batch-size", "2")
    assert (got["documents"], got["tokens"], got["characters"]) == (3, tokens, chars)
    assert got["bits_per_character"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert evaluate(capsys, "--data", str(corpus), "--max-documents", "1")["documents"] == 1


def test_a_prepared_split_gives_the_figure_of_its_text(bundled_dir, corpus, tmp_path, capsys):
    from neoxja.train import prepare

    out = tmp_path / "prepared"
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_bytes(corpus.read_bytes())
    assert prepare.main(["--tokenizer", str(bundled_dir), "--out", str(out), "--val-input", str(held_out),
                         str(corpus)]) == 0
    capsys.readouterr()
    text = evaluate(capsys, "--data", str(corpus))
    split = evaluate(capsys, "--data", str(out), "--split", "val")
    for key in ("documents", "tokens", "characters"):
        assert split[key] == text[key]
    assert split["bits_per_character"] == pytest.approx(text["bits_per_character"], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/file.jsonl"], "no such file"),
    (["--data", "README.md"], "give a .txt, .jsonl or .jsonl.gz"),
    (["--data", "tests", "--batch-size", "0"], "--batch-size"),
    (["--data", "tests"], "manifest.json not found"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, bundled_dir):
    assert eval_cli.main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_jsonl_line_names_file_and_line(tmp_path, capsys, bundled_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "猫"}\n{not json\n', encoding="utf-8")
    assert eval_cli.main(["--data", str(path), "--no-progress"]) == 2
    assert f"{path}:2" in capsys.readouterr().err
