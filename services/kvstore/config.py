"""The KV-store service's settings, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import DTYPE_NAMES, cpu_has_fast_bf16

BIND_SCHEMES = ("tcp://", "ipc://", "inproc://")
BLOCK_SIZES = (8, 16, 32, 64, 128)
MAX_BLOCKS = 1 << 22
MAX_LEASE_TTL_S = 86_400.0


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class KVStoreConfig:
    """model_dir: an HF-style directory (config.json gives layers, KV heads,
    head dim). dtype 'auto' resolves as the engine's does on CPU. Unclaimed
    leases expire lease_ttl_s after creation. device: 'cpu' (the pool in host shm) or
    'cuda[:N]' (the pool in that GPU's memory, shared by CUDA IPC; generations in shm). curve_dir: CURVE key dir (server
    keys) or None for an open socket. metrics_port: Prometheus HTTP port or None."""

    model_dir: str
    bind: str = "ipc:///tmp/duet/kvstore.sock"
    dtype: str = "auto"
    num_blocks: int = 1024
    block_size: int = 16
    lease_ttl_s: float = 30.0
    curve_dir: str | None = None
    metrics_port: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        from services.kvstore.layout import parse_device
        parse_device(self.device)   # ValueError naming a bad device
        scheme = next((s for s in BIND_SCHEMES if str(self.bind).startswith(s)), "")
        _check(bool(scheme) and len(self.bind) > len(scheme),
               f"bind={self.bind!r} must be an address starting with one of {BIND_SCHEMES}")
        _check((Path(self.model_dir) / "config.json").is_file(),
               f"model_dir={str(self.model_dir)!r} is not a model directory (no config.json)")
        _check(self.dtype == "auto" or self.dtype in DTYPE_NAMES,
               f"dtype={self.dtype!r} is not supported; choose auto or one of {DTYPE_NAMES}")
        _check(isinstance(self.num_blocks, int) and 1 <= self.num_blocks <= MAX_BLOCKS,
               f"num_blocks={self.num_blocks} must be in [1, {MAX_BLOCKS}]")
        _check(self.block_size in BLOCK_SIZES, f"block_size={self.block_size} must be one of {BLOCK_SIZES}")
        _check(0 < self.lease_ttl_s <= MAX_LEASE_TTL_S,
               f"lease_ttl_s={self.lease_ttl_s} must be in (0, {MAX_LEASE_TTL_S:g}] seconds")
        _check(self.curve_dir is None or Path(self.curve_dir).is_dir(),
               f"curve_dir={self.curve_dir!r} is not a directory")
        _check(self.metrics_port is None or 1 <= self.metrics_port <= 65535,
               f"metrics_port={self.metrics_port} must be in [1, 65535]")

    def resolved_dtype(self) -> str:
        """The pool's element type ('auto': bf16 on a GPU, or where the CPU has fast bf16;
        else fp32)."""
        if self.dtype != "auto":
            return self.dtype
        if self.device != "cpu":
            return "bfloat16"
        return "bfloat16" if cpu_has_fast_bf16() else "float32"

    @property
    def expire_interval_s(self) -> float:
        """How often the service looks for expired leases."""
        return min(1.0, self.lease_ttl_s / 4)
