"""CPU kernels in C++ (duet_kernels/cpu/*.cpp), each beside its torch reference.

They are built once per machine with the system compiler (-O3 -march=native, OpenMP
through ATen's parallel_for) into $DUET_HOME/build, keyed by a hash of the sources, the
torch version and the CPU, so a changed source or another machine builds anew; several
processes starting at once share one build (torch's file lock). Where they cannot be
built (no compiler, no ninja), `available()` is False and the engine uses the reference.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger("duet.kernels")

_SOURCES = [Path(__file__).parent / "cpu" / name
            for name in ("bindings.cpp", "paged_decode.cpp", "fused.cpp", "linear.cpp",
                          "decode_stack.cpp", "huffman.cpp")]
_HEADERS = [Path(__file__).parent / "cpu" / "kernels.h"]   # copied and hashed, not compiled
_lock = threading.Lock()
_module = None
_failed: str | None = None


def _build_dir() -> Path:
    # $DUET_HOME as shared.models.hub.duet_home() reads it; no import of shared/, so the
    # image build can compile these before Duet's other code is in (compose/Dockerfile)
    home = Path(os.environ.get("DUET_HOME", Path.home() / ".cache" / "duet"))
    key = hashlib.sha256()
    for src in _SOURCES + _HEADERS:
        key.update(src.read_bytes())
    key.update(torch.__version__.encode())
    try:   # what -march=native compiles for: the model and its flags (not its clock)
        first = Path("/proc/cpuinfo").read_bytes().split(b"\n\n")[0]
        key.update(b"".join(line for line in first.splitlines(keepends=True)
                            if line.startswith((b"model name", b"flags", b"vendor_id"))))
    except OSError:
        key.update(platform.processor().encode())
    # resolved: the build's recorded paths must not depend on a symlink on the way there
    return (home / "build").resolve() / f"cpu-kernels-{key.hexdigest()[:16]}"


def load():
    """The compiled module, building it on first use; None if it cannot be built."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("DUET_CPU_KERNELS", "1") == "0":
            _failed = "disabled by DUET_CPU_KERNELS=0"
            return None
        try:
            from torch.utils.cpp_extension import load as build
            where = _build_dir()
            where.mkdir(parents=True, exist_ok=True)
            _module = build(name="duet_cpu_kernels", sources=_stable_sources(where),
                            # no FMA contraction: elementwise ops round where torch does
                            extra_cflags=["-O3", "-march=native", "-fopenmp",
                                          "-ffp-contract=off", "-fno-math-errno"],
                            extra_ldflags=["-fopenmp"], build_directory=str(where),
                            verbose=False)
        except Exception as e:   # no compiler, no ninja, a broken toolchain
            _failed = f"{type(e).__name__}: {e}"
            log.warning("CPU kernels unavailable, using the torch references: %s", _failed[:300])
        return _module


def _stable_sources(where: Path) -> list[str]:
    """The sources, copied into the build directory (named by their hash): torch rebuilds
    when the source *paths* change, so two checkouts sharing $DUET_HOME would otherwise
    rebuild each other's module, each waiting on the other's lock."""
    src = where / "src"
    src.mkdir(exist_ok=True)
    out = []
    for s in _SOURCES + _HEADERS:
        dst = src / s.name
        if not dst.is_file() or dst.read_bytes() != s.read_bytes():
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
            tmp.write_bytes(s.read_bytes())
            os.replace(tmp, dst)
        if s.suffix == ".cpp":
            out.append(str(dst))
    return out


def available() -> bool:
    return load() is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V.

    q [B, Hq, D] (any float dtype); k_cache, v_cache [N, bs, Hkv, D] fp32 or bf16 (strided
    is fine: the store's layout too); block_tables [B, max_blocks] int64 (padding ignored);
    ctx_lens [B] int64. Returns [B, Hq, D] in q's dtype; softmax and sums in fp32.
    """
    mod = load()
    if mod is None:
        raise RuntimeError(f"the CPU kernels are not built ({_failed})")
    out = mod.paged_decode(q.float().contiguous(), k_cache, v_cache, block_tables.contiguous(),
                           ctx_lens.contiguous(), float(scale))
    return out.to(q.dtype)


def paged_decode_ref(q, k_cache, v_cache, block_tables, ctx_lens, scale):
    """Torch reference of `paged_decode` (and the path where it cannot be built)."""
    B, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    blocks = block_tables.reshape(-1)
    keys = k_cache.index_select(0, blocks).view(B, -1, Hkv, D).transpose(1, 2).float()
    vals = v_cache.index_select(0, blocks).view(B, -1, Hkv, D).transpose(1, 2).float()
    pos = torch.arange(keys.shape[2])
    bias = torch.where(pos[None, :] < ctx_lens[:, None], 0.0, float("-inf"))
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale + bias[:, None, None, :]
    return torch.matmul(scores.softmax(-1), vals).reshape(B, Hq, D).to(q.dtype)


# -- fused elementwise ops (duet_kernels/cpu/fused.cpp), each with its torch reference -----------

def rms_norm_ref(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def add_rms_norm_ref(x, residual, w, eps):
    residual = x + residual
    return rms_norm_ref(residual, w, eps), residual


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_ref(x, cos, sin):
    """x [T, heads, D]; cos/sin [T, D] fp32 (cast to x's dtype, as the model does)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
