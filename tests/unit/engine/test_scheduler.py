"""Scheduler: what each step contains, under the token budget, the sequence cap and
the block supply; preemption by recompute."""
from __future__ import annotations

from shared.engine.block_manager import BlockManager
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Sequence, SeqStatus

P = SamplingParams(temperature=0, max_tokens=4)


def seq(n, rid) -> Sequence:
    return Sequence(rid, list(range(100, 100 + n)), P)


def contents(batch):
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_tokens)]


def run_step(batch, sample=True):
    """What the engine does after the model ran: mark computed, append a token where due."""
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed_tokens += n
        if sample and s.num_computed_tokens == len(s):
            s.append_token(7)


def test_chunked_prefill_under_the_token_budget_then_decode_first():
    sch = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(14, "a"), seq(3, "b")
    sch.add(a)
    sch.add(b)
    s1 = sch.schedule()
    assert contents(s1) == [("a", 10)] and a.block_table == [0, 1, 2]
    run_step(s1)                                      # a: 10 of 14, no token yet
    s2 = sch.schedule()
    assert contents(s2) == [("a", 4), ("b", 3)] and b.block_table == [4]
    assert a.block_table == [0, 1, 2, 3]
    run_step(s2)                                      # both sampled a token
    s3 = sch.schedule()
    assert contents(s3) == [("a", 1), ("b", 1)]       # running decodes go first
    assert a.block_table == [0, 1, 2, 3]              # token 15 still fits block 3


def test_the_sequence_cap_holds_back_waiting_requests():
    sch = Scheduler(BlockManager(32, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        sch.add(seq(2, rid))
    first = sch.schedule()
    assert contents(first) == [("a", 2), ("b", 2)] and [s.request_id for s in sch.waiting] == ["c"]
    run_step(first)
    sch.finish(sch.running[0], "stop")
    assert contents(sch.schedule()) == [("b", 1), ("c", 2)]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(8, "a"), seq(8, "b")                  # 2 blocks each: the pool is full
    sch.add(a)
    sch.add(b)
    s1 = sch.schedule()
    assert contents(s1) == [("a", 8), ("b", 8)] and bm.num_free_blocks == 0
    run_step(s1)                                      # each needs a 3rd block for token 9
    s2 = sch.schedule()
    assert contents(s2) == [("a", 1)] and [s.request_id for s in s2.preempted] == ["b"]
    assert a.block_table == [0, 1, 2] and b.block_table == [] and b.status == SeqStatus.WAITING
    assert b.num_computed_tokens == 0 and len(b) == 9   # recomputed with its sampled token
    assert sch.num_preemptions == 1
    run_step(s2)
    sch.finish(a, "length")
    s3 = sch.schedule()
    assert contents(s3) == [("b", 9)] and bm.num_free_blocks == 1


def test_finish_frees_blocks_wherever_the_sequence_is():
    bm = BlockManager(8, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    a, b = seq(6, "a"), seq(6, "b")
    sch.add(a)
    sch.add(b)
    sch.schedule()                                    # a running (4 of 6), b waiting
    sch.finish(b, "abort")
    sch.finish(a, "abort")
    sch.finish(a, "abort")                            # twice is harmless
    assert bm.num_free_blocks == 8 and not sch.has_unfinished()
    assert (a.finish_reason, b.finish_reason) == ("abort", "abort")


def test_steps_in_flight_share_the_running_sequences_and_are_never_preempted():
    """A pipelined group keeps a step per stage in flight: the next step takes only the
    sequences not in flight (at most max_seqs of them), and running out of blocks preempts
    the newest one not in flight."""
    sch = Scheduler(BlockManager(5, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c, d = seqs = [seq(4, rid) for rid in "abcd"]   # one full block each
    for s in seqs:
        sch.add(s)
    first = sch.schedule(max_seqs=2)
    assert contents(first) == [("a", 4), ("b", 4)]
    second = sch.schedule(busy=frozenset(id(s) for s in first.seqs), max_seqs=2)
    assert contents(second) == [("c", 4), ("d", 4)] and sch.bm.num_free_blocks == 1
    run_step(first)
    run_step(second)                                # each has a 5th token: a 2nd block due
    in_flight = sch.schedule(busy=frozenset(id(s) for s in (a, b, c)), max_seqs=1)
    assert contents(in_flight) == [("d", 1)] and sch.bm.num_free_blocks == 0
    # d's step is in flight: a takes c's block (c is the newest not in flight), b has none
    # left but its own, and d, newest of all, is never touched
    third = sch.schedule(busy=frozenset([id(d)]), max_seqs=3)
    assert contents(third) == [("a", 1)] and third.preempted == [c, b]
    assert d.status == SeqStatus.RUNNING and sch.running == [a, d]
