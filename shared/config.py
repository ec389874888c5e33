"""Validated configuration objects, one per service (engine first; services add theirs)."""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class EngineConfig:
    """The model runner's settings. `dtype='auto'` picks the fastest correct one."""
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None     # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    threads: int | None = None           # CPU threads for torch; default: all cores
    attention_backend: str = "auto"      # auto: triton on CUDA, torch on CPU
    enforce_eager: bool = False          # CUDA: never capture or replay CUDA graphs
    cuda_graph_max_batch: int = 32       # largest decode batch replayed from a graph
    cuda_graph_max_tokens: int = 512     # largest prefill/mixed step replayed; 0: none

    def __post_init__(self):
        _check(self.dtype == "auto" or self.dtype in DTYPE_NAMES,
               f"dtype={self.dtype!r} is not supported; choose auto or one of {DTYPE_NAMES}")
        _check(self.block_size in (8, 16, 32, 64, 128),
               f"block_size={self.block_size} must be one of 8, 16, 32, 64, 128")
        _check(self.num_kv_blocks >= 1, f"num_kv_blocks={self.num_kv_blocks} must be >= 1")
        _check(1 <= self.max_num_seqs <= 4096, f"max_num_seqs={self.max_num_seqs} must be in [1, 4096]")
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        _check(self.max_model_len is None or self.max_model_len >= 1,
               f"max_model_len={self.max_model_len} must be >= 1")
        _check(self.threads is None or self.threads >= 1, f"threads={self.threads} must be >= 1")
        _check(self.attention_backend in ATTENTION_BACKENDS,
               f"attention_backend={self.attention_backend!r} is not supported; "
               f"choose one of {ATTENTION_BACKENDS}")
        _check(isinstance(self.enforce_eager, bool),
               f"enforce_eager={self.enforce_eager!r} must be True or False")
        _check(1 <= self.cuda_graph_max_batch <= 1024,
               f"cuda_graph_max_batch={self.cuda_graph_max_batch} must be in [1, 1024]")
        _check(0 <= self.cuda_graph_max_tokens <= 8192,
               f"cuda_graph_max_tokens={self.cuda_graph_max_tokens} must be in [0, 8192]")

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        # bf16 on CUDA, and on CPUs Duet's bf16 linear runs on (AVX-512 BF16, or AVX2 with
        # FMA: half the weight bytes of fp32 to stream, `python tools/bench_linear.py`);
        # fp32 elsewhere.
        if self.device.startswith("cuda") or cpu_has_fast_bf16():
            return "bfloat16"
        return "float32"

    def resolved_attention_backend(self) -> str:
        """'torch' or 'triton'. Triton kernels on CPU run their torch references (or the
        interpreter under TRITON_INTERPRET=1), so 'auto' keeps CPU on the faster torch path."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.device.startswith("cuda") else "torch"

    @property
    def use_cuda_graphs(self) -> bool:
        return (self.device.startswith("cuda") and not self.enforce_eager
                and self.resolved_attention_backend() == "triton")


def cpu_bf16_isa() -> str:
    """Which instruction set a bf16 linear on this CPU runs on: 'avx512_bf16' (AMX CPUs
    have it too), 'avx2_fma' (bf16 widened to fp32, then FMA), or '' (none fast)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return ""
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return "avx512_bf16"
    if {"avx2", "fma"} <= flags:
        return "avx2_fma"
    return ""


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16_isa() != ""
