"""fused_add_rmsnorm: residual add + RMSNorm in one pass (HF LlamaRMSNorm numerics)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import next_pow2, require_triton, tl, triton, use_triton


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, new_r_ptr, eps,
    stride_x, stride_r, stride_out, stride_new_r,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < HIDDEN
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + c, mask=mask, other=0.0)
        # HF adds in the model dtype: round the sum once, then normalise the rounded value
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_r_ptr + row * stride_new_r + c, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + c, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x, residual, weight):
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} must be [T, H] and weight {tuple(weight.shape)} [H]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")


def fused_add_rmsnorm_triton(x, residual, weight, eps):
    """Triton path of `fused_add_rmsnorm`."""
    require_triton()
    _check(x, residual, weight)
    T, H = x.shape
    out = torch.empty_like(x)
    new_r = torch.empty_like(x) if residual is not None else x
    if T == 0:
        return out, new_r
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("x, residual and weight need a contiguous last dimension")
    block = next_pow2(H)
    r = residual if residual is not None else x
    _add_rmsnorm_kernel[(T,)](
        x, r, weight, out, new_r, eps,
        x.stride(0), r.stride(0), out.stride(0), new_r.stride(0),
        HIDDEN=H, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16),
    )
    return out, new_r


def fused_add_rmsnorm_ref(x, residual, weight, eps):
    """Torch reference (and the CPU path), written exactly as HF LlamaRMSNorm plus the residual add."""
    _check(x, residual, weight)
    new_r = x if residual is None else x + residual
    h = new_r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.float() * h.to(x.dtype).float()).to(x.dtype)
    return out, new_r


def fused_add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                      eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for x, residual [T, H], weight [H].

    The sum is rounded to x.dtype (as HF adds in the model dtype); the norm is computed in
    fp32, cast to x.dtype, then scaled by weight; both outputs are new [T, H] tensors in
    x.dtype, except that with residual=None the returned residual is x itself.
    """
    if use_triton(x, weight) and (residual is None or use_triton(x, residual)):
        return fused_add_rmsnorm_triton(x, residual, weight, eps)
    return fused_add_rmsnorm_ref(x, residual, weight, eps)
