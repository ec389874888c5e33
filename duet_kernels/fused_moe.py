"""fused_moe: a mixture-of-experts MLP over routed tokens, the grouped-expert path.

    out[t] = sum_k  w[t, k] * down_e( silu(gate_e(x[t])) * up_e(x[t]) ),  e = ids[t, k]

x [T, H]; w_gate_up [E, 2I, H] (gate rows, then up rows, as the loader fuses them);
w_down [E, H, I]; topk_ids [T, K] int; topk_weights [T, K] (fp32). Returns [T, H] in
x.dtype.

Triton path (vLLM's layout): the T*K (token, slot) pairs are sorted by expert and each
expert's run padded to a multiple of BLOCK_M (`align`); one grouped GEMM computes every
pair's gate_up against its expert's weights, SiLU-mul follows, a second grouped GEMM the
down projection scaled by the routing weight, and the K slots of each token are summed.
A block of rows belongs to one expert; padded rows are masked, never read or written; an
expert without tokens gets no block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import dot_precision, require_triton, tl, triton, use_triton

BLOCK_M = 16


def _check(x, w_gate_up, w_down, topk_ids, topk_weights):
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"x {tuple(x.shape)} must be [T, H], w_gate_up {tuple(w_gate_up.shape)} "
                         f"[E, 2I, H], w_down {tuple(w_down.shape)} [E, H, I]")
    E, I2, H = w_gate_up.shape
    if H != x.shape[1] or I2 % 2 or tuple(w_down.shape) != (E, H, I2 // 2):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, w_gate_up "
                         f"{tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or \
            topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={x.shape[0]}, K]")
    if topk_ids.numel() and not 0 <= int(topk_ids.min()) <= int(topk_ids.max()) < E:
        raise ValueError(f"expert ids must be in [0, {E}), got {int(topk_ids.min())}.."
                         f"{int(topk_ids.max())}")


def fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights):
    """Torch reference (and the CPU path): each expert's tokens gathered, its two linears,
    the weighted rows added back in fp32."""
    _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    K = topk_ids.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // K
        gate, up = F.linear(x[tokens], w_gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e])
        out.index_add_(0, tokens, y.float() * topk_weights.reshape(-1)[pairs, None].float())
    return out.to(x.dtype)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """(sorted_pairs [P], block_experts [P / block_m]): the flat (token, slot) pair ids
    t*K + k in expert order, each expert's run padded with T*K (no pair) to a multiple of
    block_m, and the expert of each block of block_m rows."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(padded.sum())
    sorted_pairs = torch.full((total,), flat.numel(), dtype=torch.int64, device=flat.device)
    starts = torch.cumsum(padded, 0) - padded
    # position of each sorted pair inside its expert's padded run
    first = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - first[e_sorted]
    sorted_pairs[starts[e_sorted] + rank] = order
    block_experts = torch.repeat_interleave(torch.arange(num_experts, device=flat.device),
                                            padded // block_m)
    return sorted_pairs, block_experts


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, pairs_ptr, experts_ptr, w_ptr,
                         N, Kd, num_pairs, a_div,
                         stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                         WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """C[pair] = A[pair // a_div] @ B[expert]^T (* w[pair]) for one block of sorted pairs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rows)
    valid = pairs < num_pairs
    e = tl.load(experts_ptr + pid_m).to(tl.int64)
    a_rows = tl.where(valid, pairs // a_div, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < Kd), other=0.0)
        b = tl.load(b_ptr + e * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=(cols[None, :] < N) & (ks[:, None] < Kd), other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    if WEIGHTED:
        w = tl.load(w_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0)
        acc = acc * w[:, None]
    tl.store(c_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * stride_cm + cols[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def _grouped_gemm(a, b, sorted_pairs, block_experts, num_pairs, a_div, out, weights=None):
    E, N, Kd = b.shape
    BLOCK_N, BLOCK_K = 32, 32
    grid = (block_experts.numel(), triton.cdiv(N, BLOCK_N))
    if grid[0] == 0:
        return out
    _grouped_gemm_kernel[grid](
        a, b, out, sorted_pairs, block_experts, weights if weights is not None else out,
        N, Kd, num_pairs, a_div, a.stride(0), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), WEIGHTED=weights is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, PRECISION=dot_precision(a.dtype))
    return out


def fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights):
    """Triton path of `fused_moe`."""
    require_triton()
    _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    T, K = topk_ids.shape
    E, I2, H = w_gate_up.shape
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    pairs = T * K
    sorted_pairs, block_experts = align(topk_ids, E)
    gate_up = torch.empty(pairs, I2, dtype=torch.float32, device=x.device)
    _grouped_gemm(x, w_gate_up, sorted_pairs, block_experts, pairs, K, gate_up)
    g, u = gate_up.chunk(2, dim=-1)
    act = (F.silu(g) * u).to(x.dtype).contiguous()
    down = torch.empty(pairs, H, dtype=torch.float32, device=x.device)
    _grouped_gemm(act, w_down, sorted_pairs, block_experts, pairs, 1, down,
                  topk_weights.reshape(-1).float().contiguous())
    return down.view(T, K, H).sum(dim=1).to(x.dtype)


def fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights):
    """The MoE MLP of x's tokens over their top-k experts (see the module docstring)."""
    if use_triton(x, w_gate_up, w_down):
        return fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights)
    return fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights)
