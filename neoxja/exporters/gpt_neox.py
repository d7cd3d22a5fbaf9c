"""GPT-NeoX-Japanese as a plain GPT-NeoX (`GPTNeoXForCausalLM`, model_type "gpt_neox").

The architectures are the same once these details are written out:
- the residual is sequential: `use_parallel_residual=False`;
- GPT-NeoX has a bias on every linear (`attention_bias=True`; its MLP always has them): they are zero,
  except the last layer's `attention.dense_bias`, which becomes that layer's `attention.dense.bias`
  (ours adds it right after the attention output, which is where a bias of `dense` lands);
- `intermediate_size = hidden_size * intermediate_multiple_size`;
- `embed_out.weight` is written explicitly (a copy of `embed_in` when the model is tied) and the config says
  `tie_word_embeddings=false`, so every engine finds its LM head whatever it does about tying.
The fused qkv weight keeps its per-head [q | k | v] row layout, which is GPT-NeoX's too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# our parameter name (without the "gpt_neox_japanese." prefix) -> GPT-NeoX's (without "gpt_neox.")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "post_attention_layernorm.bias": "post_attention_layernorm.bias",
    "attention.query_key_value.weight": "attention.query_key_value.weight",
    "attention.dense.weight": "attention.dense.weight",
    "mlp.dense_h_to_4h.weight": "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight": "mlp.dense_4h_to_h.weight",
}

README_STUB = """\
---
library_name: transformers
tags: [gpt-neox, japanese]
---
# {name}

Exported by neoxja {version} (`neoxja export --to gpt-neox`) from a GPT-NeoX-Japanese model: the same weights
as a plain `GPTNeoXForCausalLM` (sequential residual, zero biases except the last layer's attention output
bias), so transformers, vLLM and TGI load it as GPT-NeoX.

## Tokenizer

{tokenizer}

The engines' own copy of this tokenizer is transformers' `GPTNeoXJapaneseTokenizer`, which has known
defects (the comma in the vocabulary, the byte-fallback decode). For exact tokens, tokenize and detokenize
with neoxja and send the engine token ids, e.g. vLLM with `--skip-tokenizer-init` and `prompt_token_ids`, or
`neoxja.engines.complete(url, prompt)` against an OpenAI-compatible completions endpoint that accepts ids.
See docs/engines.md in the neoxja repository.
"""


def gpt_neox_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """GPT-NeoX parameter name -> tensor (CPU, contiguous, every tensor its own storage) for `model`
    (a float GPTNeoXJapaneseForCausalLM). dtype: the tensors' dtype (default: the model's)."""
    config = model.config
    dtype = dtype or model.dtype
    base = model.gpt_neox_japanese

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device="cpu", dtype=dtype).contiguous().clone()

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype)

    C, inter = config.hidden_size, config.intermediate_size
    state = {"gpt_neox.embed_in.weight": t(base.embed_in.weight)}
    for i, layer in enumerate(base.layers):
        ours = dict(layer.named_parameters())
        prefix = f"gpt_neox.layers.{i}."
        for src, dst in _LAYER_NAMES.items():
            state[prefix + dst] = t(ours[src])
        state[prefix + "attention.query_key_value.bias"] = zeros(3 * C)
        dense_bias = layer.attention.dense_bias
        state[prefix + "attention.dense.bias"] = t(dense_bias) if dense_bias is not None else zeros(C)
        state[prefix + "mlp.dense_h_to_4h.bias"] = zeros(inter)
        state[prefix + "mlp.dense_4h_to_h.bias"] = zeros(C)
    state["gpt_neox.final_layer_norm.weight"] = t(base.final_layer_norm.weight)
    state["gpt_neox.final_layer_norm.bias"] = t(base.final_layer_norm.bias)
    state["embed_out.weight"] = t(model.embed_out.weight)  # its own copy even when tied
    return state


def gpt_neox_config(config, dtype: torch.dtype) -> dict:
    """config.json of the export. transformers 4.x reads `rotary_pct` / `rotary_emb_base` / `rope_scaling`;
    transformers 5 reads `rope_parameters` (and defaults GPT-NeoX's partial_rotary_factor to 0.25 when it
    finds neither), so both spellings are written."""
    rope = {"rope_type": "default"} if config.rope_scaling is None else dict(config.rope_scaling)
    rope.update(rope_theta=float(config.rotary_emb_base), partial_rotary_factor=float(config.rotary_pct))
    dtype_name = str(dtype).replace("torch.", "")
    d = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "classifier_dropout": 0.1,
        "use_parallel_residual": False,
        "attention_bias": True,
        "tie_word_embeddings": False,
        # v4 spelling
        "rotary_pct": float(config.rotary_pct),
        "rotary_emb_base": float(config.rotary_emb_base),
        "rope_scaling": None,
        # v5 spelling
        "rope_parameters": rope,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if config.rope_scaling is not None:
        # v4 (>= 4.45) and v5 read rope_scaling; older v4 spell the type "type"
        d["rope_scaling"] = {**config.rope_scaling, "type": config.rope_scaling["rope_type"]}
    return d


def generation_config(config) -> dict:
    d = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        d["pad_token_id"] = config.pad_token_id
    return d


def write_gpt_neox(model, out: Path, tokenizer=None, force: bool = False, max_shard_size: int | str = "5GB") -> Path:
    from neoxja import __version__
    from neoxja.checkpoint import write_safetensors
    from neoxja.exporters import staged

    dtype = model.dtype
    with staged(out, force=force, directory=True) as tmp:
        write_safetensors(gpt_neox_state_dict(model, dtype), tmp, max_shard_size)
        _write_json(tmp / "config.json", gpt_neox_config(model.config, dtype))
        _write_json(tmp / "generation_config.json", generation_config(model.config))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            note = ("`vocab.txt`, `emoji.json`, `tokenizer_config.json` and `special_tokens_map.json` beside the "
                    "weights are the GPT-NeoX-Japanese tokenizer's files: load them with "
                    "`neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(DIR)` (exact) or transformers' "
                    "`AutoTokenizer` (which picks `GPTNeoXJapaneseTokenizer`). They are not a GPT-NeoX "
                    "(BPE) tokenizer.")
        else:
            note = ("This export carries no tokenizer files (none was given). Use the GPT-NeoX-Japanese tokenizer "
                    "the model was trained with (`neoxja.GPTNeoXJapaneseTokenizer`), never a GPT-NeoX BPE one.")
        (tmp / "README.md").write_text(README_STUB.format(name=out.name, version=__version__, tokenizer=note),
                                       encoding="utf-8")
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
