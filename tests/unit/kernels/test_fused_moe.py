import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch
import torch.nn.functional as F

from duet_kernels.fused_moe import BLOCK_M, align, fused_moe_ref, fused_moe_triton

from ._helpers import cases, check_backend

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def weights(E, H, I, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype).to(device)
    return w1, w2


def routing(T, E, K, skew=False, seed=1):
    """top-k ids per token (distinct) and softmax-like weights; skew: most tokens on expert
    0 and none at all on the last expert (ragged loads, an empty expert)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    if skew:
        scores[:, 0] += 3.0
        scores[:, E - 1] = -1e9
    w, ids = torch.topk(scores.softmax(-1), K, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("device,dtype", cases())
@pytest.mark.parametrize("T,E,K,skew", [(19, 4, 2, False), (23, 8, 1, True), (9, 8, 8, False),
                                        (1, 6, 3, True)],
                         ids=["top2", "top1-ragged-empty-expert", "top8-all", "one-token"])
def test_triton_matches_ref(device, dtype, T, E, K, skew):
    check_backend(device)
    H, I = 32, 24                                  # I not a multiple of the 32-wide tiles
    w1, w2 = weights(E, H, I, dtype, device)
    x = torch.randn(T, H).to(dtype).to(device)
    ids, w = routing(T, E, K, skew)
    got = fused_moe_triton(x, w1, w2, ids.to(device), w.to(device))
    want = fused_moe_ref(x, w1, w2, ids.to(device), w.to(device))
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if skew:
        assert int((ids == E - 1).sum()) == 0      # the empty expert really was empty


def test_reference_is_the_per_token_weighted_sum():
    T, E, K, H, I = 7, 5, 2, 16, 12
    w1, w2 = weights(E, H, I, torch.float64, "cpu")
    x = torch.randn(T, H, dtype=torch.float64)
    ids, w = routing(T, E, K)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            gate, up = (w1[e] @ x[t]).chunk(2)
            want[t] += w[t, k].double() * (w2[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(fused_moe_ref(x, w1, w2, ids, w), want)


def test_align_sorts_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])   # expert 0: 2 pairs, 1: 1, 2: 3, 3: none
    pairs, experts = align(ids, 4, block_m=4)
    assert experts.tolist() == [0, 1, 2]           # one block each; expert 3 gets none
    rows = pairs.view(3, 4).tolist()
    assert rows[0] == [1, 4, 6, 6] and rows[1] == [3, 6, 6, 6] and rows[2] == [0, 2, 5, 6]
    assert BLOCK_M == 16


def test_bad_shapes_and_ids_are_named():
    w1, w2 = weights(4, 16, 8, torch.float32, "cpu")
    x = torch.randn(3, 16)
    ids, w = routing(3, 4, 2)
    with pytest.raises(ValueError, match="expert ids must be in \\[0, 4\\)"):
        fused_moe_ref(x, w1, w2, ids + 3, w)
    with pytest.raises(ValueError, match="shapes do not chain"):
        fused_moe_ref(x, w1, w2[:, :, :4], ids, w)
    with pytest.raises(ValueError, match="must both be \\[T=3, K\\]"):
        fused_moe_ref(x, w1, w2, ids[:2], w[:2])
