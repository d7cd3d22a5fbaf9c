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
    # each output is headed by its file line (the blank line 3 counts), outputs apart by a blank line
    assert out == "\n".join(f"==> stdin line {n} <==\n{t}\n" for n, t in zip((1, 2, 4, 5), want))
    assert SUMMARY.search(err)
    # streamed one at a time: the same text
    code, streamed, err = run(["--model", str(model_dir), "--greedy", "--max-new-tokens", "8"], capsys, monkeypatch,
                              stdin="\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")
    assert code == 0, err
    assert streamed == out


def test_row_results_finish_reasons():
    new = torch.tensor([[5, 9, 2, 2], [5, 6, 7, 8], [5, 6, 9, 9]])  # 9 is EOS; 2 is padding
    assert generate_cli.row_results(new, [9], [4, 4, 2]) == [([5, 9], "stop"), ([5, 6, 7, 8], "length"),
                                                             ([5, 6], "length")]  # row 3 ran out of positions


def test_jsonl_output_one_object_per_prompt(model_dir, capsys, monkeypatch):
    import json

    prompts = ["春はあけぼの。", "夏は夜"]
    want = expected_texts(model_dir, prompts, max_new_tokens=5)
    code, out, err = run(["--model", str(model_dir), "--greedy", "--max-new-tokens", "5", "--output-format", "jsonl"],
                         capsys, monkeypatch, stdin=f"{prompts[0]}\n\n{prompts[1]}\n")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(model_dir)
    assert [r["line"] for r in records] == [1, 3]
    for r, prompt, text in zip(records, prompts, want):
        assert r["prompt"] == prompt and prompt + r["text"] == text
        assert r["prompt_tokens"] == len(tok.encode(prompt))
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["new_tokens"] <= 5 and (r["finish_reason"] == "stop" or r["new_tokens"] == 5)
    m = SUMMARY.search(err)
    assert int(m.group(2)) == sum(r["new_tokens"] for r in records)
    # num_return_sequences: one object per output, numbered
    code, out, err = run(["猫", "--model", str(model_dir), "--max-new-tokens", "3", "--num-return-sequences", "2",
                          "--seed", "0", "--output-format", "jsonl"], capsys, monkeypatch)
    assert code == 0, err
    assert [(r["line"], r["sequence"]) for r in map(json.loads, out.splitlines())] == [(None, 0), (None, 1)]
    code, _, err = run(["猫", "--model", str(model_dir), "--stream", "--output-format", "jsonl"], capsys, monkeypatch)
    assert code == 2 and "--no-stream" in err


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


def test_compile_gives_the_eager_tokens_in_float32(model_dir, capsys, monkeypatch):
    """--compile runs the decode step through torch.compile; in float32 its greedy text equals the eager one
    (tests/test_compile.py checks the same tokens in generate() itself), and the summary says so."""
    argv = ["吾輩は猫である。", "--model", str(model_dir), "--greedy", "--max-new-tokens", "16", "--dtype", "float32"]
    code, eager, _ = run(argv, capsys, monkeypatch)
    assert code == 0
    code, compiled, err = run([*argv, "--compile"], capsys, monkeypatch)
    assert code == 0, err
    assert compiled == eager
    assert "compiled decode step" in err


def test_compile_failing_on_the_machine_is_one_clear_line(model_dir, capsys, monkeypatch):
    """Where torch.compile cannot work (no C++ compiler: inductor raises InvalidCxxCompiler from the first
    compiled step), --compile ends with one line that says so and how to go on, not a traceback."""
    import torch._dynamo.exc

    import neoxja.generation

    def no_compiler(model, *args, **kwargs):
        def step(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException(
                "InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return step

    monkeypatch.setattr(neoxja.generation, "compile_decode", no_compiler)
    code, out, err = run(["猫", "--model", str(model_dir), "--greedy", "--max-new-tokens", "4", "--compile"],
                         capsys, monkeypatch)
    assert code == 1
    assert "--compile: torch.compile failed on this machine (InvalidCxxCompiler: No working C++ compiler" in err
    assert "run without --compile" in err and "Traceback" not in err
    code, out, _ = run(["猫", "--model", str(model_dir), "--greedy", "--max-new-tokens", "4"], capsys, monkeypatch)
    assert code == 0 and out.startswith("猫")  # without --compile nothing calls it


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
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size"),
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


def run_bytes(argv, capsys, monkeypatch, stdin: bytes):
    """stdin as a real byte stream (sys.stdin.buffer), as from a pipe or a file."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = generate_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_invalid_utf8_is_a_clear_error_naming_line_and_byte_offset(model_dir, capsys, monkeypatch):
    # printf '春は\xff\n' | neoxja generate: a traceback before the fix
    code, out, err = run_bytes(["--model", str(model_dir), "--max-new-tokens", "2"], capsys, monkeypatch,
                               stdin="夏は夜\n\n".encode() + "春は".encode() + b"\xff\n")
    assert code == 2 and out == ""
    assert "stdin line 3" in err and "byte offset 6" in err and "0xff" in err and "Traceback" not in err
    # as an argument: the bytes reach sys.argv as lone surrogates (surrogateescape)
    arg = ("春は".encode() + b"\xff").decode("utf-8", "surrogateescape")
    code, out, err = run([arg, "--model", str(model_dir), "--max-new-tokens", "2"], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert "PROMPT" in err and "byte offset 6" in err


def test_stdin_line_numbers_are_file_lines_and_a_bom_is_dropped(model_dir, capsys, monkeypatch):
    long_line = "吾輩は猫である。名前はまだ無い。" * 40
    code, out, err = run_bytes(["--model", str(model_dir), "--greedy", "--max-new-tokens", "2", "--no-stream"],
                               capsys, monkeypatch, stdin=f"春はあけぼの\n\n\n{long_line}\n".encode())
    assert code == 2 and "stdin line 4 (" in err  # blank lines 2 and 3 count
    (want,) = expected_texts(model_dir, ["春はあけぼの"], max_new_tokens=3)
    code, out, err = run_bytes(["--model", str(model_dir), "--greedy", "--max-new-tokens", "3"],
                               capsys, monkeypatch, stdin="\ufeff春はあけぼの\n".encode())
    assert code == 0, err
    assert out == want + "\n"  # no BOM in the prompt


def test_max_new_tokens_past_the_context_is_one_clear_line(model_dir, capsys, monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before the fix: a raw UserWarning from generate() with its source line
        prompt = "吾輩は猫である。" * 17  # about 120 of the 128 positions: few tokens to generate
        code, out, err = run([prompt, "--model", str(model_dir), "--max-new-tokens", "1000000", "--greedy",
                              "--output-format", "jsonl"], capsys, monkeypatch)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "max_position_embeddings" in line]
    assert len(notes) == 1 and "--max-new-tokens 1000000" in notes[0] and "Warning" not in err
    import json

    record = json.loads(out)
    assert record["prompt_tokens"] + record["new_tokens"] <= 128
    assert record["finish_reason"] == "stop" or record["prompt_tokens"] + record["new_tokens"] == 128


def test_sampling_options_are_checked_by_generates_own_rule(capsys, monkeypatch):
    """One rule for the sampling options: the CLI applies sampling.validate_sampling_args (the check generate()
    makes), with its messages spelled as options; before, check_args re-implemented it."""
    import neoxja.sampling

    def stricter(do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size):
        if top_p is not None and top_p > 0.99:
            raise ValueError(f"top_p must be at most 0.99 under the new rule, got {top_p}")

    monkeypatch.setattr(neoxja.sampling, "validate_sampling_args", stricter)
    code, _, err = run(["x", "--top-p", "1.0"], capsys, monkeypatch)
    assert code == 2 and "--top-p must be at most 0.99 under the new rule" in err


def test_generate_and_demo_share_one_bundled_model_lookup(model_dir, tmp_path, capsys, monkeypatch):
    import neoxja.assets
    from neoxja import demo

    monkeypatch.setattr(neoxja.assets, "bundled_model_dir", lambda: model_dir)
    assert generate_cli.resolve_model(None) == str(model_dir)
    assert demo.main(["--prompt", "猫", "--max-new-tokens", "2"]) == 0
    assert str(model_dir) in capsys.readouterr().out  # the demo names the model it ran
    monkeypatch.setattr(neoxja.assets, "bundled_model_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="--model"):
        generate_cli.resolve_model(None)
