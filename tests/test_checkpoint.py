"""Checkpoints in and out: round trips with transformers, .bin/.safetensors (sharded), tying, bad files, hub ids."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from neoxja.checkpoint import CheckpointError, parse_size  # noqa: E402
from neoxja.config import GPTNeoXJapaneseConfig  # noqa: E402
from neoxja.model import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseModel  # noqa: E402

ATOL = 2e-5
SMALL = dict(vocab_size=67, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, bos_token_id=0,
             eos_token_id=1)


def ours_model(tie: bool, seed: int = 0) -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**SMALL, rotary_pct=0.5, tie_word_embeddings=tie))
    with torch.no_grad():
        model.gpt_neox_japanese.layers[-1].attention.dense_bias.normal_()
        model.gpt_neox_japanese.final_layer_norm.bias.normal_()
    return model.eval()


def ref_model(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXJapaneseConfig(**SMALL, tie_word_embeddings=tie,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.5})
    model = transformers.GPTNeoXJapaneseForCausalLM(cfg)
    with torch.no_grad():
        model.gpt_neox_japanese.layers[-1].attention.dense_bias.normal_()
    return model.eval()


IDS = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_same_weights(ours, ref):
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for k in ours_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=0, rtol=0, msg=k)


# ---- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("max_shard_size", ["5GB", 4000])
def test_ours_to_transformers(tmp_path, tie, max_shard_size):
    ours = ours_model(tie)
    ours.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    files = sorted(p.name for p in tmp_path.iterdir())
    if max_shard_size == 4000:
        assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
        assert "model.safetensors" not in files
    else:
        assert files == ["config.json", "model.safetensors"]
        stored = load_file(tmp_path / "model.safetensors")
        assert ("embed_out.weight" in stored) == (not tie)  # a tied weight is stored once, as transformers does
    ref = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.tie_word_embeddings == tie
    assert_same_weights(ours, ref)
    torch.testing.assert_close(logits(ours), logits(ref), atol=ATOL, rtol=0)

    again = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(again, ours)
    assert (again.embed_out.weight is again.gpt_neox_japanese.embed_in.weight) == tie


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_to_ours(tmp_path, tie, sharded):
    ref = ref_model(tie)
    ref.save_pretrained(tmp_path, max_shard_size="3KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert not ours.training
    assert ours.config.tie_word_embeddings == tie
    assert_same_weights(ours, ref)
    torch.testing.assert_close(logits(ours), logits(ref), atol=ATOL, rtol=0)


def write_bin(directory: Path, state: dict, config: dict, shards: int = 1):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_single_and_sharded_with_old_buffers(tmp_path, shards):
    ref = ref_model(tie=False)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    # buffers that checkpoints written by older transformers carry; ignored on load
    for i in range(SMALL["num_hidden_layers"]):
        state[f"gpt_neox_japanese.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        state[f"gpt_neox_japanese.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox_japanese.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    write_bin(tmp_path, state, ref.config.to_dict(), shards=shards)
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(ours, ref)
    torch.testing.assert_close(logits(ours), logits(ref), atol=ATOL, rtol=0)


def test_dtype_argument_and_auto_dtype(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, "float16"):
        half = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        want = dtype if isinstance(dtype, torch.dtype) else torch.float16
        assert all(p.dtype == want for p in half.parameters())
        torch.testing.assert_close(half.embed_out.weight, ours.embed_out.weight.to(want), atol=0, rtol=0)
    half.save_pretrained(tmp_path / "half")
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "half").dtype == torch.float16  # "auto"
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "half", dtype="float32").dtype == torch.float32
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="not both"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.float16)


def test_base_model_and_causal_lm_checkpoints_interchange(tmp_path):
    ours = ours_model(tie=True)
    ours.save_pretrained(tmp_path / "lm")
    base = GPTNeoXJapaneseModel.from_pretrained(tmp_path / "lm")  # drops the prefix and the head
    with torch.no_grad():
        torch.testing.assert_close(base(IDS).last_hidden_state, ours.gpt_neox_japanese(IDS).last_hidden_state,
                                   atol=0, rtol=0)
    base.save_pretrained(tmp_path / "base")
    assert not any(k.startswith("gpt_neox_japanese.") for k in load_file(tmp_path / "base" / "model.safetensors"))
    lm = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "base")  # tied head from embed_in
    torch.testing.assert_close(logits(lm), logits(ours), atol=0, rtol=0)


def test_save_replaces_an_earlier_sharded_save(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path, max_shard_size=3000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    for bad in ("five", 0, -3, "0KB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            ours.save_pretrained(tmp_path, max_shard_size=bad)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="directory"):
        ours.save_pretrained(tmp_path / "afile")


def test_save_deletes_only_its_own_weight_files(tmp_path):
    """An earlier save's shards and index go; a user's files that merely start with "model" stay (as in
    transformers, which removes only model-NNNNN-of-NNNNN shards)."""
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path, max_shard_size=3000)
    mine = ["model-best.safetensors", "model.safetensors.bak", "model_fp16.safetensors", "modelcard.txt"]
    for name in mine:
        (tmp_path / name).write_text("keep me")
    (tmp_path / "model.safetensors.tmp").write_text("left by an interrupted save")
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", "model.safetensors", *mine])
    assert all((tmp_path / name).read_text() == "keep me" for name in mine)


def test_a_quantized_model_is_not_saved_and_the_directory_is_untouched(tmp_path):
    from neoxja.quantization import quantize

    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="quantized"):
        quantize(GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path), "int8").save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---- tied embeddings, as transformers 5 does them ----------------------------------------------------------


def test_tied_config_with_different_embed_out_keeps_both_like_transformers(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("tie_word_embeddings")  # transformers' default then ties, as for abeja/gpt-neox-japanese-2.7b
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="different values"):
        loaded = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert loaded.embed_out.weight is not loaded.gpt_neox_japanese.embed_in.weight
    assert loaded.config.tie_word_embeddings is False
    ref = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_weights(loaded, ref)
    torch.testing.assert_close(logits(loaded), logits(ref), atol=ATOL, rtol=0)


def test_tied_config_with_equal_or_only_one_embedding(tmp_path):
    ref = ref_model(tie=True)
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # holds both names, equal values
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    save_file(state, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert both.embed_out.weight is both.gpt_neox_japanese.embed_in.weight
    torch.testing.assert_close(logits(both), logits(ref), atol=ATOL, rtol=0)

    # only embed_out: transformers ties the other way round, so do we
    del state["gpt_neox_japanese.embed_in.weight"]
    save_file(state, tmp_path / "model.safetensors")
    only_out = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    ref_only_out = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()
    assert only_out.embed_out.weight is only_out.gpt_neox_japanese.embed_in.weight
    torch.testing.assert_close(logits(only_out), logits(ref_only_out), atol=ATOL, rtol=0)

    del state["embed_out.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: gpt_neox_japanese.embed_in.weight"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


def test_untied_config_requires_embed_out(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["embed_out.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: embed_out\.weight"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


# ---- bad checkpoints ---------------------------------------------------------------------------------------


def test_unexpected_missing_and_mismatched_keys_are_named(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["gpt_neox_japanese.layers.0.attention.surprise"] = torch.zeros(3)
    del state["gpt_neox_japanese.layers.1.mlp.dense_4h_to_h.weight"]
    state["gpt_neox_japanese.final_layer_norm.weight"] = torch.ones(25)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing keys: gpt_neox_japanese.layers.1.mlp.dense_4h_to_h.weight" in message
    assert "unexpected keys: gpt_neox_japanese.layers.0.attention.surprise (in model.safetensors)" in message
    assert "gpt_neox_japanese.final_layer_norm.weight: checkpoint [25] vs model [24]" in message


def test_checkpoint_for_another_config_is_refused(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path)
    other = GPTNeoXJapaneseConfig(**{**SMALL, "num_hidden_layers": 3}, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="missing keys: gpt_neox_japanese.layers.2"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, config=other)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_truncated_or_corrupt_file_is_named(tmp_path, kind):
    ref = ref_model(tie=False)
    if kind == "safetensors":
        ref.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    else:
        write_bin(tmp_path, ref.state_dict(), ref.config.to_dict())
        path = tmp_path / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path.name)):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=str(path.name)):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    path.write_bytes(b"hello")  # the unpickler meets a memo it never stored (KeyError inside torch.load)
    with pytest.raises(CheckpointError, match=str(path.name)):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_integer_tensors_for_float_weights_are_named(tmp_path, kind):
    ours = ours_model(tie=False)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["embed_out.weight"] = state["embed_out.weight"].to(torch.int64)
    if kind == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
        ours.config.save_pretrained(tmp_path)
    else:
        write_bin(tmp_path, state, ours.config.to_dict())
    with pytest.raises(CheckpointError, match=r"embed_out\.weight: checkpoint dtype int64"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


def test_broken_index_and_missing_shard(tmp_path):
    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path, max_shard_size=3000)
    index = tmp_path / "model.safetensors.index.json"
    first_shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first_shard.unlink()
    with pytest.raises(FileNotFoundError, match=first_shard.name):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    index.write_text(json.dumps({"weight_map": {"embed_out.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="invalid shard"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    index.write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    index.write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="names no shard"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    index.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=index.name):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path)  # one file again, and the index gone
    (tmp_path / "config.json").write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match="config.json"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


class _Exploit:
    """Unpickling this would run code (create a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ref = ref_model(tie=False)
    state = dict(ref.state_dict())
    state["gpt_neox_japanese.embed_in.weight"] = _Exploit(marker)
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        torch.save(state, f)
    with pytest.raises(CheckpointError, match=r"refused to load .*pytorch_model\.bin"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()
    # a plain (non-torch) pickle that carries code: refused too
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()
    # a well-formed pickle of something that is not a state dict
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


def test_directory_without_weights_or_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPTNeoXJapaneseConfig(**SMALL).to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights in directory"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


# ---- hub ids (no network here: a local cache and a mocked resolver) ---------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Lay out `source`'s files as huggingface_hub's cache holds a downloaded snapshot."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / revision).write_text(COMMIT)
    return snapshot


def test_hub_id_from_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path / "src", max_shard_size=4000)
    make_hub_cache(tmp_path / "cache", "someone/tiny-neox-ja", tmp_path / "src", revision="v1")
    kwargs = dict(cache_dir=tmp_path / "cache", local_files_only=True)
    loaded = GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja", revision="v1", **kwargs)
    assert_same_weights(loaded, ours)
    by_commit = GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja", revision=COMMIT, **kwargs)
    assert_same_weights(by_commit, ours)
    cfg = GPTNeoXJapaneseConfig.from_pretrained("someone/tiny-neox-ja", revision="v1", **kwargs)
    assert cfg.extra == {"dtype": "float32"}  # save_pretrained records the weights' dtype, as transformers does
    cfg.extra.clear()
    assert cfg == ours.config

    # not cached while offline: a clear error
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        GPTNeoXJapaneseForCausalLM.from_pretrained("someone/other-model", **kwargs)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja", revision="main", **kwargs)
    # HF_HUB_OFFLINE honoured without local_files_only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        GPTNeoXJapaneseForCausalLM.from_pretrained("someone/other-model", cache_dir=tmp_path / "cache")
    loaded = GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja", revision="v1",
                                                        cache_dir=tmp_path / "cache")
    assert_same_weights(loaded, ours)


def test_hub_id_resolution_passes_revision_and_cache(tmp_path, monkeypatch):
    """A mocked resolver stands in for the hub: it serves a .bin-only repo and records what was asked."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    ref = ref_model(tie=False)
    repo = tmp_path / "repo"
    write_bin(repo, ref.state_dict(), ref.config.to_dict(), shards=2)
    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, local_files_only=False, **kw):
        calls.append((repo_id, filename, revision, cache_dir, local_files_only))
        if not (repo / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("neoxja.hub.hub_reachable", lambda timeout=None: True)  # the hub answers
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained("org/bin-only", revision="abc", cache_dir="/somewhere")
    assert_same_weights(ours, ref)
    asked = [c[1] for c in calls]
    assert asked[:5] == ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                         "pytorch_model.bin.index.json"]
    assert sorted(asked[5:]) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert all(c[0] == "org/bin-only" and c[2] == "abc" and c[3] == "/somewhere" and c[4] is False for c in calls)


def test_save_keeps_a_head_that_was_untied_by_hand(tmp_path):
    ours = ours_model(tie=True)
    ours.embed_out.weight = torch.nn.Parameter(torch.randn_like(ours.embed_out.weight))
    ours.save_pretrained(tmp_path)
    assert "embed_out.weight" in load_file(tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="different values"):
        loaded = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(ours), atol=0, rtol=0)


def test_loading_builds_on_meta_and_reads_each_tensor_once(tmp_path, monkeypatch):
    from neoxja import checkpoint

    ours = ours_model(tie=False)
    ours.save_pretrained(tmp_path, max_shard_size=4000)

    def no_random_init(*args, **kwargs):
        raise AssertionError("from_pretrained must not initialise weights it is about to load")

    reads = []
    real_tensor = checkpoint._SafetensorsFile.tensor
    monkeypatch.setattr(torch.nn.init, "normal_", no_random_init)
    monkeypatch.setattr(checkpoint._SafetensorsFile, "tensor",
                        lambda self, key: (reads.append(key), real_tensor(self, key))[1])
    loaded = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert sorted(reads) == sorted(ours.state_dict())  # every tensor read exactly once
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in loaded.parameters())
    assert not loaded.gpt_neox_japanese.rotary_emb.inv_freq.is_meta


# ---- one resolver for model names (neoxja.hub.resolve_model_path) -----------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """The hub must not be asked: any download or probe fails the test."""
    import huggingface_hub

    def forbidden(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setattr("neoxja.hub.hub_reachable", forbidden)


def test_local_names_are_local_and_missing_paths_fail_at_once(tmp_path, monkeypatch, no_hub, bundled_dir):
    from neoxja.hub import ModelNotFoundError, resolve_model_path
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    monkeypatch.chdir(tmp_path)
    ours = ours_model(tie=True)
    ours.save_pretrained(tmp_path / "runs" / "final")
    assert_same_weights(GPTNeoXJapaneseForCausalLM.from_pretrained("runs/final"), ours)  # relative: local
    assert resolve_model_path("runs/final") == Path("runs/final")
    (tmp_path / "some-file").write_text("")
    for name in ("runs/fnal", "./nope", "/nonexistent/model", "~/neoxja-no-such-model", "a/b/c", "runs\\final"):
        for load in (GPTNeoXJapaneseForCausalLM.from_pretrained, GPTNeoXJapaneseConfig.from_pretrained,
                     GPTNeoXJapaneseTokenizer.from_pretrained):
            with pytest.raises(ModelNotFoundError, match="no such directory") as err:
                load(name)
            assert "hub" not in str(err.value)
    with pytest.raises(ModelNotFoundError, match="some-file is a file; a model is a directory"):
        GPTNeoXJapaneseForCausalLM.from_pretrained("some-file")
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor a valid hub id"):
        resolve_model_path("bad id with spaces")


def test_hub_id_with_the_hub_unreachable(tmp_path, monkeypatch, bundled_dir):
    """Not cached: says so without waiting for retries; cached: loads from the cache, asking nothing online."""
    import huggingface_hub

    from neoxja.hub import ModelNotFoundError
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    monkeypatch.setattr("neoxja.hub.hub_reachable", lambda timeout=None: False)
    real_download, calls = huggingface_hub.hf_hub_download, []

    def recording_download(*args, **kwargs):
        calls.append(kwargs["local_files_only"])
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    cache = tmp_path / "cache"
    cache.mkdir()
    for load in (GPTNeoXJapaneseForCausalLM.from_pretrained, GPTNeoXJapaneseTokenizer.from_pretrained,
                 GPTNeoXJapaneseConfig.from_pretrained):
        with pytest.raises(ModelNotFoundError) as err:
            load("someone/not-cached", cache_dir=cache)
        message = str(err.value)
        assert "not in the local cache and the hub is unreachable (offline?)" in message
        assert "has no file" not in message and "not found in the hub" not in message
    assert calls and all(calls)  # local_files_only=True: only the cache was looked at

    make_hub_cache(cache, "someone/aozora-small", bundled_dir)
    calls.clear()
    model = GPTNeoXJapaneseForCausalLM.from_pretrained("someone/aozora-small", cache_dir=cache)
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained("someone/aozora-small", cache_dir=cache)
    assert model.config.vocab_size >= len(tokenizer) and calls and all(calls)


def test_every_command_uses_the_resolver(tmp_path, monkeypatch, no_hub, capsys, bundled_dir):
    from neoxja.generate_cli import main as generate
    from neoxja.train.cli import main as train
    from neoxja.train.prepare import main as prepare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "c.txt").write_text("吾輩は猫である。", encoding="utf-8")
    assert generate(["--model", "runs/fnal", "--max-new-tokens", "1", "x"]) != 0
    assert "runs/fnal: no such directory" in capsys.readouterr().err
    assert prepare(["--tokenizer", "runs/fnal", "--out", "d", "c.txt"]) == 2
    assert "runs/fnal: no such directory" in capsys.readouterr().err
    assert prepare(["--tokenizer", str(bundled_dir), "--out", "d", "--num-proc", "1", "c.txt"]) == 0
    capsys.readouterr()
    assert train(["--data", "d", "--out", "o", "--init-from", "runs/fnal", "--steps", "1", "--batch-size", "1",
                  "--seq-len", "4"]) == 2
    assert "runs/fnal: no such directory" in capsys.readouterr().err


def test_the_hub_probe_is_bounded_and_remembered(monkeypatch):
    import threading

    import huggingface_hub

    from neoxja import hub

    release = threading.Event()
    asked = []

    class Hanging:
        def head(self, url, timeout):
            asked.append(url)
            release.wait(30)  # a DNS lookup or connection that never answers

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Hanging())
    monkeypatch.setattr(hub, "_probes", {})
    try:
        assert hub.hub_reachable(timeout=0.05) is False
        assert hub.hub_reachable(timeout=0.05) is False
        assert len(asked) == 1  # remembered: one probe per command, not one per file
    finally:
        release.set()

    class Answering:
        def head(self, url, timeout):
            return object()

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Answering())
    monkeypatch.setattr(hub, "_probes", {})
    assert hub.hub_reachable(timeout=1.0) is True
