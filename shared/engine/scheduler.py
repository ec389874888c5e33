"""Continuous batching with chunked prefill under a per-step token budget.

Every step, running sequences go first (a decode needs one token, an unfinished prefill
its next chunk), then waiting ones are admitted while the budget, the sequence cap and
free blocks allow. When blocks run out, the newest running sequence is preempted: its
blocks are freed and it is recomputed later (preemption by recompute).

With steps in flight (a pipelined group keeps one per stage), schedule(busy=...) skips
the sequences whose step has not come back, never preempts them, and takes at most
max_seqs sequences, so the steps in flight share the running ones between them.
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

    def schedule(self, busy: frozenset[int] = frozenset(),
                 max_seqs: int | None = None) -> ScheduledBatch:
        """The next step's sequences and token counts. busy: id()s of sequences whose
        step is in flight (skipped, never preempted); max_seqs: at most this many."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        cap = self.max_num_seqs if max_seqs is None else max_seqs
        i = 0
        while i < len(self.running) and budget > 0 and len(batch.seqs) < cap:
            seq = self.running[i]
            if id(seq) in busy:
                i += 1
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.bm.can_append(seq, n):
                victim = next((s for s in reversed(self.running[i + 1:]) if id(s) not in busy),
                              None)
                if victim is None:
                    break
                self.running.remove(victim)
                self._preempt(victim, batch)
            if not self.bm.can_append(seq, n):
                self.running.remove(seq)
                self._preempt(seq, batch)  # seq itself: nothing else to free
                break
            self.bm.append_slots(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not batch.preempted
               and len(self.running) < self.max_num_seqs and len(batch.seqs) < cap):
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
