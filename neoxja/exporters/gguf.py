"""GGUF export for llama.cpp (arch `gptneox`), written with the `gguf` package.

Tensors and metadata follow llama.cpp's own GPT-NeoX converter (convert_hf_to_gguf.py): the fused qkv rows
regrouped from per-head [q | k | v] into [Q; K; V], every bias present (zero except the last layer's attention
output bias), `gptneox.use_parallel_residual = false`, the rope dimension count, rope base, context length and
layer-norm eps. 1-D tensors stay F32; 2-D ones get the chosen type, except that a row length the block size
does not divide falls back to F16 (as llama.cpp's converter does), and with q4_0 the output matrix is Q8_0
(llama.cpp's quantizer likewise keeps it at a higher precision).

Vocabulary: tokenizer model "llama" (so llama.cpp loads it and its detokenizer works), one unique string per
id, byte tokens as `<0xNN>` (type BYTE), the special tokens as CONTROL, ids without a token as UNUSED
placeholders. llama.cpp cannot reproduce this tokenizer: drive it with token ids made by neoxja
(`Llama.generate(ids)`, llama-server's `/completion` with `"prompt": [ids]`) and decode ids with neoxja.
Its detokenizer shows our tags (`<SP>`, `<BR>`, `<|emoji1|>`) literally.

llama.cpp's GELU is the tanh approximation (from an fp16 table), ours is exact (erf): logits differ slightly;
benchmarks/bench_engines.py measures by how much.
"""

from __future__ import annotations

import re
from pathlib import Path

TYPES = ("f32", "f16", "q8_0", "q4_0")
_BYTE = re.compile(r"<\|byte(\d+)\|>")


def check_type(type: str | None) -> str:
    type = "f32" if type is None else type
    if type not in TYPES:
        from neoxja.exporters import ExportError

        hint = (" (q4_k_m: quantize an f16/f32 file with llama.cpp's llama-quantize; the gguf package has no "
                "k-quant encoder)" if type and type.lower().startswith("q4_k") else "")
        raise ExportError(f"unknown gguf type {type!r}; expected one of {', '.join(TYPES)}{hint}")
    return type


def gguf_vocabulary(tokenizer, vocab_size: int, special_ids) -> tuple[list[str], list[int]]:
    """(tokens, token types) for llama.cpp: unique strings, `<0xNN>` bytes, CONTROL specials, UNUSED placeholders."""
    import gguf

    from neoxja.exporters import engine_vocabulary

    tokens = engine_vocabulary(tokenizer, vocab_size)
    types = []
    byte_seen = set()
    for i, word in enumerate(tokens):
        byte = _BYTE.fullmatch(word)
        if byte and int(byte.group(1)) < 256 and int(byte.group(1)) not in byte_seen:
            byte_seen.add(int(byte.group(1)))
            tokens[i] = f"<0x{int(byte.group(1)):02X}>"
            types.append(gguf.TokenType.BYTE)
        elif i in special_ids:
            types.append(gguf.TokenType.CONTROL)
        elif word.startswith("<|id:"):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def gguf_tensors(model):
    """(GGUF name, float32 numpy array) in llama.cpp's order and layout."""
    import torch

    from neoxja.exporters.gpt_neox import gpt_neox_state_dict

    config = model.config
    nh, C = config.num_attention_heads, config.hidden_size
    state = gpt_neox_state_dict(model, torch.float32)
    yield "token_embd.weight", state.pop("gpt_neox.embed_in.weight")
    for i in range(config.num_hidden_layers):
        p, b = f"gpt_neox.layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", state.pop(p + "input_layernorm.weight")
        yield b + "attn_norm.bias", state.pop(p + "input_layernorm.bias")
        qkv = state.pop(p + "attention.query_key_value.weight")  # (3C, C), per head [q | k | v]
        yield b + "attn_qkv.weight", qkv.view(nh, 3, C // nh, C).transpose(0, 1).reshape(3 * C, C)  # [Q; K; V]
        qkv_bias = state.pop(p + "attention.query_key_value.bias")
        yield b + "attn_qkv.bias", qkv_bias.view(nh, 3, C // nh).transpose(0, 1).reshape(3 * C)
        yield b + "attn_output.weight", state.pop(p + "attention.dense.weight")
        yield b + "attn_output.bias", state.pop(p + "attention.dense.bias")
        yield b + "ffn_norm.weight", state.pop(p + "post_attention_layernorm.weight")
        yield b + "ffn_norm.bias", state.pop(p + "post_attention_layernorm.bias")
        yield b + "ffn_up.weight", state.pop(p + "mlp.dense_h_to_4h.weight")
        yield b + "ffn_up.bias", state.pop(p + "mlp.dense_h_to_4h.bias")
        yield b + "ffn_down.weight", state.pop(p + "mlp.dense_4h_to_h.weight")
        yield b + "ffn_down.bias", state.pop(p + "mlp.dense_4h_to_h.bias")
    yield "output_norm.weight", state.pop("gpt_neox.final_layer_norm.weight")
    yield "output_norm.bias", state.pop("gpt_neox.final_layer_norm.bias")
    yield "output.weight", state.pop("embed_out.weight")
    assert not state, f"tensors left unexported: {sorted(state)}"


def write_gguf(model, out: Path, tokenizer=None, type: str = "f32", force: bool = False) -> Path:
    from neoxja.exporters import ExportError, staged

    try:
        import gguf
    except ImportError as e:
        raise ExportError("the gguf export needs the gguf package: pip install 'neoxja[export]'") from e
    import numpy as np

    type = check_type(type)
    config = model.config
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    if config.rope_scaling is not None and config.rope_scaling["rope_type"] != "linear":
        raise ExportError(f"gguf export: rope_type {config.rope_scaling['rope_type']!r} is not supported")

    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    special = {"bos": config.bos_token_id, "eos": eos,
               "unk": tokenizer.unk_token_id if tokenizer is not None else None,
               "pad": config.pad_token_id if config.pad_token_id is not None else (
                   tokenizer.pad_token_id if tokenizer is not None else None)}
    special = {k: v for k, v in special.items() if isinstance(v, int) and 0 <= v < config.vocab_size}
    tokens, token_types = gguf_vocabulary(tokenizer, config.vocab_size, set(special.values()))

    with staged(out, force=force, directory=False) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "gptneox")
        writer.add_name(out.stem)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(config.rotary_ndims)
        writer.add_rope_freq_base(float(config.rotary_emb_base))
        if config.rope_scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
        writer.add_head_count(config.num_attention_heads)
        writer.add_parallel_residual(False)
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
        writer.add_file_type(ftype)

        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types(token_types)
        for kind, token_id in special.items():
            {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
             "pad": writer.add_pad_token_id}[kind](token_id)
        writer.add_add_bos_token(False)  # neoxja's tokenizer decides the prompt's ids
        writer.add_add_eos_token(False)

        for name, tensor in gguf_tensors(model):
            data = tensor.numpy()
            want = qtype if data.ndim == 2 else Q.F32
            if want == Q.Q4_0 and name == "output.weight":
                want = Q.Q8_0
            if want in (Q.Q8_0, Q.Q4_0) and data.shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
                want = Q.F16  # the row length is not a multiple of the block size
            if want == Q.F32:
                writer.add_tensor(name, data.astype(np.float32))
            elif want == Q.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, want), raw_dtype=want)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
