"""Starting a group on one host: the leader (this process, rank 0) spawns ranks
1..T*P-1 as `python -m shared.parallel`, each told its place by the usual environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and the engine settings by
DUET_GROUP_CONFIG (JSON). Under torchrun, every rank is started for us instead, and the
ranks other than 0 run `python -m shared.parallel` themselves.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys

from shared.config import EngineConfig

log = logging.getLogger("duet.parallel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_env(config: EngineConfig, tp: int, pp: int, timeout_s: float,
              connect_timeout_s: float) -> str:
    return json.dumps({"engine": dataclasses.asdict(config), "tp": tp, "pp": pp,
                       "timeout_s": timeout_s, "connect_timeout_s": connect_timeout_s})


def spawn_followers(config: EngineConfig, tp: int, pp: int, timeout_s: float = 20.0,
                    connect_timeout_s: float = 30.0, master_addr: str = "127.0.0.1",
                    master_port: int | None = None, log_level: str = "INFO") -> list:
    """Start ranks 1..tp*pp-1 on this host; set this process's environment as rank 0."""
    port = master_port or free_port()
    world = tp * pp
    base = dict(os.environ, MASTER_ADDR=master_addr, MASTER_PORT=str(port),
                WORLD_SIZE=str(world), DUET_GROUP_PDEATHSIG="1", DUET_LOG_LEVEL=log_level,
                DUET_GROUP_CONFIG=group_env(config, tp, pp, timeout_s, connect_timeout_s))
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK="0", LOCAL_RANK="0")
    procs = []
    for r in range(1, world):
        env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, "-m", "shared.parallel"], env=env))
    return procs


def _die_with_parent() -> None:
    try:   # Linux: SIGKILL when the leader that spawned us dies, however it dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def follower_main() -> int:
    from shared.parallel.group import GroupError
    from shared.parallel.runner import build_rank, follow
    raw = os.environ.get("DUET_GROUP_CONFIG")
    rank = int(os.environ.get("RANK", "-1"))
    logging.basicConfig(level=os.environ.get("DUET_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s rank{rank}[%(process)d] %(levelname)s %(message)s")
    if not raw or rank < 1:
        print("python -m shared.parallel runs ranks 1.. of a group: set RANK >= 1 and "
              "DUET_GROUP_CONFIG (the leader does both)", file=sys.stderr)
        return 2
    if os.environ.get("DUET_GROUP_PDEATHSIG") == "1":
        _die_with_parent()
    spec = json.loads(raw)
    config = EngineConfig(**spec["engine"])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        state = build_rank(config, spec["tp"], spec["pp"], rank, spec["timeout_s"],
                           spec["connect_timeout_s"])
    except GroupError as e:
        log.error("%s", e)
        return 1
    try:
        reason = follow(state)
        log.info("rank %d stopping: %s", rank, reason or "the leader stopped the group")
        return 0
    except GroupError as e:
        log.error("%s; exiting", e)
        return 1
    finally:
        state.group.close()
