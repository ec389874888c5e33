import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch

from duet_kernels.kv_write import write_kv, write_kv_ref, write_kv_triton

from ._helpers import cases, check_backend


@pytest.mark.parametrize("device,dtype", cases())
def test_triton_matches_ref_and_skips_padding(device, dtype):
    check_backend(device)
    L, N, page, H, D = 2, 6, 4, 3, 16
    # per-layer k/v are views into one whole cache, as the engine holds them; NaN everywhere
    whole = torch.full((L, 2, N, page, H, D), float("nan"), dtype=dtype, device=device)
    whole_ref = whole.clone()
    # page starts, page ends, a slot in the middle, padding (-1) in between
    slots = torch.tensor([0, 3, 4, -1, 7, 23, -1, 10], dtype=torch.int64, device=device)
    k = torch.randn(len(slots), H, D, dtype=dtype, device=device)
    v = torch.randn(len(slots), H, D, dtype=dtype, device=device)
    write_kv_triton(k, v, whole[1, 0], whole[1, 1], slots)
    write_kv_ref(k, v, whole_ref[1, 0], whole_ref[1, 1], slots)
    torch.testing.assert_close(whole, whole_ref, atol=0, rtol=0, equal_nan=True)

    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(whole[1, 0, s // page, s % page], k[t])
            assert torch.equal(whole[1, 1, s // page, s % page], v[t])
    written = (slots >= 0).sum().item()
    assert int((~whole[1].isnan()).sum()) == 2 * written * H * D  # nothing else touched
    assert whole[0].isnan().all()  # other layer untouched


@pytest.mark.parametrize("device,dtype", cases(cpu=(torch.float16,), cuda=(torch.bfloat16,)))
def test_dispatcher_writes(device, dtype):
    check_backend(device)
    k_cache = torch.zeros(2, 16, 2, 8, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(3, 2, 8, dtype=dtype, device=device)
    write_kv(k, -k, k_cache, v_cache, torch.tensor([31, -1, 16], device=device))
    assert torch.equal(k_cache[1, 15], k[0]) and torch.equal(v_cache[1, 0], -k[2])
    assert int((k_cache != 0).sum()) == int((k[0] != 0).sum() + (k[2] != 0).sum())
