"""`neoxja generate`: options, stdin batches, outputs, and clear errors."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from neoxja import generate_cli
from neoxja.cli import main as neoxja_main
from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

SUMMARY = re.compile(r"prompt tokens (\d+), new tokens (\d+), [\d.]+ s, [\d.]+ tokens/s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, abeja_dir) -> Path:
    """A tiny random model with the real tokenizer, saved in the Hugging Face layout."""
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(abeja_dir)
    torch.manual_seed(0)
    cfg = GPTNeoXJapaneseConfig(vocab_size=32000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=128)
    model = GPTNeoXJapaneseForCausalLM(cfg).eval()
    with torch.no_grad():  # a wider init gives varied text (the default one repeats a token)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def expected_texts(model_dir, prompts, **generate_kwargs) -> list[str]:
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(model_dir)
    dtype, _ = generate_cli.resolve_dtype("auto", torch.device("cpu"), "none")  # the CLI's default, --dtype auto
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    texts = []
    for prompt in prompts:  # one at a time: batching must not change greedy output
        ids = torch.tensor([tok.encode(prompt)])
        texts.append(tok.decode(model.generate(ids, **generate_kwargs)[0], skip_special_tokens=True))
    return texts


def run(argv, capsys, monkeypatch, stdin: str | None = None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = generate_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_single_prompt_greedy(model_dir, capsys, monkeypatch):
    prompt = "吾輩は猫である。"
    (want,) = expected_texts(model_dir, [prompt], max_new_tokens=12)
    for stream in ("--stream", "--no-stream"):
        code, out, err = run([prompt, "--model", str(model_dir), "--greedy", "--max-new-tokens", "12", stream],
                             capsys, monkeypatch)
        assert code == 0, err
        assert out == want + "\n"
        m = SUMMARY.search(err)
        assert m and int(m.group(2)) <= 12 and int(m.group(1)) == len(
            GPTNeoXJapaneseTokenizer.from_pretrained(model_dir).encode(prompt))


def test_stdin_prompts_are_batched_and_equal_one_at_a_time(model_dir, capsys, monkeypatch):
    prompts = ["春はあけぼの。", "夏は夜", "秋は夕暮れ。夕日のさして山の端いと近うなりたるに", "冬はつとめて"]
    want = expected_texts(model_dir, prompts, max_new_tokens=8)
    code, out, err = run(["--model", str(model_dir), "--greedy", "--max-new-tokens", "8", "--batch-size", "3",
                          "--no-stream"], capsys, monkeypatch, stdin="\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")
    assert code == 0, err
    assert out == "".join(t + "\n" for t in want)
    assert SUMMARY.search(err)


def test_sampling_options_seed_and_num_return_sequences(model_dir, capsys, monkeypatch):
    argv = ["こんにちは", "--model", str(model_dir), "--max-new-tokens", "6", "--seed", "3", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--num-return-sequences", "3", "--no-stream"]
    code, first, err = run(argv, capsys, monkeypatch)
    assert code == 0, err
    assert len(first.splitlines()) >= 3
    code, again, _ = run(argv, capsys, monkeypatch)
    assert again == first  # the seed makes it reproducible


def test_int8_and_bfloat16(model_dir, capsys, monkeypatch):
    for extra in (["--quantize", "int8"], ["--dtype", "bfloat16"]):
        code, out, err = run(["テスト", "--model", str(model_dir), "--greedy", "--max-new-tokens", "4", *extra],
                             capsys, monkeypatch)
        assert code == 0, err
        assert out.startswith("テスト")


def test_dispatch_from_the_neoxja_command(model_dir, capsys):
    assert neoxja_main(["generate", "猫", "--model", str(model_dir), "--greedy", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("猫")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--temperature", "0"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
        (["--num-return-sequences", "0"], "--num-return-sequences"),
        (["--greedy", "--num-return-sequences", "2"], "sampling"),
        (["--stream", "--num-return-sequences", "2"], "--no-stream"),
        (["--quantize", "int8", "--device", "cuda"], "CPU"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "foo"], "--device foo"),
        pytest.param(["--device", "cuda"], "--device cuda",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    ],
)
def test_bad_options_are_clear_errors(argv, message, capsys, monkeypatch, model_dir):
    code, _, err = run(["x", "--model", str(model_dir), *argv], capsys, monkeypatch)
    assert code == 2
    assert message in err and "error" in err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["x", "--dtype", "int3"])
    assert e.value.code == 2


def test_missing_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import neoxja.assets

    monkeypatch.setattr(neoxja.assets, "default_model_dir", lambda: tmp_path / "absent")
    code, _, err = run(["x"], capsys, monkeypatch)
    assert code == 2 and "--model" in err


def test_default_model_is_the_bundled_one(model_dir, capsys, monkeypatch):
    import neoxja.assets

    monkeypatch.setattr(neoxja.assets, "default_model_dir", lambda: model_dir)
    code, out, err = run(["猫", "--greedy", "--max-new-tokens", "2"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("猫")


def test_unloadable_model_and_empty_stdin(tmp_path, capsys, monkeypatch, model_dir):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(["x", "--model", str(tmp_path)], capsys, monkeypatch)
    assert code == 1 and "cannot load" in err
    code, _, err = run(["--model", str(model_dir)], capsys, monkeypatch, stdin="\n  \n")
    assert code == 2 and "no prompt" in err


def test_a_too_long_stdin_line_is_reported_before_anything_is_generated(model_dir, capsys, monkeypatch):
    long_line = "吾輩は猫である。名前はまだ無い。" * 40  # far more than max_position_embeddings=128 tokens
    code, out, err = run(["--model", str(model_dir), "--greedy", "--max-new-tokens", "2", "--no-stream"],
                         capsys, monkeypatch, stdin=f"春はあけぼの\n{long_line}\n夏は夜\n")
    assert code == 2 and out == ""
    assert "line 2 (" in err and "max_position_embeddings=128" in err and "line 1" not in err


def test_an_empty_prompt_counts_only_new_tokens(model_dir, capsys, monkeypatch):
    code, out, err = run(["", "--model", str(model_dir), "--greedy", "--max-new-tokens", "3"], capsys, monkeypatch)
    assert code == 0, err
    m = SUMMARY.search(err)
    assert m and int(m.group(1)) == 0 and 1 <= int(m.group(2)) <= 3
