import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch
import torch.nn.functional as F

from duet_kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton

from ._helpers import ELEM_TOL, cases, check_backend, poisoned


@pytest.mark.parametrize("device,dtype", cases())
def test_triton_matches_ref(device, dtype):
    check_backend(device)
    T, inter = 3, 1100  # more than one 1024-wide program per row, masked tail
    x = 3 * torch.randn(T, 2 * inter, dtype=dtype, device=device)
    got = silu_and_mul_triton(x)
    torch.testing.assert_close(got, silu_and_mul_ref(x), **ELEM_TOL[dtype])


def test_ref_is_silu_gate_times_up():
    x = torch.randn(4, 10, dtype=torch.float64)
    want = F.silu(x[:, :5]) * x[:, 5:]
    torch.testing.assert_close(silu_and_mul(x.float()).double(), want, atol=1e-6, rtol=1e-6)
    assert silu_and_mul(poisoned((0, 10), torch.float32, "cpu")).shape == (0, 5)
