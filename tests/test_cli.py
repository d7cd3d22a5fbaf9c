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
