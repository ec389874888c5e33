"""The model's elementwise building blocks, each one call: the fused CPU kernel
(duet_kernels/cpu/fused.cpp) where it is built and the tensor is on the CPU, else its torch
reference (CUDA, or a machine without a compiler). On bf16 the two agree bit for bit; on
fp32 they differ by an ulp inside the reductions (RMSNorm's mean) and exp (SiLU)."""
from __future__ import annotations

import torch

from duet_kernels import cpu_kernels as K


def _fused(x: torch.Tensor):
    return K.load() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
        else None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalize in fp32, cast back, scale by w. x: [T, H]."""
    m = _fused(x)
    return m.rms_norm(x, w, eps) if m is not None else K.rms_norm_ref(x, w, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual stream's add, then the norm."""
    m = _fused(x)
    if m is not None:
        return m.add_rms_norm(x, residual, w, eps)
    return K.add_rms_norm_ref(x, residual, w, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dim."""
    m = _fused(gate_up)
    return m.silu_mul(gate_up) if m is not None else K.silu_mul_ref(gate_up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] (may be a view; the fused kernel writes it in
    place) with fp32 cos/sin [T, D] gathered at the tokens' positions."""
    m = _fused(x)
    if m is not None:
        m.rope_(x, cos, sin)
        return x
    return K.rope_ref(x, cos, sin)
