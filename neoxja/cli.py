"""The `neoxja` command. Each sub-command lives in its own module, imported only when it runs."""

from __future__ import annotations

import importlib
import sys

# command -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "demo": ("neoxja.demo", "generate (or, without a model, tokenize) a sample Japanese sentence"),
    "generate": ("neoxja.generate_cli", "generate text from a prompt or from stdin"),
    "eval": ("neoxja.eval_cli", "bits per character and perplexity of a model on text or prepared data"),
    "export": ("neoxja.exporters.cli", "export a model for vLLM/TGI (gpt-neox), CTranslate2 or llama.cpp (gguf)"),
    "serve": ("neoxja.serving.cli", "serve a model with the OpenAI API (needs the serve extra)"),
    "prepare": ("neoxja.train.prepare", "tokenize a corpus into memory-mapped training files"),
    "train": ("neoxja.train.cli", "pre-train or fine-tune a model (torchrun for many processes)"),
    "vocab": ("neoxja.vocab", "build a vocabulary (`neoxja vocab build`)"),
}


def _usage() -> str:
    lines = ["usage: neoxja COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `neoxja COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a mistake: the usage goes where errors go
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from neoxja import __version__

        print(f"neoxja {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"neoxja: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(command[0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
