"""bf16 linears with their weights prepacked once at load, on CPUs with AVX-512 BF16 or AVX2.

Two packings, same contract (a row's result never depends on the rows beside it):
- Duet's own kernel (duet_kernels/cpu/linear.cpp) where the C++ kernels are built: weights in
  blocks of 32 outputs streamed sequentially, one fp32 accumulator per output in a fixed
  k order (VDPBF16PS on AVX-512 BF16; FMAs on bf16 widened to fp32 on AVX2). At batch 1
  it streams the weights at the memory's speed (`python tools/bench_linear.py`).
- oneDNN's prepacked GEMM (torch.ops.mkldnn) where they are not built: torch's plain bf16
  `F.linear` would reorder the weight on every call.
fp32 and CUDA keep plain nn.Linear.
"""
from __future__ import annotations

import torch
from torch import nn

BATCH_HINT = 64   # oneDNN's packing hint; measured no slower at batch 1 than hint 1


def _own_kernel():
    from duet_kernels import cpu_kernels
    mod = cpu_kernels.load()
    return mod if mod is not None and mod.linear_bf16_supported() else None


class PackedLinear(nn.Module):
    """nn.Linear's forward over a prepacked copy of its weight (x: [..., in] bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._mod = _own_kernel() if self.in_features % 2 == 0 else None
        self.kind = "duet" if self._mod is not None else "onednn"
        if self._mod is not None:
            packed = self._mod.pack_bf16(weight.detach())
            if bias is not None:   # fp32, padded to whole blocks: added before the rounding
                pad = torch.zeros(packed.shape[0] * packed.shape[2], dtype=torch.float32)
                pad[:self.out_features] = bias.detach().float()
                bias = pad
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self._mod is not None:
            y = self._mod.linear_bf16(x2, self.packed, self.out_features, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def _onednn_bf16() -> bool:
    """oneDNN packs bf16 weights only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT."""
    from shared.config import cpu_bf16_isa
    return cpu_bf16_isa() == "avx512_bf16" and torch.backends.mkldnn.is_available()


def packable(in_features: int) -> bool:
    """Whether a bf16 linear of that input width can be packed here: by Duet's kernel (an
    even width), else by oneDNN. One that cannot stays a plain nn.Linear."""
    return (in_features % 2 == 0 and _own_kernel() is not None) or _onednn_bf16()


def can_pack(model: nn.Module) -> bool:
    from shared.config import cpu_has_fast_bf16
    w = next(model.parameters())   # whole or sharded model: all weights share device and dtype
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and cpu_has_fast_bf16()


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of `model` (and a tied lm_head) for a PackedLinear, in place;
    how many. Idempotent; a no-op where can_pack() is False."""
    if not can_pack(model):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and packable(child.in_features):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                swapped += 1
    if getattr(model, "lm_head", 0) is None and packable(model.embed_tokens.embedding_dim):
        model.lm_head = PackedLinear(model.embed_tokens.weight)
        swapped += 1
    return swapped
