"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) in plain torch.

The model knows nothing of parallelism, graphs or transport: attention over the paged KV
cache is delegated to the `attn` object passed into `forward`, which the engine owns.
q/k/v and gate/up projections are fused at load time (see loader.py) for fewer GEMMs.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
import torch.nn.functional as F

from shared.models.config import ModelConfig
from shared.models.rope import apply_rope, build_cos_sin


class PagedAttention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q [T,Hq,D], k/v [T,Hkv,D] for this step's tokens -> attention output [T,Hq,D]."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as HF LlamaRMSNorm: normalize in fp32, cast back, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.hq + 2 * self.hkv) * self.d
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer: int, attn: PagedAttention):
        # x: [T, hidden]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = apply_rope(q.view(-1, self.hq, self.d), cos, sin)
        k = apply_rope(k.view(-1, self.hkv, self.d), cos, sin)
        out = attn(layer, q, k, v.view(-1, self.hkv, self.d))
        return self.o_proj(out.reshape(x.shape[0], self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn: PagedAttention):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, self.index, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_positions = max_positions or cfg.max_position_embeddings
        kind = (cfg.rope_scaling or {}).get("rope_type", "default")
        if self.max_positions > cfg.max_position_embeddings and kind != "dynamic":
            raise ValueError(f"max_model_len={self.max_positions} is past this model's trained "
                             f"context of {cfg.max_position_embeddings} tokens; only dynamic RoPE "
                             f"scaling extends it (rope_type here: {kind!r})")
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        if not self.embed_tokens.weight.is_meta:  # the loader builds on meta, then calls it
            self.init_rope(self.embed_tokens.weight.device)

    def init_rope(self, device) -> None:
        """(Re)build the fp32 cos/sin tables; kept fp32 whatever the weights' dtype."""
        cos, sin = build_cos_sin(self.config, self.max_positions)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: PagedAttention) -> torch.Tensor:
        """input_ids, positions: [T] (packed tokens of all sequences) -> hidden [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
