"""Shared test fixtures. Tests that need ../shared skip with a clear reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NEOXJA_SHARED", REPO.parent / "shared"))
ABEJA_TOKENIZER_DIR = SHARED / "tokenizers" / "abeja-gpt-neox-japanese-2.7b"
AOZORA_CORPUS = SHARED / "corpus" / "aozora-train.jsonl.gz"


@pytest.fixture(scope="session")
def abeja_dir() -> Path:
    if not (ABEJA_TOKENIZER_DIR / "vocab.txt").is_file():
        pytest.skip(f"abeja tokenizer files not found at {ABEJA_TOKENIZER_DIR} (../shared is absent)")
    return ABEJA_TOKENIZER_DIR


@pytest.fixture(scope="session")
def aozora_path() -> Path:
    if not AOZORA_CORPUS.is_file():
        pytest.skip(f"Aozora corpus not found at {AOZORA_CORPUS} (../shared is absent)")
    return AOZORA_CORPUS


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled model's directory (its tokenizer needs no ../shared)."""
    from neoxja.assets import default_model_dir

    path = default_model_dir()
    if not (path / "vocab.txt").is_file():
        pytest.skip(f"the bundled model files are absent from {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache_in_a_temporary_directory(tmp_path_factory):
    """neoxja.kernels caches its measurements and neoxja.native its built library; tests keep them out of the
    user's ~/.cache."""
    os.environ.setdefault("NEOXJA_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels") / "linear_kernels.json"))
    os.environ.setdefault("NEOXJA_BUILD_CACHE", str(tmp_path_factory.mktemp("build")))  # neoxja.native's library


@pytest.fixture(autouse=True)
def _two_steps_per_call(monkeypatch):
    """generate() runs neoxja.generation.STEPS_PER_CALL decode steps per call on a small model, and compiled it
    unrolls them into one graph, which takes several times as long to compile; the tests run 2 (the loop's
    bookkeeping is the same for any count), except where a test sets the count itself (tests/test_compile.py
    compiles the default 8 once, on a tiny model; tests/test_generation.py compares 3 and 8 with 1)."""
    import neoxja.generation

    monkeypatch.setattr(neoxja.generation, "STEPS_PER_CALL", 2)
