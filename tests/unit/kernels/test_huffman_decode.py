import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch

from duet_kernels.huffman_decode import huff_decode_bf16_triton
from shared import compress as C

from ._helpers import HAS_CUDA, check_backend, requires_cuda
from duet_kernels._dispatch import interpret_mode

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not interpret_mode(),
                                                        reason="CPU needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda, pytest.mark.skipif(
               interpret_mode(), reason="compiled kernels: run with TRITON_INTERPRET=0")])]


def values(n: int) -> torch.Tensor:
    torch.manual_seed(0)
    t = (torch.randn(n) * 0.05).to(torch.bfloat16).view(torch.int16)
    t[:12] = torch.tensor([0x0000, -32768, 0x0001, 0x7F80, -128, 0x7FC0, 0x7F81, -1, 0x7F7F,
                           0x0080, 0x3F80, -16512], dtype=torch.int16)   # zeros, subnormal, inf, NaNs
    return t.view(torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,tile", [(300, 32), (64, 16), (1000, 128)])
def test_triton_decode_equals_the_cpu_codec(device, n, tile):
    check_backend(device)
    t = values(n)
    parts = C.encode_bf16(t, tile=tile)
    table = C.decode_table(parts["lens"].numpy(), C.MAX_LEN)
    got = huff_decode_bf16_triton(*(parts[k].to(device) for k in ("exp", "tiles")),
                                  table.to(device), C.MAX_LEN, parts["raw"].to(device), n, tile)
    assert torch.equal(got.cpu(), t.view(torch.int16))
    from duet_kernels import cpu_kernels
    if cpu_kernels.available():   # and the CPU codec's output, where it is built
        assert torch.equal(got.cpu(), C.decode_bf16(parts, t.shape, tile=tile).view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_decode_flags_a_corrupt_tile(device):
    check_backend(device)
    t = values(256)
    parts = C.encode_bf16(t, tile=64)
    table = C.decode_table(parts["lens"].numpy(), C.MAX_LEN)
    words = parts["exp"].clone()
    lo = int(parts["tiles"][2])
    words[lo:int(parts["tiles"][3])] = -1          # tile 2: all ones, longer than its words
    with pytest.raises(ValueError, match="tile 2 does not decode"):
        huff_decode_bf16_triton(words.to(device), parts["tiles"].to(device), table.to(device),
                                C.MAX_LEN, parts["raw"].to(device), 256, 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        huff_decode_bf16_triton(parts["exp"][:-3].to(device), parts["tiles"].to(device),
                                table.to(device), C.MAX_LEN, parts["raw"].to(device), 256, 64)
