import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch

from duet_kernels.rmsnorm import fused_add_rmsnorm_ref, fused_add_rmsnorm_triton

from ._helpers import ELEM_TOL, cases, check_backend


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("device,dtype", cases())
def test_triton_matches_ref(device, dtype, with_residual):
    check_backend(device)
    T, H = 5, 48  # H not a power of two: masked tail
    x = torch.randn(T, H, dtype=dtype, device=device)
    r = torch.randn(T, H, dtype=dtype, device=device) if with_residual else None
    w = (1 + 0.1 * torch.randn(H, device=device)).to(dtype)
    out, new_r = fused_add_rmsnorm_triton(x, r, w, 1e-6)
    want, want_r = fused_add_rmsnorm_ref(x, r, w, 1e-6)
    assert out.dtype == dtype and new_r.dtype == dtype
    torch.testing.assert_close(new_r, want_r, atol=0, rtol=0)  # the add is exact in both
    torch.testing.assert_close(out, want, **ELEM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_hf_llama_rmsnorm(dtype):
    hf = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, H = 4, 64
    norm = hf.LlamaRMSNorm(H, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(H))
    x, r = torch.randn(T, H, dtype=dtype), torch.randn(T, H, dtype=dtype)
    out, new_r = fused_add_rmsnorm_ref(x, r, norm.weight.detach(), 1e-5)
    with torch.no_grad():
        want = norm(r + x)
    assert torch.equal(new_r, r + x)
    torch.testing.assert_close(out, want, atol=0, rtol=0)  # the CPU path is bit-exact with HF
