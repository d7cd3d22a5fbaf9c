"""GPTNeoXJapaneseConfig: the model hyper-parameters, read from and written to Hugging Face `config.json`.

Reads both transformers v4 files (`rotary_pct`, `rotary_emb_base`, `rope_scaling`) and v5 files
(`rope_parameters` with `rope_theta`, `partial_rotary_factor`, `rope_type`), and writes a file carrying
both spellings, so either version reads it. Keys we do not know are kept and written back.
Imports nothing of ours but neoxja.hub (a leaf: it imports nothing of ours), lazily, only to resolve hub ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
MODEL_TYPE = "gpt_neox_japanese"

# hidden_act values the model implements (names as in transformers' ACT2FN)
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
# rope types the model implements: "default" and "linear" (positions divided by `factor`)
SUPPORTED_ROPE_TYPES = ("default", "linear")

# Keys transformers writes that describe the file rather than the model: read and dropped, rewritten on save.
_FILE_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path")
# Keys transformers' PretrainedConfig (v4 and v5) reads for every model: kept in `extra`, never taken for typos.
TRANSFORMERS_KEYS = frozenset("""
    dtype torch_dtype id2label label2id num_labels problem_type chunk_size_feed_forward is_decoder
    is_encoder_decoder add_cross_attention cross_attention_hidden_size tie_encoder_decoder pruned_heads
    torchscript use_bfloat16 tf_legacy_loss finetuning_task tokenizer_class prefix sep_token_id
    decoder_start_token_id task_specific_params auto_map custom_pipelines quantization_config
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens rope_parameters rope_theta partial_rotary_factor classifier_dropout
    attn_implementation _attn_implementation _commit_hash gradient_checkpointing
""".split())


def check_keys(keys, strict: bool = False, where: str = "GPTNeoXJapaneseConfig") -> None:
    """ValueError for a key that is a typo of a known one (`hiden_size`: did you mean `hidden_size`?).
    With `strict` (a config written by hand for a new model: `neoxja train --model-config`), every key
    neither this class nor transformers knows is refused, with the nearest valid key when there is one."""
    import difflib

    fields = {f.name for f in dataclasses.fields(GPTNeoXJapaneseConfig)} - {"extra"}
    known = fields | set(_FILE_KEYS) | TRANSFORMERS_KEYS
    for key in keys:
        if not isinstance(key, str) or key in known or key.startswith("_"):
            continue
        near = difflib.get_close_matches(key, sorted(fields | {"rope_parameters"}), n=1, cutoff=0.8)
        if near:
            raise ValueError(f"{where}: unknown key {key!r}; did you mean {near[0]!r}?")
        if strict:  # a field that holds the key as a word ('layers': num_hidden_layers), else the closest
            near = sorted((f for f in fields if len(key) > 3 and key.lower() in f), key=len)
            near = near or difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(fields))}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")


@dataclass
class GPTNeoXJapaneseConfig:
    vocab_size: int = 32000
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_multiple_size: int = 4
    hidden_act: str = "gelu"
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    bos_token_id: int | None = 31996
    eos_token_id: int | list[int] | None = 31999
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.0
    # transformers' default: a config.json without this key ties embed_out to embed_in
    tie_word_embeddings: bool = True
    # None, or {"rope_type": "linear", "factor": f}
    rope_scaling: dict | None = None
    pad_token_id: int | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    # keys of config.json this class does not model; kept and written back
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
            if self.rope_scaling["rope_type"] == "default":
                self.rope_scaling = None  # one spelling for "no scaling"
        self.validate()

    # ---- derived sizes ----
    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.intermediate_multiple_size

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    def __getattr__(self, name):
        # unknown config.json keys read like attributes (e.g. config.torch_dtype), as in transformers
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is impossible."""

        def require(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"GPTNeoXJapaneseConfig.{name} {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_multiple_size", "max_position_embeddings"):
            require(is_int(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive integer")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                f"must be divisible by num_attention_heads={self.num_attention_heads}")
        require(self.hidden_act in SUPPORTED_ACTIVATIONS, "hidden_act", f"must be one of {SUPPORTED_ACTIVATIONS}")
        require(is_number(self.rotary_pct) and 0.0 <= self.rotary_pct <= 1.0, "rotary_pct",
                "must be a number in [0, 1]")
        require(self.rotary_ndims % 2 == 0, "rotary_pct",
                f"must give an even number of rotary dims per head (head_size={self.head_size})")
        require(is_number(self.rotary_emb_base) and self.rotary_emb_base > 0, "rotary_emb_base",
                "must be a positive number")
        require(is_number(self.layer_norm_eps) and self.layer_norm_eps > 0, "layer_norm_eps",
                "must be a positive number")
        require(is_number(self.initializer_range) and self.initializer_range >= 0, "initializer_range",
                "must be a non-negative number")
        for name in ("attention_dropout", "hidden_dropout"):
            require(is_number(getattr(self, name)) and 0.0 <= getattr(self, name) < 1.0, name,
                    "must be a probability in [0, 1)")
        for name in ("use_cache", "tie_word_embeddings", "output_attentions", "output_hidden_states", "return_dict"):
            require(isinstance(getattr(self, name), bool), name, "must be a bool")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            require(v is None or (is_int(v) and v >= 0), name, "must be None or a non-negative integer")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        require(eos is None or all(is_int(v) and v >= 0 for v in eos_list), "eos_token_id",
                "must be None, a non-negative integer or a list of them")
        require(isinstance(self.extra, dict), "extra", "must be a dict")

    # ---- dict / json ----
    @classmethod
    def from_dict(cls, config_dict: dict, **overrides) -> "GPTNeoXJapaneseConfig":
        """Build from a transformers v4 or v5 config dict; unknown keys go to `extra`."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"config must be a dict, got {type(config_dict).__name__}")
        d = {**config_dict, **overrides}
        check_keys(d)  # a typo of a key would otherwise be kept in `extra` and silently ignored
        model_type = d.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"GPTNeoXJapaneseConfig.model_type must be {MODEL_TYPE!r}, got {model_type!r}")

        # v5 spelling: rope_parameters carries theta, partial factor and the scaling type. transformers v5 lets
        # `rope_scaling` win over `rope_parameters`, and theta/factor written there win over the v4 keys
        # (which only fill them in when absent); we do the same. Keyword overrides win over both.
        rope = d.pop("rope_parameters", None)
        scaling = d.pop("rope_scaling", None) or rope
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ValueError(f"GPTNeoXJapaneseConfig.rope_parameters must be a dict, got {scaling!r}")
            scaling = dict(scaling)
            for nested, v4_key in (("rope_theta", "rotary_emb_base"), ("partial_rotary_factor", "rotary_pct")):
                if nested in scaling:
                    value = scaling.pop(nested)
                    if v4_key not in overrides:
                        d[v4_key] = value
            d["rope_scaling"] = scaling

        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(d.pop("extra", {}) or {})
        kwargs = {}
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key not in _FILE_KEYS:
                extra[key] = value
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        """A config.json dict that transformers v4 and v5 both read (v4 keys plus v5 `rope_parameters`)."""
        d: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": ["GPTNeoXJapaneseForCausalLM"]}
        d.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        rope = {"rope_type": "default"} if self.rope_scaling is None else dict(self.rope_scaling)
        rope.update(rope_theta=float(self.rotary_emb_base), partial_rotary_factor=float(self.rotary_pct))
        d["rope_parameters"] = rope
        if self.rope_scaling is not None:
            # v4 reads rope_scaling (older v4 spell the type "type"); v5 lets it win over rope_parameters and
            # then takes theta and the rotary fraction from rotary_emb_base / rotary_pct, written above
            d["rope_scaling"] = {**self.rope_scaling, "type": self.rope_scaling["rope_type"]}
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    # ---- files ----
    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPTNeoXJapaneseConfig":
        path = Path(path)
        data = read_config_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        **overrides) -> "GPTNeoXJapaneseConfig":
        """Read config.json from a directory, a file, or a hub repo id."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / CONFIG_NAME
            if not path.is_file():
                raise FileNotFoundError(f"no {CONFIG_NAME} in directory {name_or_path}")
        elif not path.is_file():
            from neoxja.hub import resolve_model_path  # a leaf module: imports nothing of ours

            path = resolve_model_path(name_or_path, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only) / CONFIG_NAME
        config = cls.from_json_file(path)
        return dataclasses.replace(config, **overrides) if overrides else config

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        out = Path(save_directory)
        if out.is_file():
            raise ValueError(f"save_pretrained needs a directory, {out} is a file")
        out.mkdir(parents=True, exist_ok=True)
        path = out / CONFIG_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json_string(), encoding="utf-8")
        os.replace(tmp, path)  # never leave a half-written config.json
        return path


def read_config_json(spec: str | os.PathLike, strict: bool = False) -> dict:
    """The JSON object of a config file or, for a str starting with "{", of inline JSON; ValueError saying
    what is wrong (a directory, not JSON, a list rather than an object, with `strict` an unknown key)."""
    inline = isinstance(spec, str) and spec.lstrip().startswith("{")
    where = "inline JSON" if inline else str(spec)
    if inline:
        text = spec
    else:
        path = Path(spec)
        if path.is_dir():
            hint = f" ({path / CONFIG_NAME} is one)" if (path / CONFIG_NAME).is_file() else ""
            raise ValueError(f"{path} is a directory: give a config.json file{hint}")
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (UTF-8): {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON (UTF-8): {e}") from e
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(data), "null")
        raise ValueError(f"{where} must hold one JSON object {{\"key\": value, ...}}, got {kind}")
    if strict:
        check_keys(data, strict=True, where=where)
    return data


def _normalize_rope_scaling(scaling: dict) -> dict:
    """{"type"|"rope_type": t, "factor": f, ...} -> {"rope_type": t, "factor": f, ...}; checks t and f."""
    if not isinstance(scaling, dict):
        raise ValueError(f"GPTNeoXJapaneseConfig.rope_scaling must be a dict or None, got {scaling!r}")
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", None)
    rope_type = scaling.setdefault("rope_type", legacy_type or "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"GPTNeoXJapaneseConfig.rope_scaling: unsupported rope_type {rope_type!r}, "
                         f"supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "linear":
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise ValueError(f"GPTNeoXJapaneseConfig.rope_scaling.factor must be a positive number for linear "
                             f"scaling, got {factor!r}")
    return scaling
