import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch

from duet_kernels.kv_pack import pack_kv, pack_kv_ref, pack_kv_triton, unpack_kv, unpack_kv_ref, unpack_kv_triton

from ._helpers import cases, check_backend

# the store holds 4 layers x 4 kv heads; this worker's cache is layers 1..2, heads 2..3
L, LS, H, HS, N, M, PAGE, D = 2, 4, 2, 4, 5, 6, 4, 16
LAYER0, HEAD0 = 1, 2


@pytest.mark.parametrize("device,dtype", cases())
def test_pack_unpack_match_ref_and_round_trip(device, dtype):
    check_backend(device)
    cache = torch.randn(L, 2, N, PAGE, H, D, dtype=dtype, device=device)
    store = torch.full((M, LS, 2, PAGE, HS, D), float("nan"), dtype=dtype, device=device)
    store_ref = store.clone()
    src, dst = [4, 0, 2], torch.tensor([1, 5, 2], device=device)
    pack_kv_triton(cache, store, src, dst, LAYER0, HEAD0)
    pack_kv_ref(cache, store_ref, src, dst, LAYER0, HEAD0)
    torch.testing.assert_close(store, store_ref, atol=0, rtol=0, equal_nan=True)
    for s, d in zip(src, dst.tolist()):
        for kv in range(2):
            want = cache[:, kv, s]  # [L, PAGE, H, D]
            assert torch.equal(store[d, LAYER0:LAYER0 + L, kv, :, HEAD0:HEAD0 + H], want)
    # outside the slice nothing was written
    assert int((~store.isnan()).sum()) == len(src) * L * 2 * PAGE * H * D

    back = torch.full_like(cache, float("nan"))
    back_ref = back.clone()
    unpack_kv_triton(store, back, dst, [3, 1, 0], LAYER0, HEAD0)
    unpack_kv_ref(store, back_ref, dst, [3, 1, 0], LAYER0, HEAD0)
    torch.testing.assert_close(back, back_ref, atol=0, rtol=0, equal_nan=True)
    for s, d in zip(src, [3, 1, 0]):
        assert torch.equal(back[:, :, d], cache[:, :, s])
    assert back[:, :, [2, 4]].isnan().all()  # blocks not named stay untouched


@pytest.mark.parametrize("device,dtype", cases(cpu=(torch.float32,), cuda=(torch.bfloat16,)))
def test_dispatcher_full_store_and_bad_slice(device, dtype):
    check_backend(device)
    cache = torch.randn(LS, 2, N, PAGE, HS, D, dtype=dtype, device=device)
    store = torch.zeros(M, LS, 2, PAGE, HS, D, dtype=dtype, device=device)
    pack_kv(cache, store, [0, 1], [2, 3])
    back = torch.zeros_like(cache)
    unpack_kv(store, back, [3, 2], [4, 3])
    assert torch.equal(back[:, :, 4], cache[:, :, 1]) and torch.equal(back[:, :, 3], cache[:, :, 0])
    with pytest.raises(ValueError, match="out of the store's range"):
        pack_kv(cache, store, [0], [0], layer_start=1)


def test_ref_copies_runs_of_adjacent_blocks_exactly():
    """The CPU path copies each run of adjacent block pairs in one strided copy."""
    cache = torch.randn(L, 2, 8, PAGE, H, D)
    store = torch.full((10, LS, 2, PAGE, HS, D), float("nan"))
    src, dst = [0, 1, 2, 5, 6, 3], [4, 5, 6, 0, 1, 9]     # runs 0-2 -> 4-6, 5-6 -> 0-1, 3 -> 9
    pack_kv_ref(cache, store, src, dst, LAYER0, HEAD0)
    for s, d in zip(src, dst):
        for kv in range(2):
            assert torch.equal(store[d, LAYER0:LAYER0 + L, kv, :, HEAD0:HEAD0 + H], cache[:, kv, s])
    assert int((~store.isnan()).sum()) == len(src) * L * 2 * PAGE * H * D
    back = torch.full_like(cache, float("nan"))
    unpack_kv_ref(store, back, dst, src, LAYER0, HEAD0)
    assert torch.equal(back[:, :, src], cache[:, :, src])
    assert back[:, :, [4, 7]].isnan().all()
