"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM; Mixtral and Qwen3-MoE
with mixture-of-experts layers, shared/models/moe.py) in plain torch.

The model knows nothing of parallelism, graphs or transport: attention over the paged KV
cache is delegated to the `attn` object passed into `forward`, which the engine owns.
q/k/v and gate/up projections are fused at load time (see loader.py) for fewer GEMMs.
"""
from __future__ import annotations

import os
from typing import Protocol

import torch
from torch import nn
import torch.nn.functional as F

from shared.models import ops
from shared.models.config import ModelConfig
from shared.models.moe import SparseMoE
from shared.models.rope import build_cos_sin


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
        # HF LlamaRMSNorm's op order: normalize in fp32, cast back, then scale
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor):
        """(norm(x + residual), x + residual)"""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.hq + 2 * self.hkv) * self.d
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        self.reduce = None   # tensor parallel: sums the ranks' partial o_proj outputs in place
        # Qwen3: each head of q and k RMS-normed over head_dim before RoPE
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, layer: int, attn: PagedAttention):
        # x: [T, hidden]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q.reshape(-1, self.d)), self.k_norm(k.reshape(-1, self.d))
        q = ops.rope(q.view(-1, self.hq, self.d), cos, sin)
        k = ops.rope(k.view(-1, self.hkv, self.d), cos, sin)
        out = self.o_proj(attn(layer, q, k, v.view(-1, self.hkv, self.d))
                          .reshape(x.shape[0], self.hq * self.d))
        if self.reduce is not None:
            self.reduce(out)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.reduce = None   # tensor parallel: sums the ranks' partial down_proj outputs

    def forward(self, x):
        out = self.down_proj(ops.silu_mul(self.gate_up_proj(x)))
        if self.reduce is not None:
            self.reduce(out)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)

    def forward(self, x, residual, cos, sin, attn: PagedAttention):
        """x: what the previous layer added ([T, hidden]); residual: the stream before it
        (None for the first layer). Returns (this layer's addition, the stream before
        it): the residual adds are fused into the next norm (as HF: h = x + attn(norm(x)),
        out = h + mlp(norm(h)))."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(h, cos, sin, self.index, attn)
        h, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(h), residual


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
        if cfg.sliding_window is not None:   # full attention is exact up to the window
            if self.max_positions > cfg.sliding_window and max_positions is not None:
                raise ValueError(f"max_model_len={self.max_positions} is past this model's "
                                 f"sliding_window={cfg.sliding_window}: Duet attends to the "
                                 f"whole context, which equals the window's only inside it")
            self.max_positions = min(self.max_positions, cfg.sliding_window)
        kind = (cfg.rope_scaling or {}).get("rope_type", "default")
        if self.max_positions > cfg.max_position_embeddings and kind != "dynamic":
            raise ValueError(f"max_model_len={self.max_positions} is past this model's trained "
                             f"context of {cfg.max_position_embeddings} tokens; only dynamic RoPE "
                             f"scaling extends it (rope_type here: {kind!r})")
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self._stack = None   # the fused decode stack, built on the first decode-only step
        if not self.embed_tokens.weight.is_meta:  # the loader builds on meta, then calls it
            self.init_rope(self.embed_tokens.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def init_rope(self, device) -> None:
        """(Re)build the fp32 cos/sin tables; kept fp32 whatever the weights' dtype."""
        cos, sin = build_cos_sin(self.config, self.max_positions)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: PagedAttention) -> torch.Tensor:
        """input_ids, positions: [T] (packed tokens of all sequences) -> hidden [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]   # fp32 [T, D]
        stack = self.decode_stack()
        inputs = None
        if stack is not None and hasattr(attn, "decode_only_inputs"):
            inputs = attn.decode_only_inputs([layer.index for layer in self.layers])
        if inputs is not None:   # every sequence decodes one token: all layers in one call
            x, residual = stack.forward(x, None, cos, sin, *inputs)
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual, cos, sin, attn)
        return self.norm.add_forward(x, residual)[0]

    def decode_stack(self):
        """The fused decode stack (duet_kernels/cpu/decode_stack.cpp: every layer of a
        decode-only step in one C++ call, bit-identical to the layer-by-layer path) where it
        applies: bf16 on the CPU with Duet's packed linears, no tensor-parallel reduce, the
        C++ kernels built, DUET_FUSED_DECODE not 0. None elsewhere."""
        if self._stack is None:
            self._stack = self._build_stack() or False
        return self._stack or None

    def _build_stack(self):
        if os.environ.get("DUET_FUSED_DECODE", "1") == "0" or self.device.type != "cpu" \
                or self.dtype != torch.bfloat16 or not len(self.layers):
            return None
        layers = []
        for layer in self.layers:
            att, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, MLP) or att.q_norm is not None:
                return None   # experts or QK-norm: the layer loop runs them
            linears = (att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if att.reduce is not None or mlp.reduce is not None:
                return None   # tensor parallel: the layer loop reduces between the halves
            if any(getattr(lin, "kind", None) != "duet" for lin in linears) or \
                    any(lin.bias is not None for lin in linears[1:]):
                return None   # oneDNN-packed or plain linears, or a bias the stack has not
            layers.append((layer.input_layernorm.weight.detach(),
                           layer.post_attention_layernorm.weight.detach(),
                           att.qkv_proj.packed, att.qkv_proj.bias, att.o_proj.packed,
                           mlp.gate_up_proj.packed, mlp.down_proj.packed))
        mod = linears[0]._mod
        cfg = self.config
        return mod.DecodeStack(layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                               cfg.rms_norm_eps, cfg.head_dim ** -0.5)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        if self.lm_head is None:   # tied embeddings
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
