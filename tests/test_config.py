"""GPTNeoXJapaneseConfig: documented defaults, transformers v4 and v5 config.json, validation."""

from __future__ import annotations

import json

import pytest

from neoxja.config import GPTNeoXJapaneseConfig

DOCUMENTED_DEFAULTS = dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                           intermediate_multiple_size=4, hidden_act="gelu", rotary_pct=1.0, rotary_emb_base=10000,
                           max_position_embeddings=2048, initializer_range=0.02, layer_norm_eps=1e-5,
                           use_cache=True, bos_token_id=31996, eos_token_id=31999, attention_dropout=0.1,
                           hidden_dropout=0.0, tie_word_embeddings=True)

# config.json of abeja/gpt-neox-japanese-2.7b as written by transformers v4 (no tie_word_embeddings key)
V4_ABEJA = {
    "architectures": ["GPTNeoXJapaneseForCausalLM"], "attention_dropout": 0.1, "bos_token_id": 31996,
    "eos_token_id": 31999, "hidden_act": "gelu", "hidden_dropout": 0.0, "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_multiple_size": 4, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox_japanese", "num_attention_heads": 32,
    "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_documented_defaults():
    config = GPTNeoXJapaneseConfig()
    for name, value in DOCUMENTED_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.head_size == 80 and config.intermediate_size == 10240 and config.rotary_ndims == 80


def test_defaults_agree_with_transformers():
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPTNeoXJapaneseConfig()
    ours = GPTNeoXJapaneseConfig()
    for name in DOCUMENTED_DEFAULTS:
        if name in ("rotary_pct", "rotary_emb_base"):
            continue
        assert getattr(ours, name) == getattr(ref, name), name
    assert ref.rope_parameters["partial_rotary_factor"] == ours.rotary_pct
    assert ref.rope_parameters["rope_theta"] == ours.rotary_emb_base


def test_reads_v4_file_and_keeps_unknown_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**V4_ABEJA, "rotary_pct": 0.5, "rotary_emb_base": 20000,
                                                      "rope_scaling": {"type": "linear", "factor": 2.0},
                                                      "my_custom_key": [1, 2]}))
    config = GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    assert config.rotary_pct == 0.5 and config.rotary_emb_base == 20000
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.tie_word_embeddings is True  # absent key: transformers' default
    assert config.extra["my_custom_key"] == [1, 2] and config.my_custom_key == [1, 2]
    assert config.torch_dtype == "float32"
    written = config.to_dict()
    assert written["my_custom_key"] == [1, 2]
    assert written["rotary_pct"] == 0.5 and written["rotary_emb_base"] == 20000
    assert written["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0,
                                          "partial_rotary_factor": 0.5}
    assert written["rope_scaling"]["type"] == "linear"  # v4 spelling
    assert "transformers_version" not in written


def test_reads_v5_file_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPTNeoXJapaneseConfig(hidden_size=48, num_attention_heads=3, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 123.0, "partial_rotary_factor": 0.25})
    ref.save_pretrained(tmp_path)
    assert "rotary_pct" not in json.loads((tmp_path / "config.json").read_text())
    config = GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_attention_heads, config.tie_word_embeddings) == (48, 3, False)
    assert (config.rotary_pct, config.rotary_emb_base) == (0.25, 123.0)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("file", [
    {"rotary_emb_base": 10000, "rotary_pct": 1.0,
     "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5}},
    {"rotary_emb_base": 10000, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    {"rotary_emb_base": 700, "rotary_pct": 0.25, "rope_parameters": {"rope_type": "default"}},
])
def test_rope_values_in_both_spellings_resolve_as_in_transformers(tmp_path, file):
    """Theta and the rotary fraction written inside rope_parameters / rope_scaling win over the v4 keys
    (an edit of a file that has both, the v5 way, must take effect); the v4 keys fill in what is absent."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox_japanese", "hidden_size": 64,
                                                      "num_attention_heads": 4, **file}))
    ref = transformers.GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    ours = GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    assert ours.rotary_emb_base == ref.rope_parameters["rope_theta"]
    assert ours.rotary_pct == ref.rope_parameters.get("partial_rotary_factor", 1.0)
    # keyword overrides still win over the file
    assert GPTNeoXJapaneseConfig.from_pretrained(tmp_path, rotary_emb_base=42).rotary_emb_base == 42


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 3.0}])
def test_written_file_reads_back_in_transformers_and_here(tmp_path, rope_scaling):
    transformers = pytest.importorskip("transformers")
    ours = GPTNeoXJapaneseConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 rotary_pct=0.5, rotary_emb_base=5000, tie_word_embeddings=False,
                                 rope_scaling=rope_scaling, extra={"note": "kept"})
    ours.save_pretrained(tmp_path)
    ref = transformers.GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    assert ref.rope_parameters["partial_rotary_factor"] == 0.5
    assert ref.rope_parameters["rope_theta"] == 5000
    assert ref.rope_parameters["rope_type"] == (rope_scaling or {"rope_type": "default"})["rope_type"]
    if rope_scaling:
        assert ref.rope_parameters["factor"] == 3.0
    assert (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.tie_word_embeddings) == (500, 64, 3, False)
    again = GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    assert again == ours
    # and a file transformers writes from it reads back the same here
    ref.save_pretrained(tmp_path / "ref")
    from_ref = GPTNeoXJapaneseConfig.from_pretrained(tmp_path / "ref")
    for name in ("vocab_size", "hidden_size", "rotary_pct", "rotary_emb_base", "rope_scaling", "tie_word_embeddings"):
        assert getattr(from_ref, name) == getattr(ours, name), name


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 30),  # not divisible by 4 heads
    ("hidden_size", 0),
    ("num_attention_heads", -1),
    ("num_hidden_layers", 0),
    ("vocab_size", 2.5),
    ("intermediate_multiple_size", 0),
    ("max_position_embeddings", True),
    ("hidden_act", "tanh"),
    ("rotary_pct", 1.5),
    ("rotary_pct", 0.125),  # head_size 8 * 0.125 = 1 rotary dim: odd, rotate-half impossible
    ("rotary_emb_base", 0),
    ("layer_norm_eps", -1e-5),
    ("attention_dropout", 1.0),
    ("hidden_dropout", -0.1),
    ("use_cache", "yes"),
    ("eos_token_id", -2),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}),
    ("rope_scaling", {"type": "linear"}),
])
def test_invalid_values_name_the_field(field, value):
    kwargs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        GPTNeoXJapaneseConfig(**kwargs)


def test_from_dict_rejects_other_models_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        GPTNeoXJapaneseConfig.from_dict({"model_type": "llama"})
    with pytest.raises(TypeError):
        GPTNeoXJapaneseConfig.from_dict([1, 2])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):  # a path: the hub is not asked
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path / "missing_dir_that_is_not_a_repo", local_files_only=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPTNeoXJapaneseConfig.from_pretrained(empty)


def test_config_import_stays_light():
    import subprocess
    import sys

    code = "import sys, neoxja.config; assert 'torch' not in sys.modules and 'huggingface_hub' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_copies_and_pickles():
    import copy
    import pickle

    config = GPTNeoXJapaneseConfig(hidden_size=32, num_attention_heads=4, extra={"note": 1})
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config and clone.note == 1


def test_a_typo_of_a_key_is_refused_with_the_nearest_key(tmp_path):
    # before: kept in `extra` and ignored, so the model silently got the default hidden_size
    (tmp_path / "config.json").write_text(json.dumps({"hiden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"config.json: .*unknown key 'hiden_size'; did you mean 'hidden_size'\?"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="did you mean 'num_hidden_layers'"):
        GPTNeoXJapaneseConfig.from_dict({"num_hiden_layers": 2})
    # transformers' own keys and keys unlike any of ours still load (hub files carry both)
    config = GPTNeoXJapaneseConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "float16",
                                              "id2label": {"0": "a"}, "num_beams": 1, "my_custom_key": 1})
    assert config.extra["torch_dtype"] == "float16" and config.my_custom_key == 1
    # the deviation (README table): transformers keeps the typo as an attribute and uses the default size
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPTNeoXJapaneseConfig.from_dict({"hiden_size": 64, "num_attention_heads": 4})
    assert ref.hiden_size == 64 and ref.hidden_size == transformers.GPTNeoXJapaneseConfig().hidden_size


def test_model_config_json_says_what_is_wrong(tmp_path):
    """`neoxja train --model-config`: a directory, a JSON list, or any unknown key is a clear error."""
    from neoxja.config import read_config_json
    from neoxja.train.loop import TrainError, _read_model_config

    (tmp_path / "run").mkdir()
    with pytest.raises(TrainError, match="is a directory: give a config.json file$"):
        _read_model_config(str(tmp_path / "run"))
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(TrainError, match=r"is a directory: give a config.json file \(.*run/config.json is one\)"):
        _read_model_config(str(tmp_path / "run"))
    (tmp_path / "list.json").write_text('[{"hidden_size": 64}]')
    with pytest.raises(TrainError, match="must hold one JSON object .*got a list"):
        _read_model_config(str(tmp_path / "list.json"))
    with pytest.raises(TrainError, match="inline JSON: unknown key 'layers'; did you mean 'num_hidden_layers'"):
        _read_model_config('{"hidden_size": 64, "layers": 2}')
    with pytest.raises(TrainError, match="unknown key 'xyzzy'; valid keys: .*hidden_size"):
        _read_model_config('{"xyzzy": 2}')
    assert _read_model_config('{"hidden_size": 64, "dtype": "float32"}') == {"hidden_size": 64, "dtype": "float32"}
    with pytest.raises(ValueError, match="is a directory"):
        GPTNeoXJapaneseConfig.from_json_file(tmp_path / "run")
    assert read_config_json(tmp_path / "run" / "config.json") == {}
