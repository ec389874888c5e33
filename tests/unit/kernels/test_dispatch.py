import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch

import duet_kernels.activation as act
from duet_kernels._dispatch import use_triton

from ._helpers import check_backend


def _boom(*a, **k):
    raise AssertionError("triton path taken")


def test_cpu_uses_reference_unless_interpreting(monkeypatch):
    check_backend("cpu")
    monkeypatch.setattr(act, "silu_and_mul_triton", _boom)
    x = torch.randn(2, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)
    torch.testing.assert_close(act.silu_and_mul(x), act.silu_and_mul_ref(x))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x)
    with pytest.raises(AssertionError, match="triton path"):
        act.silu_and_mul(x)


def test_interpreter_never_gets_bf16(monkeypatch):
    check_backend("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(act.silu_and_mul(x), act.silu_and_mul_ref(x), atol=0, rtol=0)
