"""Export a tensor region in one process, open it as a view in another.

    handle = export(tensor)            # shm region view or IpcBuffer view
    handle = export(tensor, frames=f)  # tcp: bytes appended to frame list f
    view = open(handle, frames=None)   # no copy on every backend

BufferHandle is torch-free and importable alone; export/open (and the backend
modules, which import torch) are loaded on first use so that the protocol and
the gateway do not pay for torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.buffers.handle import BufferHandle

if TYPE_CHECKING:
    import torch

__all__ = ["BufferHandle", "export", "open"]


def export(obj: Any, *, frames: list | None = None, generation: int = 0) -> BufferHandle:
    """Name a tensor region so another process can open it.

    obj: a ShmRegion or IpcBuffer (the whole region), or a contiguous tensor.
    With `frames` (a list), the tensor's bytes are appended to it and the handle
    is 'tcp'. Otherwise a CUDA tensor must lie inside an IpcBuffer and a CPU
    tensor inside a ShmRegion of this process. ValueError otherwise.
    """
    from shared.buffers import cuda_ipc, shm, tcp

    if isinstance(obj, shm.ShmRegion):
        return obj.export(generation=generation)
    if isinstance(obj, cuda_ipc.IpcBuffer):
        return obj.export(generation=generation)
    if frames is not None:
        return tcp.export(obj, frames, generation)
    if obj.is_cuda:
        return cuda_ipc.export(obj, generation)
    return shm.export(obj, generation)


def open(handle: BufferHandle, frames: list | None = None) -> "torch.Tensor":  # noqa: A001
    """A torch view of the region `handle` names, without copying.

    'tcp' handles need the message's payload `frames`. ValueError names what
    is wrong with a handle that cannot be opened here.
    """
    if handle.backend == "shm":
        from shared.buffers import shm
        return shm.open(handle)
    if handle.backend == "tcp":
        from shared.buffers import tcp
        if frames is None:
            raise ValueError("a tcp handle needs the message's payload frames")
        return tcp.open(handle, frames)
    if handle.backend == "cuda_ipc":
        from shared.buffers import cuda_ipc
        return cuda_ipc.open(handle)
    raise ValueError(f"unknown buffer backend {handle.backend!r}")
