"""Prepacked bf16 linears: the plain linear's values, the same for every batch size."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from duet_kernels import cpu_kernels
from shared.engine.packed_linear import PackedLinear, can_pack, pack_linears, packable


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 48)
        self.lm_head = None


def bf16_model():
    torch.manual_seed(0)
    return Tiny().to(torch.bfloat16)


pytestmark = pytest.mark.skipif(not can_pack(bf16_model()),
                                reason="no AVX-512 BF16 or AVX2+FMA here: bf16 linears stay unpacked")


def own_kernel_built() -> bool:
    mod = cpu_kernels.load()
    return mod is not None and mod.linear_bf16_supported()


@pytest.mark.parametrize("n_out,bias", [(960, True), (576, False), (45, True)])
def test_packed_matches_the_plain_linear_and_is_batch_invariant(n_out, bias):
    torch.manual_seed(n_out)
    lin = nn.Linear(576, n_out, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(lin.weight, lin.bias)
    assert packed.kind == ("duet" if own_kernel_built() else "onednn")
    x = torch.randn(64, 576).to(torch.bfloat16)
    got = packed(x)
    want = x.float() @ lin.weight.float().t()
    if bias:
        want += lin.bias.float()
    assert got.dtype == torch.bfloat16 and got.shape == (64, n_out)
    # fp32 sums rounded once to bf16: within bf16's half-ulp of the exact value
    torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.008)
    for m in (1, 3, 8, 9, 16, 17):   # a row's result does not depend on the rows beside it
        assert torch.equal(packed(x[:m]), got[:m])
    assert torch.equal(packed(x[40:47]), got[40:47])
    assert packed(x.view(4, 16, 576)).shape == (4, 16, n_out)
    assert packed(x[:0]).shape == (0, n_out)


@pytest.mark.skipif(not own_kernel_built(), reason="the C++ kernels are not built here")
def test_own_kernel_refuses_what_does_not_fit():
    mod = cpu_kernels.load()
    w = torch.randn(64, 32).to(torch.bfloat16)
    packed = mod.pack_bf16(w)
    with pytest.raises(RuntimeError, match="x has K=30, the weight K=32"):
        mod.linear_bf16(torch.zeros(2, 30, dtype=torch.bfloat16), packed, 64)
    with pytest.raises(RuntimeError, match="wants x as \\[M, K\\] bf16"):
        mod.linear_bf16(torch.zeros(2, 32), packed, 64)
    with pytest.raises(RuntimeError, match="N=100 does not fit 2 blocks"):
        mod.linear_bf16(torch.zeros(2, 32, dtype=torch.bfloat16), packed, 100)


def test_an_odd_input_width_takes_onednn_where_it_packs_bf16_else_stays_plain():
    lin = nn.Linear(33, 40).to(torch.bfloat16)
    x = torch.randn(5, 33).to(torch.bfloat16)
    if not packable(33):   # AVX2: oneDNN does not pack bf16 there, so nothing packs it
        model = nn.Sequential(lin)
        assert pack_linears(model) == 0 and type(model[0]) is nn.Linear
        return
    packed = PackedLinear(lin.weight, lin.bias)
    assert packed.kind == "onednn"
    torch.testing.assert_close(packed(x).float(), lin(x).float(), atol=0.05, rtol=0.02)


def test_pack_linears_swaps_linears_and_a_tied_head_once():
    model = bf16_model()
    x = torch.randn(5, 32).to(torch.bfloat16)
    before = model.proj(x)
    assert pack_linears(model) == 2                       # proj, and the tied lm_head
    assert isinstance(model.proj, PackedLinear) and isinstance(model.lm_head, PackedLinear)
    torch.testing.assert_close(model.proj(x).float(), before.float(), atol=0.05, rtol=0.02)
    assert pack_linears(model) == 0                       # idempotent
    assert pack_linears(Tiny()) == 0                      # fp32 stays as it is
