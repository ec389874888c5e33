"""Shared plumbing for the kernels: optional Triton import and the CUDA/interpreter dispatch rule."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch references still work
    HAS_TRITON = False

    class _NoTriton:
        """Stand-in so `@triton.jit` and `tl.constexpr` annotations still evaluate without Triton."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()


def _triton_built_for_interpreter() -> bool:
    # Triton picks interpreter-or-compiler once, at import (its own tl.max etc. are built
    # then); setting TRITON_INTERPRET later cannot make CPU launches work.
    return HAS_TRITON and type(tl.max).__name__ == "InterpretedFunction"


_INTERPRETER_READY = _triton_built_for_interpreter()


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET is truthy and was already set when triton was imported:
    Triton kernels then run on CPU tensors (tests)."""
    if not _INTERPRETER_READY:
        return False
    knobs = getattr(triton, "knobs", None)  # triton < 3.3 has no knobs module
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule: Triton when every tensor is on CUDA, or in interpreter mode with no CUDA
    tensor and no bf16 (the interpreter computes in numpy, which has no bf16)."""
    if not HAS_TRITON:
        return False
    kinds = {t.device.type for t in tensors}
    if kinds == {"cuda"}:
        return True
    return (interpret_mode() and "cuda" not in kinds
            and all(t.dtype != torch.bfloat16 for t in tensors))


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref torch implementation instead")


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum); tl.arange needs power-of-two extents."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE dots (tf32 would lose ~3 digits); half types use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; 1 elsewhere (interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
