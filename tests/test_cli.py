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
