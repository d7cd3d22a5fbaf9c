import subprocess
import sys
import pytest

from neoxja.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_import_has_no_torch_side_effect():
    # `import neoxja` and the tokenizer must not import torch (the tokenizer needs no torch).
    code = "import sys, neoxja, neoxja.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_command_prints_the_usage_as_an_error(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: neoxja COMMAND" in captured.err


def test_demo_counts_only_new_tokens_and_refuses_bad_numbers(capsys):
    import pytest

    from neoxja import demo

    assert demo.main(["--prompt", "", "--max-new-tokens", "5"]) == 0
    assert "[5 new tokens" in capsys.readouterr().err  # BOS, added for the empty prompt, is not new
    for bad in (["--max-new-tokens", "-1"], ["--seed", str(2**70)]):
        with pytest.raises(SystemExit):
            demo.main(bad)
    assert demo.main(["--prompt", "猫" * 600]) == 2  # longer than the bundled model's positions
    assert "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["neoxja.generate_cli", "neoxja.demo", "neoxja.eval_cli"])
def test_every_option_shows_its_default_in_help(module):
    """issue 14, item 13: `--help` gives each option's default (before: generate's --seed, --greedy,
    --num-return-sequences and every demo option had none)."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in action.help, f"{module} {action.option_strings[0]} has no default"
def test_generate_into_a_closed_pipe_stops_quietly():
    """`neoxja generate ... | head -1`: the reader leaves; no traceback, a non-zero exit."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "neoxja", "generate", "--max-new-tokens", "20", "--seed", "0", "吾輩は"], cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # gone before the first token is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_every_train_and_prepare_option_shows_its_default():
    import argparse

    from neoxja.train.cli import build_parser as train_parser
    from neoxja.train.prepare import build_parser as prepare_parser

    for parser in (train_parser(), prepare_parser()):
        one_required = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if (action.option_strings and not action.required and action not in one_required
                    and not isinstance(action, argparse._HelpAction)):
                assert "default" in (action.help or ""), f"{parser.prog} {action.option_strings[0]}: no default shown"


def test_train_refuses_more_warmup_than_steps_and_explains_a_jsonl_data_file(tmp_path, capsys):
    import pytest

    from neoxja.train.cli import main as train

    common = ["--out", str(tmp_path / "o"), "--model-config", "{}", "--batch-size", "1", "--seq-len", "4"]
    with pytest.raises(SystemExit):
        train(["--data", str(tmp_path), *common, "--steps", "10", "--warmup-steps", "11"])
    assert "--warmup-steps (11) must not exceed --steps (10)" in capsys.readouterr().err
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "x"}\n')
    assert train(["--data", str(corpus), *common, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out DIR {corpus}`, then train with --data DIR" in err
