"""The 'tcp' backend: a tensor's bytes travel as an extra ZeroMQ frame.

Sending appends a memoryview over the tensor's own memory to the message's
frame list (send it with copy=False); receiving wraps the frame's buffer (recv
with copy=False) in a tensor. Neither side copies the payload.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from shared.buffers import dtypes
from shared.buffers.handle import ITEMSIZE, BufferHandle, numel


def to_frame(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a memoryview (no copy).

    The memoryview keeps the tensor's memory alive; do not write to the tensor
    until the frame has been sent.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"tcp frames carry CPU tensors only, got device {tensor.device}")
    return memoryview(dtypes.byte_view(tensor.detach()).numpy())


def frame_buffer(frame: Any) -> memoryview:
    """A memoryview over a received frame: zmq.Frame, bytes or any buffer."""
    return memoryview(getattr(frame, "buffer", frame)).cast("B")


def from_frame(frame: Any, dtype: str, shape: list[int], offset: int = 0) -> torch.Tensor:
    """A tensor viewing `shape` x `dtype` at `offset` in a frame (no copy).

    ValueError when the frame is too short or the dtype unknown. A view over a
    read-only frame (bytes) must not be written; clone it first.
    """
    torch_dtype = dtypes.to_torch(dtype)
    buf = frame_buffer(frame)
    count = numel(shape)
    end = offset + count * ITEMSIZE[dtype]
    if offset < 0 or end > buf.nbytes:
        raise ValueError(
            f"tensor bytes [{offset}, {end}) do not fit a {buf.nbytes}-byte frame")
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if buf.readonly:
        with warnings.catch_warnings():  # torch warns on read-only buffers
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=torch_dtype, count=count, offset=offset)
    else:
        flat = torch.frombuffer(buf, dtype=torch_dtype, count=count, offset=offset)
    return flat.view(shape)


def export(tensor: torch.Tensor, frames: list, generation: int = 0) -> BufferHandle:
    """Append the tensor's bytes to `frames`; the handle names that frame."""
    frames.append(to_frame(tensor))
    return BufferHandle(
        backend="tcp", nbytes=tensor.numel() * tensor.element_size(),
        dtype=dtypes.to_name(tensor.dtype), shape=list(tensor.shape),
        frame=len(frames) - 1, generation=generation)


def open(handle: BufferHandle, frames: list) -> torch.Tensor:  # noqa: A001
    """View of the payload frame a 'tcp' handle names (no copy)."""
    if handle.backend != "tcp":
        raise ValueError(f"not a tcp handle: backend {handle.backend!r}")
    if not 0 <= handle.frame < len(frames):
        raise ValueError(f"handle names payload frame {handle.frame}, message has {len(frames)}")
    return from_frame(frames[handle.frame], handle.dtype, handle.shape, handle.offset)
