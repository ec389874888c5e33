"""Routing policy: which prefill worker, which decode worker. Pure: no sockets."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shared.engine.block_hash import chain_hash


@dataclass
class WorkerInfo:
    identity: bytes
    worker_id: str
    role: str
    total_blocks: int
    free_blocks: int
    block_size: int = 16
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0
    inflight: set = field(default_factory=set)      # request ids routed here, not finished
    assigned_tokens: int = 0                          # prompt tokens routed since last heartbeat
    draining: bool = False
    pending_role: tuple[str, float] | None = None    # (role, monotonic deadline) just set
    prefill_steps: int = 0
    decode_steps: int = 0
    max_seqs: int = 64                               # sequences it runs at once
    incarnation: str = ""                            # its process's (a restart has another)
    handoffs: int = 0                                # KV hand-offs offered to it (decode)
    tp: int = 1                                      # its group's shape
    pp: int = 1
    ranks_alive: list = field(default_factory=list)  # per rank, from its heartbeats
    kv_transport: str = ""                           # shm, cuda_ipc or tcp (reads over the wire)

    def as_dict(self) -> dict:
        return {"worker_id": self.worker_id, "role": self.role, "free_blocks": self.free_blocks,
                "total_blocks": self.total_blocks, "running": self.running,
                "waiting": self.waiting, "queued_tokens": self.queued_tokens,
                "inflight": len(self.inflight), "draining": self.draining,
                "prefill_steps": self.prefill_steps, "decode_steps": self.decode_steps,
                "incarnation": self.incarnation, "tp": self.tp, "pp": self.pp,
                "handoffs": self.handoffs, "kv_transport": self.kv_transport,
                "ranks_alive": list(self.ranks_alive) or [True] * (self.tp * self.pp)}


class Router:
    """Prefill: fewest queued tokens, preferring the worker that last saw the prompt's
    first block (its prefix is likelier warm in the store's index and caches).
    Decode: most free blocks, then smallest running batch."""

    def __init__(self, affinity_max: int = 65536):
        self.workers: dict[bytes, WorkerInfo] = {}
        # first-block hash -> prefill worker, least recently used first; bounded, so that a
        # gateway serving endless distinct prompts does not grow without end
        self.affinity: OrderedDict[bytes, bytes] = OrderedDict()
        self.affinity_max = affinity_max

    def candidates(self, roles: tuple[str, ...]) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.role in roles and not w.draining]

    def pick_prefill(self, prompt_ids: list[int]) -> WorkerInfo | None:
        cands = self.candidates(("prefill",))
        if not cands:
            return None
        load = {w.identity: w.queued_tokens + w.assigned_tokens for w in cands}
        key = chain_hash(None, prompt_ids[:16]) if len(prompt_ids) >= 16 else None
        sticky = self.workers.get(self.affinity.get(key)) if key else None
        best = min(cands, key=lambda w: (load[w.identity], w.worker_id))
        # stick to the prefix's worker unless it is clearly busier than the best one
        if sticky in cands and load[sticky.identity] <= load[best.identity] + 2048:
            best = sticky
        if key:
            self.affinity[key] = best.identity
            self.affinity.move_to_end(key)
            if len(self.affinity) > self.affinity_max:
                self.affinity.popitem(last=False)
        best.assigned_tokens += len(prompt_ids)
        return best

    def pick_decode(self, num_tokens: int, roles=("decode", "both"),
                    exclude: set[str] = frozenset(), reserve: bool = True) -> WorkerInfo | None:
        """`exclude`: incarnations already tried (a restarted worker is a new one).
        reserve: count the blocks as taken until its next heartbeat (False: just look)."""
        cands = [w for w in self.candidates(roles) if w.incarnation not in exclude]
        if not cands:
            return None
        bs = cands[0].block_size
        need = -(-num_tokens // bs)
        fits = [w for w in cands if w.free_blocks >= need] or cands
        best = max(fits, key=lambda w: (w.free_blocks, -w.running - len(w.inflight), w.worker_id))
        if reserve:
            self.reserve(best, num_tokens)
        return best

    @staticmethod
    def reserve(w: WorkerInfo, num_tokens: int) -> None:
        """Its blocks for num_tokens count as taken until its next heartbeat says."""
        w.free_blocks = max(w.free_blocks - -(-num_tokens // w.block_size), 0)

    def capacity(self) -> int:
        """How many requests the mesh runs at once: every admitted request ends up in a
        decode slot ('both' workers only when colocated)."""
        roles = ("decode", "both") if self.disaggregated else ("both",)
        return sum(w.max_seqs for w in self.candidates(roles))

    @property
    def disaggregated(self) -> bool:
        return bool(self.candidates(("prefill",))) and bool(self.candidates(("decode", "both")))
