"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE layers, in plain torch plus the
grouped-expert kernel (duet_kernels/fused_moe.py: Triton on CUDA, its reference on CPU).

Routing as transformers does it: softmax over the router's logits in fp32, the top-k
experts, their probabilities renormalized to sum to 1 (Mixtral always, Qwen3-MoE when
norm_topk_prob), each token's output the weighted sum of its experts' SwiGLU MLPs.
"""
from __future__ import annotations

import torch
from torch import nn

from duet_kernels.fused_moe import fused_moe
from shared.models.config import ModelConfig


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        E, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = nn.Linear(h, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * i, h))   # gate rows, then up rows
        self.w_down = nn.Parameter(torch.empty(E, h, i))
        self.reduce = None   # (tensor parallel is not built for experts: see the loader)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, k], weights [T, k] fp32)."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        return fused_moe(x, self.w_gate_up, self.w_down, ids, weights)
