"""silu_and_mul: the SwiGLU gate, silu(gate) * up, from the fused gate_up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import require_triton, tl, triton, use_triton

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < INTER
    gate = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + c, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + c, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x):
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x {tuple(x.shape)} must be [T, 2*I]")


def silu_and_mul_triton(x):
    """Triton path of `silu_and_mul`."""
    require_triton()
    _check(x)
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, I, device=x.device, dtype=x.dtype)
    if T == 0 or I == 0:
        return out
    if x.stride(-1) != 1:
        raise ValueError("x needs a contiguous last dimension")
    _silu_and_mul_kernel[(T, triton.cdiv(I, _BLOCK))](x, out, x.stride(0), out.stride(0), I, BLOCK=_BLOCK)
    return out


def silu_and_mul_ref(x):
    """Torch reference (and the CPU path); fp32 math, one rounding, like the kernel."""
    _check(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate | up) -> silu(x[:, :I]) * x[:, I:] as [T, I] in x.dtype."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
