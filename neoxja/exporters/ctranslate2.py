"""CTranslate2 export, built with ctranslate2's spec API from our weights (no transformers at run time).

CTranslate2 4.8's own converter for GPT-NeoX reads `config.rotary_pct` and `model.embed_out` through
transformers and fails under transformers 5, so the decoder spec is filled here directly from the GPT-NeoX
state dict (`neoxja.exporters.gpt_neox`), the way its GPTNeoXLoader would: pre-norm, sequential residual,
rotary on the first `rotary_ndims` dims of each head, not interleaved, and the fused qkv rows regrouped from
per head [q | k | v] into [Q; K; V]. Zero biases are left out (CTranslate2's biases are optional); the last
layer's attention output bias is kept.

The vocabulary is one unique string per id (`neoxja.exporters.engine_vocabulary`), also written as
`neoxja_vocabulary.json`. `Generator.generate_batch` takes token strings: make them from neoxja's ids with
`neoxja.engines.ctranslate2_tokens`, and decode the result's `sequences_ids` with neoxja's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16")


def check_quantization(quantization: str | None) -> str:
    quantization = "float32" if quantization is None else quantization
    if quantization not in QUANTIZATIONS:
        from neoxja.exporters import ExportError

        raise ExportError(f"unknown ctranslate2 quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    return quantization


def build_spec(model, tokenizer=None):
    """The ctranslate2 TransformerDecoderModelSpec of `model` (float32 weights, not yet quantized)."""
    import torch
    from ctranslate2.specs import attention_spec, common_spec, transformer_spec

    from neoxja.exporters import ExportError, engine_vocabulary
    from neoxja.exporters.gpt_neox import gpt_neox_state_dict

    config = model.config
    activations = {"gelu": common_spec.Activation.GELU, "gelu_new": common_spec.Activation.GELUTanh,
                   "gelu_pytorch_tanh": common_spec.Activation.GELUTanh, "relu": common_spec.Activation.RELU,
                   "silu": common_spec.Activation.SWISH, "swish": common_spec.Activation.SWISH}
    scaling = {}
    if config.rope_scaling is not None:
        if config.rope_scaling["rope_type"] != "linear":
            raise ExportError(f"ctranslate2 export: rope_type {config.rope_scaling['rope_type']!r} is not supported")
        scaling = dict(rotary_scaling_type=attention_spec.RotaryScalingType.Linear,
                       rotary_scaling_factor=float(config.rope_scaling["factor"]))
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        config.num_hidden_layers,
        config.num_attention_heads,
        pre_norm=True,
        activation=activations[config.hidden_act],
        # ctranslate2 reads rotary_dim 0 as "every dim"; no rotary at all is None
        rotary_dim=config.rotary_ndims if config.rotary_ndims > 0 else None,
        rotary_interleave=False,
        rotary_base=float(config.rotary_emb_base),
        parallel_residual=False,
        shared_layer_norm=False,
        **scaling,
    )
    state = gpt_neox_state_dict(model, torch.float32)
    nh, C = config.num_attention_heads, config.hidden_size
    decoder = spec.decoder
    decoder.scale_embeddings = False
    decoder.embeddings.weight = state["gpt_neox.embed_in.weight"]
    decoder.layer_norm.gamma = state["gpt_neox.final_layer_norm.weight"]
    decoder.layer_norm.beta = state["gpt_neox.final_layer_norm.bias"]
    decoder.projection.weight = state["embed_out.weight"]
    for i, layer in enumerate(decoder.layer):
        p = f"gpt_neox.layers.{i}."
        layer.self_attention.layer_norm.gamma = state[p + "input_layernorm.weight"]
        layer.self_attention.layer_norm.beta = state[p + "input_layernorm.bias"]
        qkv = state[p + "attention.query_key_value.weight"]  # (3C, C), rows per head [q | k | v]
        qkv = qkv.view(nh, 3, C // nh, C).transpose(0, 1).reshape(3 * C, C)  # rows [Q; K; V]
        layer.self_attention.linear[0].weight = qkv.contiguous()
        layer.self_attention.linear[1].weight = state[p + "attention.dense.weight"]
        dense_bias = state[p + "attention.dense.bias"]
        if dense_bias.any():
            layer.self_attention.linear[1].bias = dense_bias
        layer.ffn.layer_norm.gamma = state[p + "post_attention_layernorm.weight"]
        layer.ffn.layer_norm.beta = state[p + "post_attention_layernorm.bias"]
        layer.ffn.linear_0.weight = state[p + "mlp.dense_h_to_4h.weight"]
        layer.ffn.linear_1.weight = state[p + "mlp.dense_4h_to_h.weight"]

    tokens = engine_vocabulary(tokenizer, config.vocab_size)
    spec.register_vocabulary(tokens)

    def token(token_id, fallback):
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else fallback

    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    unk = tokenizer.unk_token_id if tokenizer is not None else None
    spec.config.bos_token = token(config.bos_token_id, tokens[0])
    spec.config.eos_token = token(eos, tokens[0])
    spec.config.unk_token = token(unk, spec.config.eos_token)
    spec.config.layer_norm_epsilon = float(config.layer_norm_eps)
    return spec, tokens


def write_ctranslate2(model, out: Path, tokenizer=None, quantization: str = "float32", force: bool = False) -> Path:
    """Write a CTranslate2 model directory (model.bin, config.json, vocabulary.json) for ctranslate2.Generator."""
    from neoxja.exporters import staged

    try:
        import ctranslate2  # noqa: F401
    except ImportError as e:
        from neoxja.exporters import ExportError

        raise ExportError("the ctranslate2 export needs the ctranslate2 package: pip install 'neoxja[export]'") from e
    quantization = check_quantization(quantization)
    spec, tokens = build_spec(model, tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    with staged(out, force=force, directory=True) as tmp:
        spec.save(str(tmp))
        (tmp / "neoxja_vocabulary.json").write_text(json.dumps(tokens, ensure_ascii=False) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
    return out
