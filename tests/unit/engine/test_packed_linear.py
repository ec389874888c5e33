"""Prepacked bf16 linears: the plain linear's values, the same for every batch size."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.engine.packed_linear import PackedLinear, can_pack, pack_linears


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
                                reason="no AVX-512 BF16 here: bf16 linears stay unpacked")


def test_packed_matches_the_plain_linear_and_is_batch_invariant():
    lin = nn.Linear(576, 960, bias=True).to(torch.bfloat16)
    packed = PackedLinear(lin.weight, lin.bias)
    x = torch.randn(64, 576).to(torch.bfloat16)
    got = packed(x)
    want = (x.float() @ lin.weight.float().t() + lin.bias.float())
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    for m in (1, 3, 16):            # a row's result does not depend on the rows beside it
        assert torch.equal(packed(x[:m]), got[:m])
    assert packed(x.view(4, 16, 576)).shape == (4, 16, 960)


def test_pack_linears_swaps_linears_and_a_tied_head_once():
    model = bf16_model()
    x = torch.randn(5, 32).to(torch.bfloat16)
    before = model.proj(x)
    assert pack_linears(model) == 2                       # proj, and the tied lm_head
    assert isinstance(model.proj, PackedLinear) and isinstance(model.lm_head, PackedLinear)
    torch.testing.assert_close(model.proj(x).float(), before.float(), atol=0.05, rtol=0.02)
    assert pack_linears(model) == 0                       # idempotent
    assert pack_linears(Tiny()) == 0                      # fp32 stays as it is
