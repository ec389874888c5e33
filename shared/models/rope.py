"""Rotary position embeddings with the scaling variants found in HF configs."""
from __future__ import annotations

import math

import torch

from shared.models.config import ModelConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2] fp32, attention_scaling) for the config's rope type."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {ROPE_TYPES}")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _dynamic_inv_freq(cfg: ModelConfig, seq_len: int) -> torch.Tensor:
    factor = float(cfg.rope_scaling["factor"])
    max_pos = cfg.max_position_embeddings
    dim = cfg.head_dim
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def build_cos_sin(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, head_dim] in fp32, as HF computes them.

    Dynamic NTK scaling: inside the trained context it equals the default; past it, each
    position uses the frequencies for a sequence ending there, so cached keys never need
    re-rotation (HF instead rescales the whole forward pass by its longest position).
    """
    inv_freq, attn_scaling = rope_inv_freq(cfg)
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind == "dynamic" and max_positions > cfg.max_position_embeddings:
        for p in range(cfg.max_position_embeddings, max_positions):
            freqs[p] = p * _dynamic_inv_freq(cfg, p + 1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attn_scaling, emb.sin() * attn_scaling
