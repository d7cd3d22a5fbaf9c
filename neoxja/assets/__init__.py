"""Data shipped inside the package.

- `emoji_map.json`: this project's emoji map (made by scripts/make_emoji_map.py from Unicode data);
  `neoxja vocab build` writes it as emoji.json beside each vocabulary.
- `aozora-small/`: the bundled demonstration model (Hugging Face layout: config.json,
  model.safetensors, vocab.txt, emoji.json, tokenizer_config.json, special_tokens_map.json),
  trained on Aozora Bunko texts with this project's own tools; see docs/bundled-model.md.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "aozora-small"


def default_model_dir() -> Path:
    """Directory of the bundled model: the default of `neoxja generate` and `neoxja demo`.

    The path is returned whether or not the files are there (a checkout before the model was
    trained has none); callers check for config.json.
    """
    return Path(__file__).resolve().parent / BUNDLED_MODEL_NAME


def bundled_model_dir() -> Path | None:
    """The bundled model's directory when its files are installed (it has config.json), else None.

    The one lookup of the bundled model that `neoxja generate`, `neoxja eval` and `neoxja demo` share.
    """
    path = default_model_dir()
    return path if (path / "config.json").is_file() else None
