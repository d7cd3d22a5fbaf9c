"""GPT-NeoX-Japanese in plain PyTorch, with the parameter names of transformers' implementation.

One block:  x = x + attn(ln1(x)) [+ dense_bias, last layer only];  x = x + mlp(ln2(x))
Attention uses a fused qkv projection laid out per head as [q | k | v], rotary embeddings (rotate-half) on the
first `rotary_ndims` dims of each head, and F.scaled_dot_product_attention. An explicit path that materialises
the attention probabilities serves `output_attentions` and `head_mask`.
Half precision: LayerNorm statistics, rotary products and softmax run in float32.

Two ways in:
- `forward` (transformers' signature): training, scoring, and incremental decoding with `past_key_values`
  (a tuple of per-layer (key, value) tensors of shape (B, nh, T_past, hs)).
- `forward_cached` (gpt-fast style, for generation and serving): static per-layer KVCache buffers; each cache row
  is a slot holding one sequence from position 0, written and read at per-row positions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.generation import GenerationMixin
from neoxja.kv_cache import KVCache

# ----------------------------------------------------------------------------------------------------------
# outputs


class ModelOutput:
    """Fields by name (`out.logits`, `out["logits"]`) or, like a tuple of the fields that are set, by index."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# ----------------------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose statistics are computed in float32 (float16 would overflow the variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for the rotary dims of given position ids (float32); `forward(torch.arange(n))` is the table
    of positions 0..n-1 that the cached path gathers from."""

    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: GPTNeoXJapaneseConfig) -> torch.Tensor:
        dim = config.rotary_ndims
        # always on the CPU in float32, as transformers does, so every device gets the same frequencies
        inv_freq = 1.0 / (float(config.rotary_emb_base)
                          ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))  # (rd/2,)
        if config.rope_scaling is not None and config.rope_scaling["rope_type"] == "linear":
            inv_freq = inv_freq / config.rope_scaling["factor"]  # positions divided by factor
        return inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rd dims of each head of x (B, nh, T, ..., hs); cos/sin are (B, T, ..., rd)."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, ..., rd)
    x_rot, x_pass = x[..., :rd].float(), x[..., rd:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    if rd == x.shape[-1]:  # every dim rotates (rotary_pct 1.0): nothing to pass through
        return x_rot.to(x.dtype)
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


class GPTNeoXJapaneseAttention(nn.Module):
    def __init__(self, config: GPTNeoXJapaneseConfig, use_bias: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.attention_dropout = config.attention_dropout
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # the last layer adds a bias after the attention output (applied by the layer)
        self.dense_bias = nn.Parameter(torch.zeros(config.hidden_size)) if use_bias else None
        self.kv_cache: KVCache | None = None  # set by setup_caches, used by forward_cached

    def forward(self, x, cos, sin, mask=None, is_causal=False, layer_past=None, input_pos=None, first_row=0,
                kv_length=None, head_mask=None, output_attentions=False, segments=None):
        B, T, C = x.size()
        nh, hs = self.num_heads, self.head_size

        qkv = self.query_key_value(x)  # (B, T, 3C)
        qkv = qkv.view(B, T, nh, 3, hs).transpose(1, 2)  # (B, nh, T, 3, hs): per head [q | k | v]
        qk = apply_rotary(qkv[..., :2, :], cos.unsqueeze(-2), sin.unsqueeze(-2))  # (B, nh, T, 2, hs): q, k at once
        q, k = qk.unbind(-2)  # each (B, nh, T, hs)
        v = qkv[..., 2, :]  # (B, nh, T, hs)

        scale = 1.0 / math.sqrt(hs)
        if segments is not None:  # several sequences side by side in one row (1, N): each its own cache slot
            ys = []
            for slot, start, end, seg_kv_length, seg_mask in segments:  # tokens [start, end) go to `slot`
                k_seg, v_seg = self.kv_cache.update(input_pos[:, start:end], k[:, :, start:end], v[:, :, start:end],
                                                    slot, seg_kv_length)  # (1, nh, seg_kv_length, hs)
                ys.append(_cached_attention(q[:, :, start:end], k_seg, v_seg, seg_mask, scale))  # (1, nh, T_i, hs)
            y = torch.cat(ys, dim=2).transpose(1, 2).reshape(B, T, C)  # (1, N, C)
            return self.dense(y), None, None
        if input_pos is not None:  # static cache: write rows [first_row, first_row + B) at input_pos (B, T)
            k, v = self.kv_cache.update(input_pos, k, v, first_row, kv_length)  # (B, nh, kv_length, hs)
        elif layer_past is not None:  # dynamic cache: append to the past keys/values
            k = torch.cat((layer_past[0], k), dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat((layer_past[1], v), dim=2)
        present = (k, v)

        dropout_p = self.attention_dropout if self.training else 0.0
        weights = None
        if input_pos is not None:  # the cached path: explicit products, the same bits whatever the cache size
            y = _cached_attention(q, k, v, mask, scale)  # (B, nh, T, hs)
        elif output_attentions or head_mask is not None:
            att = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, S)
            if mask is None and is_causal:
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = F.dropout(att, p=dropout_p, training=self.training)
            if head_mask is not None:
                att = att * head_mask  # (1, nh, 1, 1): switches heads off
            weights = att.to(q.dtype)
            y = att.to(v.dtype) @ v  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=is_causal, scale=scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dense(y), present, weights


class GPTNeoXJapaneseMLP(nn.Module):
    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.hidden_act = config.hidden_act

    def forward(self, x):
        h = self.dense_h_to_4h(x)  # (B, T, 4C)
        if self.hidden_act == "gelu":
            h = F.gelu(h)  # exact (erf) GELU
        elif self.hidden_act in ("gelu_new", "gelu_pytorch_tanh"):
            h = F.gelu(h, approximate="tanh")
        elif self.hidden_act == "relu":
            h = F.relu(h)
        else:  # "silu", "swish"
            h = F.silu(h)
        return self.dense_4h_to_h(h)  # (B, T, C)


class GPTNeoXJapaneseLayer(nn.Module):
    def __init__(self, config: GPTNeoXJapaneseConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXJapaneseAttention(config, use_bias=layer_number == config.num_hidden_layers - 1)
        self.mlp = GPTNeoXJapaneseMLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, cos, sin, mask=None, is_causal=False, **attention_kwargs):
        attn_out, present, weights = self.attention(self.input_layernorm(x), cos, sin, mask, is_causal,
                                                    **attention_kwargs)
        if self.attention.dense_bias is not None:
            attn_out = attn_out + self.attention.dense_bias
        x = x + F.dropout(attn_out, p=self.hidden_dropout, training=self.training)
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        x = x + F.dropout(mlp_out, p=self.hidden_dropout, training=self.training)
        return x, present, weights


# ----------------------------------------------------------------------------------------------------------
# models


class GPTNeoXJapanesePreTrainedModel(nn.Module):
    """Weight init, checkpoint in/out and small conveniences shared by both models."""

    config_class = GPTNeoXJapaneseConfig
    base_model_prefix = "gpt_neox_japanese"

    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__()
        if not isinstance(config, GPTNeoXJapaneseConfig):
            raise TypeError(f"config must be a GPTNeoXJapaneseConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self, root: nn.Module | None = None):
        """transformers' initialisation of `root` (default: the whole model): N(0, initializer_range) for linears
        and embeddings, LayerNorm 1 and 0, dense_bias 0."""
        root = self if root is None else root
        std = self.config.initializer_range
        if next(root.parameters()).is_meta:
            return  # built to be loaded into: nothing to initialise (and meta init would import half of torch)
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, GPTNeoXJapaneseAttention) and module.dense_bias is not None:
                nn.init.zeros_(module.dense_bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        # parameters() yields a tied weight once
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, revision: str | None = None,
                        local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                        config: GPTNeoXJapaneseConfig | None = None, torch_dtype: torch.dtype | str | None = None):
        """Load a Hugging Face checkpoint (directory or hub id); see neoxja.checkpoint.load_pretrained.

        dtype None or "auto" keeps the dtype recorded in config.json (else the weights'), as transformers 5 does;
        `torch_dtype` is accepted as the older spelling of `dtype`.
        """
        from neoxja.checkpoint import load_pretrained

        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("pass dtype or torch_dtype, not both")
            dtype = torch_dtype

        return load_pretrained(cls, pretrained_model_name_or_path, dtype=dtype, device=device, revision=revision,
                               local_files_only=local_files_only, cache_dir=cache_dir, config=config)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True):
        """Write config.json and safetensors weights (sharded above max_shard_size) in the HF layout."""
        from neoxja.checkpoint import save_pretrained

        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only (safe_serialization=False is not supported)")
        return save_pretrained(self, save_directory, max_shard_size=max_shard_size)


class GPTNeoXJapaneseModel(GPTNeoXJapanesePreTrainedModel):
    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__(config)
        # _weight skips nn.Embedding's own init: init_weights does it, and on the meta device normal_ is slow
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size,
                                     _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(GPTNeoXJapaneseLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # fixed while the caches live, built by setup_caches (see forward_cached)
        self.key_positions: torch.Tensor | None = None  # (T_max,) 0..T_max-1, the positions keys are read from
        self.rotary_cos: torch.Tensor | None = None  # (P, rd) for positions 0..P-1
        self.rotary_sin: torch.Tensor | None = None
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_in

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_in = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                past_key_values=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_token_ids(input_ids, cfg.vocab_size, "input_ids")
            x = self.embed_in(input_ids.long())  # (B, T, C); any integer dtype is accepted
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != cfg.hidden_size:
                raise ValueError(f"inputs_embeds must be (batch, seq, {cfg.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            x = inputs_embeds
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("the input sequence is empty")

        past_length = _past_length(past_key_values, cfg.num_hidden_layers)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + T, device=x.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)  # (1, T): the same positions for every row
        if position_ids.dim() != 2 or position_ids.shape[-1] != T:
            raise ValueError(f"position_ids must be (batch, {T}) or ({T},), got shape {tuple(position_ids.shape)}")
        cos, sin = self.rotary_emb(position_ids)  # (B|1, T, rd) each
        mask, is_causal = _attention_mask(attention_mask, B, past_length, T, x.device)
        head_masks = _head_mask(head_mask, cfg.num_hidden_layers, cfg.num_attention_heads, x.device)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        presents = () if use_cache else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (x,)
            x, present, weights = layer(x, cos, sin, mask, is_causal,
                                        layer_past=past_key_values[i] if past_key_values is not None else None,
                                        head_mask=head_masks[i], output_attentions=output_attentions)
            if use_cache:
                presents += (present,)
            if output_attentions:
                all_attentions += (weights,)
        x = self.final_layer_norm(x)
        if output_hidden_states:
            all_hidden_states += (x,)

        out = BaseModelOutputWithPast(x, presents, all_hidden_states, all_attentions)
        return out if return_dict else out.to_tuple()

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype, device):
        """Per layer a KVCache; plus what every step shares: the key positions 0..T_max-1 (the mask is built
        from them) and the rotary cos/sin table (positions 0..max(max_position_embeddings, T_max)-1)."""
        cfg = self.config
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, cfg.num_attention_heads,
                                               cfg.head_size, dtype=dtype, device=device)
        self.key_positions = torch.arange(max_seq_length, device=device)
        positions = torch.arange(max(cfg.max_position_embeddings, max_seq_length), device=device)
        self.rotary_cos, self.rotary_sin = self.rotary_emb(positions)  # (P, rd) each, float32

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.key_positions = self.rotary_cos = self.rotary_sin = None

    def forward_cached(self, input_ids, input_pos, first_row=0, kv_length=None):
        """Final hidden states (B, T, C) through the static caches; see GPTNeoXJapaneseForCausalLM.forward_cached."""
        cache = self.layers[0].attention.kv_cache
        if cache is None:
            raise RuntimeError("no KV caches: call setup_caches(max_batch_size, max_seq_length) first")
        B, T = input_ids.shape
        T_max = cache.max_seq_length
        if input_pos.shape != (B, T):
            raise ValueError(f"forward_cached: input_ids {tuple(input_ids.shape)} needs input_pos ({B}, {T}), "
                             f"got {tuple(input_pos.shape)}")
        if not isinstance(first_row, int) or isinstance(first_row, bool) or first_row < 0 \
                or first_row + B > cache.max_batch_size:
            raise ValueError(f"forward_cached: rows [first_row={first_row!r}, +{B}) exceed the caches' "
                             f"max_batch_size {cache.max_batch_size}")
        if kv_length is None:
            kv_length = T_max  # the whole cache, masked: one static shape for every step
        if not isinstance(kv_length, int) or isinstance(kv_length, bool) or not 0 < kv_length <= T_max:
            raise ValueError(f"forward_cached: kv_length must be an int in [1, {T_max}], got {kv_length!r}")

        mask = self._cache_mask(input_pos, kv_length)  # (B, 1, T, kv_length), shared by every layer
        cos, sin = self.rotary_cos[input_pos], self.rotary_sin[input_pos]  # (B, T, rd): rotary = cache position
        x = self.embed_in(input_ids)  # (B, T, C)
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, mask, False, input_pos=input_pos, first_row=first_row, kv_length=kv_length)
        return self.final_layer_norm(x)  # (B, T, C)

    def _cache_mask(self, input_pos: torch.Tensor, kv_length: int) -> torch.Tensor:
        """A query at position p reads keys 0..p of its own row (what its sequence wrote, itself included): as
        an additive mask (B, 1, T, kv_length), 0 or -inf, for queries at input_pos (B, T)."""
        allowed = self.key_positions[:kv_length] <= input_pos.unsqueeze(-1)  # (B, T, kv_length)
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf")).unsqueeze(1)

    def forward_segments(self, input_ids, input_pos, segments):
        """Final hidden states (1, N, C) of several sequences' tokens laid side by side in one row: segment
        (slot, start, end, kv_length) holds tokens [start, end) of input_ids (1, N), written to cache row
        `slot` at input_pos[0, start:end] and attending over that row's first kv_length positions, exactly as
        forward_cached(input_ids[:, start:end], input_pos[:, start:end], slot, kv_length) would; the weight
        products take all N tokens at once."""
        cache = self.layers[0].attention.kv_cache
        if cache is None:
            raise RuntimeError("no KV caches: call setup_caches(max_batch_size, max_seq_length) first")
        N = input_ids.shape[1]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_pos.shape != input_ids.shape:
            raise ValueError(f"forward_segments: input_ids and input_pos must both be (1, N), got "
                             f"{tuple(input_ids.shape)} and {tuple(input_pos.shape)}")
        covered, layered = 0, []
        for slot, start, end, kv_length in segments:
            if start != covered or end <= start or not 0 <= slot < cache.max_batch_size \
                    or not 0 < kv_length <= cache.max_seq_length:
                raise ValueError(f"forward_segments: segment {(slot, start, end, kv_length)} must continue at "
                                 f"token {covered}, be non-empty, name a slot < {cache.max_batch_size} and a "
                                 f"kv_length in [1, {cache.max_seq_length}]")
            covered = end
            layered.append((slot, start, end, kv_length, self._cache_mask(input_pos[:, start:end], kv_length)))
        if covered != N:
            raise ValueError(f"forward_segments: the segments cover {covered} of the {N} tokens")
        cos, sin = self.rotary_cos[input_pos], self.rotary_sin[input_pos]  # (1, N, rd)
        x = self.embed_in(input_ids)  # (1, N, C)
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, None, False, input_pos=input_pos, segments=layered)
        return self.final_layer_norm(x)  # (1, N, C)


class GPTNeoXJapaneseForCausalLM(GPTNeoXJapanesePreTrainedModel, GenerationMixin):
    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__(config)
        self.gpt_neox_japanese = GPTNeoXJapaneseModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights(self.embed_out)
        self.tie_weights()

    def tie_weights(self):
        """With config.tie_word_embeddings (transformers' default), embed_out shares embed_in's weight."""
        if self.config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox_japanese.embed_in.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gpt_neox_japanese.embed_in

    def get_output_embeddings(self) -> nn.Linear:
        return self.embed_out

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.embed_out = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, logits_to_keep: int = 0):
        """`logits_to_keep=n > 0` applies the LM head to the last n positions only (0: all)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.gpt_neox_japanese(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     head_mask=head_mask, inputs_embeds=inputs_embeds,
                                     past_key_values=past_key_values, use_cache=use_cache,
                                     output_attentions=output_attentions,
                                     output_hidden_states=output_hidden_states, return_dict=True)
        x = out.last_hidden_state  # (B, T, C)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.embed_out(x)  # (B, T, V)

        loss = None
        if labels is not None:
            if labels.shape != x.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(x.shape[:2])}, got {tuple(labels.shape)}")
            _check_token_ids(labels, self.config.vocab_size, "labels", allow=-100)
            # token t predicts label t+1; -100 is ignored
            shift_logits = logits[:, :-1].float()  # (B, T-1, V)
            shift_labels = labels[:, 1:].to(device=logits.device, dtype=torch.long)  # (B, T-1)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100)

        result = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict else result.to_tuple()

    # ---- fast cached path for generation (gpt-fast style) ----

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None):
        """Allocate one zero-filled KVCache (B, nh, T_max, hs) per layer (and the mask and rotary tables that
        every step shares); calling again re-allocates."""
        self.gpt_neox_japanese.setup_caches(max_batch_size, max_seq_length, dtype=dtype or self.dtype,
                                            device=device or self.device)

    def clear_caches(self):
        self.gpt_neox_japanese.clear_caches()

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, input_pos: torch.Tensor, first_row: int = 0,
                       kv_length: int | None = None, last_only: bool = True) -> torch.Tensor:
        """Logits through the static KV caches (see neoxja.kv_cache).

        input_ids (B, T) go to cache rows [first_row, first_row + B) ("slots"), row b at positions
        input_pos[b] (B, T); the position is also the token's rotary position (a sequence starts at 0 of its
        slot). A query at position p attends to keys 0..p of its own row, among the first `kv_length` positions
        of the cache (default: all of them, masked, so every step has the same shapes). Positions must be
        < kv_length and each row's positions below its new ones must already hold this sequence's tokens.
        Returns (B, 1, V) logits for the last position when last_only, else (B, T, V).
        """
        x = self.gpt_neox_japanese.forward_cached(input_ids, input_pos, first_row, kv_length)
        if last_only:
            x = x[:, -1:]  # the LM head only where it is needed
        return self.embed_out(x)

    def forward_segments(self, input_ids: torch.Tensor, input_pos: torch.Tensor, segments) -> torch.Tensor:
        """Logits (S, V) of the last token of each of S segments (slot, start, end, kv_length) of input_ids
        (1, N); see GPTNeoXJapaneseModel.forward_segments (several prompts' chunks in one call)."""
        x = self.gpt_neox_japanese.forward_segments(input_ids, input_pos, segments)  # (1, N, C)
        last = torch.tensor([end - 1 for _, _, end, _ in segments], device=x.device)  # (S,)
        return self.embed_out(x[0, last])  # (S, V)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _check_token_ids(ids: torch.Tensor, vocab_size: int, name: str, allow: int | None = None):
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (batch, seq), got shape {tuple(ids.shape)}")
    bad = (ids < 0) | (ids >= vocab_size)
    if allow is not None:
        bad &= ids != allow
    if ids.numel() and bool(bad.any()):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): e.g. {ids[bad][:5].tolist()}")


def _past_length(past_key_values, num_layers: int) -> int:
    if past_key_values is None:
        return 0
    if not isinstance(past_key_values, (tuple, list)) or len(past_key_values) != num_layers:
        raise ValueError(f"past_key_values must be a tuple of {num_layers} (key, value) pairs "
                         f"as returned by a previous forward")
    return past_key_values[0][0].size(2)


def _attention_mask(attention_mask, B: int, past_length: int, T: int, device):
    """(mask, is_causal) for SDPA: mask is None, or bool (T, S) / (B, 1, T, S) with True = may attend."""
    S = past_length + T
    if attention_mask is None:
        if T == 1:
            return None, False  # one new token sees every key
        if past_length == 0:
            return None, True  # plain causal: SDPA needs no mask tensor
    key_pos = torch.arange(S, device=device)  # (S,)
    query_pos = torch.arange(past_length, S, device=device)  # (T,)
    mask = key_pos[None, :] <= query_pos[:, None]  # (T, S) causal
    if attention_mask is not None:
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be (batch, past + seq) = ({B}, {S}), "
                             f"got {tuple(attention_mask.shape)}")
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, T, S)
        mask = _see_self_if_alone(mask, key_pos[None, :] == query_pos[:, None])
    return mask, False


KEY_COPY_BYTES = 4 << 20  # the float32 copy of the keys _cached_attention makes at a time (CPU)


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Attention of q (B, nh, T, hs) over the cache rows k, v (B, nh, S, hs); mask (B, 1, T, S) is additive
    (0 where a query may attend, -inf elsewhere), built once per step by forward_cached.

    Written out rather than F.scaled_dot_product_attention, because a row's result must not depend on how
    many cache positions lie beyond it (S: generate() sizes the cache to the generation, a server to the
    context) nor on the other rows: SDPA's fused CPU kernel and a one-query product (a matrix-vector product)
    both give different bits for different S. Batched products with >= 2 queries do not (masked keys add exact
    zeros at the end of each sum) once S >= 16, so a single query is computed as two equal ones and fewer
    than 16 positions are padded with masked ones. k and v are views of the cache: flatten(0, 1) keeps them
    views, so nothing of the cache is copied.

    Under torch.compile a single query is computed as elementwise products and sums instead (in bfloat16 and
    float16, and in float32 at one row), which inductor fuses with the mask, the softmax and the float32
    conversion of the cache into its own kernels (compiled steps give up bitwise batch invariance anyway:
    docs/serving.md). At the 2.7B width in bfloat16 the two library bmm calls took 2.4-10x as long (8 rows at
    2048 positions: 84 ms per layer, converting the whole cache to float32 first; fused 8.4 ms), in float32
    1.6-2.2x as long at one row, and 0.94x at 8 rows and 2048 positions, where bmm stays (docs/bf16.md)."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    if T == 1 and torch.compiler.is_compiling() and (q.dtype != torch.float32 or B == 1):  # fused (see above):
        # the same math as below, bfloat16/float16 inputs with float32 products and sums
        att = (q.float() * k.float()).sum(-1) * scale  # (B, nh, S): q (B, nh, 1, hs) against each key
        att = (att.unsqueeze(2) + mask).softmax(dim=-1)  # (B, nh, 1, S)
        y = (att.to(v.dtype).float().transpose(2, 3) * v.float()).sum(2, keepdim=True)  # (B, nh, 1, hs)
        return y.to(v.dtype)
    if S < 16:
        k, v = F.pad(k, (0, 0, 0, 16 - S)), F.pad(v, (0, 0, 0, 16 - S))  # (B, nh, 16, hs)
        mask = F.pad(mask, (0, 16 - S), value=float("-inf"))  # (B, 1, T, 16)
        S = 16
    q = q.reshape(B * nh, T, hs)
    if T == 1:
        q, mask = q.expand(B * nh, 2, hs).contiguous(), mask.expand(B, 1, 2, S)  # (B*nh, 2, hs), (B, 1, 2, S)
    Tq = q.shape[1]
    k = k.flatten(0, 1)  # (B*nh, S, hs)
    # float32 scores; from bfloat16/float16 through a float32 copy of the keys, on a CPU a few heads at a time:
    # a copy of the whole cache is fresh memory from the OS at every step (8 rows x 2048 positions at the 2.7B
    # width: 168 MB, 64 ms of page faults; 85.7 ms per layer against 18.3 ms in pieces, the same bits)
    per_copy = G = B * nh
    if k.dtype != torch.float32 and k.device.type == "cpu":
        per_copy = max(1, KEY_COPY_BYTES // (S * hs * 4))
    parts = [torch.bmm(q[g:g + per_copy].float(), k[g:g + per_copy].float().transpose(1, 2))
             for g in range(0, G, per_copy)]  # (per_copy, Tq, S) each
    att = (parts[0] if len(parts) == 1 else torch.cat(parts)) * scale  # (B*nh, Tq, S)
    att = (att.view(B, nh, Tq, S) + mask).softmax(dim=-1)  # (B, nh, Tq, S)
    y = torch.bmm(att.view(B * nh, Tq, S).to(v.dtype), v.flatten(0, 1)).view(B, nh, Tq, hs)
    return y[:, :, :T] if T == 1 else y


def _see_self_if_alone(mask: torch.Tensor, is_self: torch.Tensor) -> torch.Tensor:
    """A query that may see no key (a left-padding token) sees itself, so no softmax row is empty."""
    return mask | (is_self & ~mask.any(dim=-1, keepdim=True))


def _head_mask(head_mask, num_layers: int, num_heads: int, device) -> list:
    """Per layer None or a (1, nh, 1, 1) multiplier for the attention probabilities."""
    if head_mask is None:
        return [None] * num_layers
    head_mask = torch.as_tensor(head_mask)
    if head_mask.shape == (num_heads,):
        head_mask = head_mask.expand(num_layers, num_heads)
    if head_mask.shape != (num_layers, num_heads):
        raise ValueError(f"head_mask must be [num_heads]=[{num_heads}] or [num_layers, num_heads]="
                         f"[{num_layers}, {num_heads}], got {list(head_mask.shape)}")
    return [m.view(1, num_heads, 1, 1) for m in head_mask.to(device=device, dtype=torch.float)]
