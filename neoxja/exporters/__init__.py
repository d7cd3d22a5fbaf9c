"""Exports of a GPT-NeoX-Japanese model to the formats other inference engines read.

    neoxja.export(model, "out/neox", to="gpt-neox")                       # transformers / vLLM / TGI
    neoxja.export(model, "out/ct2", to="ctranslate2", quantization="int8")  # CTranslate2
    neoxja.export(model, "out/model.gguf", to="gguf", type="q8_0")        # llama.cpp

The architecture is GPT-NeoX once a few details are written out (see `neoxja.exporters.gpt_neox`); every
format starts from that one state dict. Each export starts from float weights (a `quantize()`d model is
refused), refuses an existing output unless `force=True`, and is written aside and renamed into place, so
that a half-written export never looks complete.

This package is `neoxja.exporters` rather than `neoxja.export` so that importing it never replaces the
function `neoxja.export`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

FORMATS = ("gpt-neox", "ctranslate2", "gguf")


class ExportError(ValueError):
    """An export that cannot be made: a bad model, a bad argument or an unusable output path."""


def export(model, path: str | os.PathLike, to: str = "gpt-neox", *, tokenizer=None, quantization: str | None = None,
           type: str | None = None, force: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Export `model` to `path` in format `to` ("gpt-neox", "ctranslate2" or "gguf") and return the path.

    model: a float GPTNeoXJapaneseForCausalLM, or a directory / hub id to load one from (in float32).
    tokenizer: a GPTNeoXJapaneseTokenizer or a directory holding one; by default, the model's directory
        when `model` is a path. Without one, the engines get placeholder token strings (drive them with ids).
    quantization: ctranslate2 only, "float32" (default), "int8", "int8_float32" or "int16".
    type: gguf only, "f32" (default), "f16", "q8_0" or "q4_0".
    force: replace an existing output.
    max_shard_size: gpt-neox only, as in save_pretrained.
    """
    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; expected one of {', '.join(FORMATS)}")
    if quantization is not None and to != "ctranslate2":
        raise ExportError(f"quantization= applies to ctranslate2 exports only, not to {to!r} (gguf takes type=)")
    if type is not None and to != "gguf":
        raise ExportError(f"type= applies to gguf exports only, not to {to!r} (ctranslate2 takes quantization=)")
    out = Path(path)
    check_output(out, directory=to != "gguf", force=force)
    # check the cheap arguments before a model is loaded
    if to == "ctranslate2":
        from neoxja.exporters.ctranslate2 import check_quantization
        quantization = check_quantization(quantization)
    elif to == "gguf":
        from neoxja.exporters.gguf import check_type
        type = check_type(type)
    model, tokenizer = resolve_inputs(model, tokenizer)
    if to == "gpt-neox":
        from neoxja.exporters.gpt_neox import write_gpt_neox
        return write_gpt_neox(model, out, tokenizer=tokenizer, force=force, max_shard_size=max_shard_size)
    if to == "ctranslate2":
        from neoxja.exporters.ctranslate2 import write_ctranslate2
        return write_ctranslate2(model, out, tokenizer=tokenizer, quantization=quantization, force=force)
    from neoxja.exporters.gguf import write_gguf
    return write_gguf(model, out, tokenizer=tokenizer, type=type, force=force)


# ----------------------------------------------------------------------------------------------------------
# inputs


def resolve_inputs(model, tokenizer):
    """(float model, tokenizer or None) from what the caller passed; clear errors for the rest."""
    source_dir = None
    if isinstance(model, (str, os.PathLike)):
        from neoxja.model import GPTNeoXJapaneseForCausalLM

        source = Path(model)
        if not source.exists() and (source.is_absolute() or str(model).startswith((".", "~"))
                                    or str(model).count("/") != 1):
            raise ExportError(f"model {str(model)!r} does not exist (expected a model directory or a hub id)")
        try:
            loaded = GPTNeoXJapaneseForCausalLM.from_pretrained(model, dtype="float32")
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load model {str(model)!r}: {e}") from e
        source_dir = source if source.is_dir() else None
        model = loaded
    check_float_model(model)
    if tokenizer is None and source_dir is not None and (source_dir / "vocab.txt").is_file():
        tokenizer = source_dir
    if isinstance(tokenizer, (str, os.PathLike)):
        from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

        try:
            tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load the tokenizer from {str(tokenizer)!r}: {e}") from e
    return model, tokenizer


def check_float_model(model) -> None:
    """Refuse anything but a float GPTNeoXJapaneseForCausalLM (a quantized one lacks its float weights)."""
    import torch
    from torch import nn

    from neoxja.model import GPTNeoXJapaneseForCausalLM

    if not isinstance(model, GPTNeoXJapaneseForCausalLM):
        raise ExportError(f"export needs a GPTNeoXJapaneseForCausalLM (or a path to one), got {type(model).__name__}"
                          + (" (the base model has no LM head to export)" if isinstance(model, nn.Module) else ""))
    mode = getattr(model, "quantization", "none")
    if mode not in (None, "none"):
        raise ExportError(f"this model is quantized ({mode}): an export starts from float weights. Export the float "
                          "model and choose the engine's own quantization (ctranslate2 --quantization int8, gguf "
                          "--type q8_0)")
    for name, module in model.named_modules():
        if module is not model and not list(module.children()) and not isinstance(
                module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout)) and not name.endswith("rotary_emb"):
            raise ExportError(f"module {name} is a {type(module).__name__}, not a float layer: an export starts from "
                              "float weights (was the model quantized or transformed?)")
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ExportError(f"parameter {name} has no data (meta device): load the weights first")
        if not p.is_floating_point():
            raise ExportError(f"parameter {name} is {p.dtype}, not a float tensor")
        if not torch.isfinite(p).all():
            raise ExportError(f"parameter {name} holds NaN or infinite values; refusing to export it")


# ----------------------------------------------------------------------------------------------------------
# output paths: refuse what would lose data, write aside, rename into place


def check_output(out: Path, directory: bool, force: bool) -> None:
    if directory and out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} is a file; this format is a directory")
    if not directory and out.is_dir():
        raise ExportError(f"output path {out} is a directory; this format is one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not force:
        raise ExportError(f"output path {out} already exists; pass --force (force=True) to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"cannot create {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {existing} is not writable (read-only destination?)")


@contextmanager
def staged(out: Path, force: bool, directory: bool):
    """Yield a temporary path beside `out`; on success it is renamed to `out` (an old `out` is replaced only
    with force, and removed only after the new one is in place). On any error the temporary path is removed
    and `out` is untouched."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=parent)
            os.close(fd)
            tmp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)  # mkdtemp/mkstemp make them private
    except OSError as e:
        raise ExportError(f"cannot write into {parent}: {e}") from e
    try:
        yield tmp
        if out.exists():
            if not force:  # appeared meanwhile
                raise ExportError(f"output path {out} already exists; pass --force (force=True) to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"writing {out} failed, nothing was left behind: {e}") from e
        raise


# ----------------------------------------------------------------------------------------------------------
# vocabulary for engines that key tokens by string


def engine_vocabulary(tokenizer, vocab_size: int) -> list[str]:
    """One unique string per id 0..vocab_size-1, for CTranslate2 and GGUF vocabularies.

    The token's first spelling in vocab.txt when no other id has it, else `<|id:N|>`; ids past the
    tokenizer's vocabulary (or every id, without a tokenizer) are `<|id:N|>` placeholders too. The engines
    are driven with token ids (or these strings) made by neoxja's tokenizer, never with their own.
    """
    tokens = []
    seen = set()
    spellings = tokenizer.ids_to_tokens if tokenizer is not None else []
    for i in range(vocab_size):
        word = spellings[i][0] if i < len(spellings) and spellings[i] and spellings[i][0] else None
        if word is None or word in seen or word.startswith("<|id:"):
            word = f"<|id:{i}|>"
        seen.add(word)
        tokens.append(word)
    return tokens


__all__ = ["FORMATS", "ExportError", "export"]
