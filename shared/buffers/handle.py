"""BufferHandle: the wire name of a tensor region another process can open.

This module imports neither torch nor cupy, so the protocol (and services that
never touch tensors, like the gateway) can carry handles without loading them.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Backend = Literal["shm", "cuda_ipc", "tcp"]

# Element types a handle may name. Spelled as torch spells them without the
# "torch." prefix; decoding rejects anything else before it reaches torch.
DType = Literal[
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint8", "bool",
]

NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class BufferHandle(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A contiguous tensor region that another process can open as a view.

    backend: 'shm' (POSIX shared memory), 'cuda_ipc' (CUDA IPC memory handle)
        or 'tcp' (the bytes travel as an extra ZeroMQ frame of the same message).
    device: GPU UUID ('GPU-…') for cuda_ipc, 'cpu' otherwise. Never an ordinal:
        ordinals differ between processes with different CUDA_VISIBLE_DEVICES.
    base: shm segment name | hex cudaIpcMemHandle of the whole allocation | ''.
    offset: byte offset of the region inside base (tcp: inside the frame).
    nbytes: size of the region; always prod(shape) * itemsize(dtype).
    dtype, shape: how to view the bytes.
    generation: bumped by the owner each time the region is reused; readers
        compare it before and after reading to detect recycling.
    frame: tcp only, index of the payload frame (0 = first after the header).
    event: cuda_ipc only, hex cudaIpcEventHandle the writer recorded after
        writing; the reader's stream waits on it before reading.
    """

    backend: Backend
    device: str = "cpu"
    base: str = ""
    offset: NonNeg = 0
    nbytes: NonNeg
    dtype: DType
    shape: list[NonNeg]
    generation: NonNeg = 0
    frame: NonNeg = 0
    event: str = ""

    def __post_init__(self) -> None:
        expected = numel(self.shape) * ITEMSIZE[self.dtype]
        if self.nbytes != expected:
            raise ValueError(
                f"nbytes {self.nbytes} does not match shape {self.shape} of "
                f"{self.dtype} ({expected} bytes)")


ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


def numel(shape: list[int]) -> int:
    """Number of elements of a shape (1 for a scalar shape [])."""
    n = 1
    for d in shape:
        n *= d
    return n
