"""Mapping between the wire dtype names of handle.DType and torch dtypes."""
from __future__ import annotations

import torch

from shared.buffers.handle import ITEMSIZE


def to_torch(name: str) -> torch.dtype:
    """torch dtype for a wire name; ValueError naming the allowed names."""
    if name not in ITEMSIZE:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(ITEMSIZE)}")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not available in this torch build")
    return dtype


def to_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype ('float32'); ValueError if not on the wire."""
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise ValueError(f"dtype {dtype} cannot travel; allowed: {sorted(ITEMSIZE)}")
    return name


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor (no copy)."""
    if not tensor.is_contiguous():
        raise ValueError(f"tensor of shape {list(tensor.shape)} is not contiguous")
    return tensor.reshape(-1).view(torch.uint8)


def view_bytes(raw: torch.Tensor, dtype: str, shape: list[int]) -> torch.Tensor:
    """Reinterpret a flat uint8 tensor as `dtype` with `shape` (no copy)."""
    return raw.view(to_torch(dtype)).view(shape)
