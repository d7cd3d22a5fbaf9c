import subprocess
import sys

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
