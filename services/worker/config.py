"""Prefill/decode worker configuration, validated on construction."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from shared.config import EngineConfig
from shared.protocol import ROLES


@dataclass
class WorkerConfig:
    role: str = "both"
    gateway_addr: str = "ipc:///tmp/duet/gateway.sock"
    kvstore_addr: str | None = "ipc:///tmp/duet/kvstore.sock"
    worker_id: str = field(default_factory=lambda: f"w-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    engine: EngineConfig = field(default_factory=EngineConfig)
    heartbeat_s: float = 0.5
    # gateway silent for heartbeat_s * liveness -> reconnect. Generous: a gateway busy
    # with hundreds of streams may ping late, and a reconnect aborts in-flight work.
    liveness: int = 20
    curve_dir: str | None = None
    startup_timeout_s: float = 120.0     # how long to wait for the store at start
    kv_verify: str = "all"               # hand-off checksums to verify: all | sample | off
    kv_transport: str = "auto"           # auto | shm | cuda_ipc | tcp (reads over the wire)
    tp: int = 1                          # tensor-parallel ranks per pipeline stage
    pp: int = 1                          # pipeline stages
    group_timeout_s: float = 20.0        # a collective waiting longer: the group has failed
    group_connect_timeout_s: float = 30.0   # how long a rank waits to reach MASTER_ADDR
    core_share: str | None = None        # share the host's cores with the workers of this name
    # layer-wise hand-off: prefill announces prompts of at least this many uncached tokens
    # (PrefillStarted) and publishes their KV layer by layer; 0: never
    layerwise_min_tokens: int = 512
    prefetch_max_mb: int = 512           # decode over tcp: staging for layer-wise fetches

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {ROLES}")
        if self.role == "prefill" and not self.kvstore_addr:
            raise ValueError("role=prefill needs --kvstore-addr (prefill writes into the store)")
        if not 0.01 <= self.heartbeat_s <= 60:
            raise ValueError(f"heartbeat_s={self.heartbeat_s} must be in [0.01, 60]")
        for name in ("tp", "pp"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 1 <= v <= 64):
                raise ValueError(f"{name}={v!r} must be an integer in [1, 64]")
        if not 1 <= self.group_timeout_s <= 600:
            raise ValueError(f"group_timeout_s={self.group_timeout_s} must be in [1, 600]")
        if self.core_share is not None:
            from shared.cores import share_path
            share_path(self.core_share)   # a plain file name, or a ValueError naming it
            if self.engine.device != "cpu" or self.tp * self.pp > 1:
                raise ValueError(f"--core-share {self.core_share!r} is for single-process CPU "
                                 f"workers (device={self.engine.device}, tp={self.tp}, "
                                 f"pp={self.pp})")
        if self.layerwise_min_tokens < 0:
            raise ValueError(f"layerwise_min_tokens={self.layerwise_min_tokens} must be >= 0 "
                             f"(0: no layer-wise hand-offs)")
        if self.prefetch_max_mb < 0:
            raise ValueError(f"prefetch_max_mb={self.prefetch_max_mb} must be >= 0")
        if not 1 <= self.liveness <= 100:
            raise ValueError(f"liveness={self.liveness} must be in [1, 100]")
