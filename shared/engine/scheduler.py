"""Continuous batching with chunked prefill under a per-step token budget.

Every step, running sequences go first (a decode needs one token, an unfinished prefill
its next chunk), then waiting ones are admitted while the budget, the sequence cap and
free blocks allow. When blocks run out, the newest running sequence is preempted: its
blocks are freed and it is recomputed later (preemption by recompute).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared.engine.block_manager import BlockManager
from shared.engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed this step, per seq
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_queued_tokens(self) -> int:
        return sum(s.num_uncomputed for s in self.waiting)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.bm.can_append(seq, n) and self.running[-1] is not seq:
                self._preempt(self.running.pop(), batch)
            if not self.bm.can_append(seq, n):
                self._preempt(self.running.pop(), batch)  # seq itself: nothing else to free
                break
            self.bm.append_slots(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not batch.preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            cached = self.bm.get_cached_prefix(seq)
            n = min(len(seq) - len(cached) * self.bm.block_size, budget)
            if not self.bm.can_allocate(seq, n, cached):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, n, cached)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give back every block, wherever the sequence is."""
        if seq.status == SeqStatus.FINISHED:
            return
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
