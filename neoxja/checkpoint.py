"""Hugging Face checkpoints in and out: config.json plus safetensors (single or sharded) or pytorch_model.bin.

Loading builds the model on the meta device and then loads every tensor once, straight into the target
dtype and device (safetensors are memory-mapped), so peak memory stays near the size of the weights.
`.bin` files go through torch.load(weights_only=True) only: a pickle that carries code is refused.

Tied embeddings follow transformers 5 (`PreTrainedModel.tie_weights` during from_pretrained):
with tie_word_embeddings, a checkpoint holding only one of embed_in / embed_out ties both to it; holding both
with equal values ties them; holding both with different values keeps them apart (with a warning, and the
loaded config then says tie_word_embeddings=False so that it describes the model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from neoxja.config import CONFIG_NAME, GPTNeoXJapaneseConfig
from neoxja.hub import resolve_model_path

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# in the order they are looked for
WEIGHT_FILE_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)

PREFIX = "gpt_neox_japanese."
EMBED_IN = PREFIX + "embed_in.weight"
EMBED_OUT = "embed_out.weight"
# what save_pretrained writes (and may replace): one file, or numbered shards and their index, or a
# temporary file of an interrupted save; nothing else in the directory is ours to delete
WEIGHTS_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?(\.tmp)?")
# buffers older checkpoints carry; the model recomputes them
IGNORED_KEYS = re.compile(r"(^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or a file that cannot be read."""


# ----------------------------------------------------------------------------------------------------------
# finding the files


def resolve_files(name_or_path: str | os.PathLike, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> tuple[Path, list[Path]]:
    """(config.json path, weight files) of a local directory or a hub id (found by neoxja.hub's resolver)."""
    path = resolve_model_path(name_or_path, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only, files=(CONFIG_NAME, WEIGHT_FILE_NAMES))
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in directory {path}")
    for name in WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            return config_path, _expand_index(path / name, lambda shard: path / shard)
    raise FileNotFoundError(f"no weights in directory {path}: expected one of {', '.join(WEIGHT_FILE_NAMES)}")


def _expand_index(path: Path, shard_path) -> list[Path]:
    """[path] for a weights file; the shard paths (deduplicated, in order) for an index file."""
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        shards = list(dict.fromkeys(index["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid checkpoint index (needs a 'weight_map'): {e}") from e
    if not shards:
        raise CheckpointError(f"{path} is not a valid checkpoint index: its 'weight_map' names no shard file")
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise CheckpointError(f"{path} names an invalid shard file {shard!r}")
    return [Path(shard_path(shard)) for shard in shards]


# ----------------------------------------------------------------------------------------------------------
# reading tensors


def _read_state_dicts(files: list[Path]):
    """Yield (file, {key: tensor or lazy safetensors handle}) per file; errors name the file."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file {file} does not exist")
        if file.suffix == ".safetensors":
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")  # memory-mapped
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read safetensors file {file} (truncated or corrupt?): {e}") from e
            yield file, _SafetensorsFile(file, handle, keys)
        else:
            yield file, _load_bin(file)


class _SafetensorsFile:
    """Lazy view of one safetensors file: shapes from the header, tensors read on demand."""

    def __init__(self, file: Path, handle, keys: list[str]):
        self.file, self.handle, self.keys_ = file, handle, keys

    def keys(self):
        return self.keys_

    def shape(self, key) -> tuple:
        return tuple(self.handle.get_slice(key).get_shape())

    def dtype(self, key) -> torch.dtype | None:
        """The tensor's torch dtype; None for a safetensors type torch has no name for here (F8 and the like)."""
        name = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}.get(
            self.handle.get_slice(key).get_dtype())
        return getattr(torch, name) if name else None

    def close(self) -> None:
        self.handle = None  # the mapping goes with the handle (tensors read from it are copies)

    def tensor(self, key) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self.handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.file} (truncated or corrupt?): {e}") from e


class _BinFile:
    def __init__(self, file: Path, state_dict: dict):
        self.file, self.state_dict = file, state_dict

    def keys(self):
        return list(self.state_dict)

    def shape(self, key) -> tuple:
        return tuple(self.state_dict[key].shape)

    def dtype(self, key) -> torch.dtype:
        return self.state_dict[key].dtype

    def tensor(self, key) -> torch.Tensor:
        return self.state_dict[key]

    def close(self) -> None:
        self.state_dict = {}


def _load_bin(file: Path) -> _BinFile:
    try:
        try:
            state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state_dict = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {file}: it is not a plain tensor checkpoint (torch.load(weights_only=True) found "
            f"objects or code it will not execute): {e}") from e
    except Exception as e:  # noqa: BLE001 -- a corrupt file surfaces as KeyError, IndexError, ... from the unpickler
        raise CheckpointError(f"cannot read checkpoint file {file} (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return _BinFile(file, state_dict)


# ----------------------------------------------------------------------------------------------------------
# loading


def resolve_dtype(dtype, config: GPTNeoXJapaneseConfig, first_file_dtype: torch.dtype | None) -> torch.dtype:
    """None or "auto" (transformers 5's default): config.json's dtype, else the checkpoint's own."""
    if dtype is None or dtype == "auto":
        stored = config.extra.get("dtype") or config.extra.get("torch_dtype")
        if isinstance(stored, str) and stored.replace("torch.", "") in SUPPORTED_DTYPES:
            return SUPPORTED_DTYPES[stored.replace("torch.", "")]
        return first_file_dtype if first_file_dtype in SUPPORTED_DTYPES.values() else torch.float32
    if isinstance(dtype, str):
        if dtype.replace("torch.", "") not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)} or 'auto', got {dtype!r}")
        return SUPPORTED_DTYPES[dtype.replace("torch.", "")]
    if dtype not in SUPPORTED_DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)} or 'auto', got {dtype!r}")
    return dtype


def load_pretrained(cls, name_or_path, dtype=None, device=None, revision=None, local_files_only=False,
                    cache_dir=None, config: GPTNeoXJapaneseConfig | None = None, quantize=None):
    """`quantize`: None, or a `neoxja.quantization.LayerwiseQuantizer`, called after each tensor is installed
    and finished at the end, so that layers are quantized as they load (see neoxja.quantization.load_quantized)."""
    config_path, files = resolve_files(name_or_path, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only)
    if config is None:
        config = GPTNeoXJapaneseConfig.from_json_file(config_path)
    config = dataclasses.replace(config, extra=dict(config.extra))  # the model owns its copy (tying may change it)
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.state_dict(keep_vars=True))  # name -> meta parameter
    model_has_head = EMBED_OUT in expected

    readers = list(_read_state_dicts(files))
    first = readers[0][1]
    target_dtype = resolve_dtype(dtype, config, first.dtype(first.keys()[0]) if first.keys() else None)

    # map checkpoint keys to model keys; a CausalLM checkpoint may feed the base model and vice versa
    checkpoint_prefixed = any(k.startswith(PREFIX) for _, r in readers for k in r.keys())
    plan = {}  # model key -> (reader, checkpoint key)
    unexpected, mismatched = [], []
    for file, reader in readers:
        for key in reader.keys():
            if IGNORED_KEYS.search(key):
                continue
            name = key
            if model_has_head and not checkpoint_prefixed and key != EMBED_OUT:
                name = PREFIX + key
            elif not model_has_head and checkpoint_prefixed:
                if key == EMBED_OUT:
                    continue  # the LM head of a causal-LM checkpoint; the base model has none
                name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name not in expected:
                unexpected.append(f"{key} (in {file.name})")
                continue
            shape, want = reader.shape(key), tuple(expected[name].shape)
            if shape != want:
                mismatched.append(f"{key}: checkpoint {list(shape)} vs model {list(want)}")
                continue
            stored = reader.dtype(key)
            if stored not in (torch.float64, *SUPPORTED_DTYPES.values()):
                mismatched.append(f"{key}: checkpoint dtype {str(stored).replace('torch.', '')} "
                                  "where the model has float weights")
                continue
            plan[name] = (reader, key)

    tied = config.tie_word_embeddings and model_has_head
    tie_keys = {EMBED_IN, EMBED_OUT} if tied else set()
    missing = [k for k in expected if k not in plan and k not in tie_keys]
    if tied and not (tie_keys & plan.keys()):
        missing.append(f"{EMBED_IN} (or {EMBED_OUT}, tied)")
    if unexpected or missing or mismatched:
        lines = [f"checkpoint {name_or_path} does not fit {cls.__name__} with this config:"]
        if missing:
            lines.append("missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("shape or dtype mismatches: " + "; ".join(mismatched))
        raise CheckpointError("\n  ".join(lines))

    # each tensor once: read (mmap), convert to the target dtype/device, install as the parameter; a file's
    # mapping is dropped once its last tensor is read, so its pages leave this process's RSS
    left = {}
    for reader, _ in plan.values():
        left[id(reader)] = left.get(id(reader), 0) + 1
    for name, (reader, key) in plan.items():
        tensor = reader.tensor(key)
        left[id(reader)] -= 1
        if not left[id(reader)]:
            reader.close()
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        value = tensor.to(device=device, dtype=target_dtype if tensor.is_floating_point() else tensor.dtype)
        if quantize is not None and value.data_ptr() == tensor.data_ptr():
            # a tensor read from a memory-mapped file stays a view of it; kept as one (a norm, an embedding),
            # it would keep the whole file's pages in this process after quantizing touched them
            value = value.clone()
        if isinstance(old, nn.Parameter):
            module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = value
        del tensor, value, old
        if quantize is not None:
            quantize(model, module_name)
    if tied:
        _tie_loaded_embeddings(model, config, name_or_path)

    # non-persistent buffers (rotary frequencies) were computed for real; move them next to the weights
    for module in model.modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[buffer_name] = buffer.to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen when the checks above hold; never hand back a half-built model
        raise CheckpointError(f"parameters left unloaded: {', '.join(leftover)}")
    if quantize is not None:
        quantize.finish(model)
    return model.eval()


def _tie_loaded_embeddings(model, config, name_or_path):
    embed_in_module = model.gpt_neox_japanese.embed_in
    embed_in, embed_out = embed_in_module.weight, model.embed_out.weight
    if embed_in.is_meta:  # only embed_out in the checkpoint: tie the other way round
        embed_in_module.weight = embed_out
    elif embed_out.is_meta or embed_out is embed_in:
        model.embed_out.weight = embed_in
    elif torch.equal(embed_in, embed_out):
        model.embed_out.weight = embed_in
    else:
        warnings.warn(
            f"config of {name_or_path} ties the word embeddings, but the checkpoint holds different values for "
            f"{EMBED_IN} and {EMBED_OUT}; like transformers, both are kept untied (the loaded config now says "
            f"tie_word_embeddings=False)", UserWarning, stacklevel=3)
        config.tie_word_embeddings = False


# ----------------------------------------------------------------------------------------------------------
# saving


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (decimal units as in transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be an int or like '5GB' / '500MB', got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    if number * scale < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return int(number * scale)


def save_pretrained(model, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    if getattr(model, "quantization", "none") != "none":
        raise ValueError(f"this model is quantized ({model.quantization}): its int8 layers hold no float weights, so "
                         "the checkpoint would lack them; save the float model and quantize after loading")
    limit = parse_size(max_shard_size)
    out = Path(save_directory)
    if out.is_file():
        raise ValueError(f"save_pretrained needs a directory, {out} is a file")
    out.mkdir(parents=True, exist_ok=True)

    state = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if storage in seen:
            if model.config.tie_word_embeddings:
                continue  # a tied weight is stored once, under embed_in (as transformers does)
            tensor = tensor.clone()  # shared without the config saying so: store both (safetensors needs copies)
        seen.add(storage)
        state[name] = tensor.detach().to("cpu").contiguous()

    write_safetensors(state, out, limit)

    dtype_name = str(model.dtype).replace("torch.", "")
    config = dataclasses.replace(model.config, extra={**model.config.extra, "dtype": dtype_name})
    config.extra.pop("torch_dtype", None)
    config.save_pretrained(out)
    return out


def write_safetensors(state: dict, out: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Write `state` (name -> contiguous CPU tensor, no shared storage) into directory `out` as
    model.safetensors, or numbered shards of at most max_shard_size plus their index, the way
    transformers' save_pretrained lays them out. Each file is written aside and renamed; weight files
    of an earlier save that this one does not overwrite are removed. Returns the file names written."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    # greedy shards in state-dict order, each at most `limit` bytes (a bigger single tensor gets its own)
    shards, current, current_size = [], {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += size
    shards.append(current)

    names = [SAFE_WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # remove weights of an earlier save that this one does not overwrite, so the directory holds one checkpoint
    stale = [p for p in out.iterdir() if WEIGHTS_FILE.fullmatch(p.name) and p.name not in names]
    for shard, name in zip(shards, names):
        tmp = out / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for shard, name in zip(shards, names) for k in shard}}
        tmp = out / (SAFE_WEIGHTS_INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, out / SAFE_WEIGHTS_INDEX_NAME)
    for path in stale:
        if path.name != SAFE_WEIGHTS_INDEX_NAME or len(shards) == 1:
            path.unlink(missing_ok=True)  # a stale .tmp may have been this save's own, renamed already
    return names if len(shards) == 1 else names + [SAFE_WEIGHTS_INDEX_NAME]

