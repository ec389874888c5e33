"""Running one engine step across a TP/PP group.

The leader (global rank 0) owns the engine: scheduler, block tables, sampler. For each step
it broadcasts the packed inputs (a `Step` command); every rank runs its layers and heads
over its own KV slice; stages pass activations on; the last stage gathers the vocabulary
shards' logits and sends them to the leader, which samples. Block ids are the leader's:
every rank's cache has the same blocks, each holding that rank's layers and heads.

A decode hand-off is a `LoadKV`: each rank copies its own (layer range, head range) slice
of the store's blocks into its cache; a prefill writes each rank's slice of the store's
blocks in place. Either ends in a barrier, so the leader fences and commits only once
every rank has copied or written.
"""
from __future__ import annotations

import logging
import os
import time

import msgspec
import torch

from shared.config import EngineConfig
from shared.engine.kv_cache import LocalKVCache, StoreKVCache
from shared.engine.model_runner import ModelRunner, StepInputs, prepare_step
from shared.engine.sampler import argmax_suffices
from shared.parallel.group import (AttachPool, Group, GroupError, LoadBlocks, LoadKV, Ping, Step,
                                   Stop)
from shared.parallel.shape import Shard
from shared.parallel.sharded import ShardedLlama, load_sharded

log = logging.getLogger("duet.parallel")
MICRO_BATCH_MIN_TOKENS = 64   # steps with fewer tokens run whole through the pipeline
KEEPALIVE_S = 1.0   # an idle leader pings this often: followers' waits stay inside the timeout


def split_step(step: StepInputs, parts: int) -> list[StepInputs]:
    """The step's tokens in `parts` contiguous micro-batches of about equal size; a cut may
    fall inside a sequence's chunk (its first part's KV is written at each stage before
    its second part attends to it, since every stage runs the parts in order). Every rank
    splits a step the same way."""
    total = len(step.token_ids)
    parts = max(1, min(parts, total))
    if parts == 1:
        return [step]
    cuts = [total * k // parts for k in range(parts + 1)]
    due = set(step.last_rows)
    out = []
    for t0, t1 in zip(cuts, cuts[1:]):
        q_lens, ctx_lens, tables, rows = [], [], [], []
        start = 0
        for q, ctx, table in zip(step.q_lens, step.ctx_lens, step.block_tables):
            a, b = max(start, t0), min(start + q, t1)   # this sequence's tokens in the part
            if a < b:
                q_lens.append(b - a)
                ctx_lens.append(ctx - (start + q - b))
                tables.append(table)
                if b - 1 in due:
                    rows.append(sum(q_lens) - 1)
            start += q
        out.append(StepInputs(step.token_ids[t0:t1], step.positions[t0:t1], q_lens, ctx_lens,
                              tables, rows, []))
    return out


class InFlight:
    """A step this rank has done its layers of: the sends still on their way, the logits
    (or greedy tokens) it holds (the last stage's leader rank) and the parts whose logits
    come later."""

    def __init__(self, parts: list[StepInputs], argmax: bool):
        self.parts, self.argmax, self.pending, self.logits = parts, argmax, [], []


def run_step(group: Group, model: ShardedLlama, runner: ModelRunner,
             step: StepInputs, micro_batches: int = 1, argmax: bool = False) -> torch.Tensor | None:
    """This rank's part of one step; the leader gets logits [N, vocab] fp32 (N: the
    sequences due a token), or with argmax (PP > 1, every row greedy) the last stage's
    argmax tokens [N] int64 instead; every other rank None.

    With pipeline stages, the step's sequences go through in micro-batches: a stage sends
    one micro-batch on (without waiting for it to land) and starts the next, so stage s
    works on micro-batch i while stage s+1 works on micro-batch i-1. Every stage takes its
    micro-batches in order, so a KV block written by one is in place for the next."""
    return finish_step(group, model,
                       start_step(group, model, runner, step, micro_batches, argmax))


def start_step(group: Group, model: ShardedLlama, runner: ModelRunner, step: StepInputs,
               micro_batches: int = 1, argmax: bool = False) -> InFlight:
    """This rank's layers of a step, up to where the leader would wait for the later
    stages' logits: it may start the next step meanwhile (cross-step pipelining)."""
    sh, dev = group.shard, model.device
    inflight = InFlight(split_step(step, micro_batches if sh.pp > 1 else 1),
                        argmax and sh.pp > 1)
    pending, logits = inflight.pending, inflight.logits
    with torch.inference_mode():
        for part in inflight.parts:
            attn = runner.attention(part)
            positions = torch.tensor(part.positions, device=dev)
            if sh.first_stage:
                x, residual = model.embed(torch.tensor(part.token_ids, device=dev)), None
            else:
                x, residual = group.recv_activations(len(part.token_ids),
                                                     model.config.hidden_size, model.dtype)
            x, residual = model.run_layers(x, residual, positions, attn)
            if not sh.last_stage:
                pending.append(group.send_activations(x, residual))
                continue
            if part.last_rows:
                idx = torch.tensor(part.last_rows, device=dev)
                hidden = model.final_norm(x[idx], residual[idx])
                full = group.gather_vocab(model.logits_shard(hidden), model.config.vocab_size)
                if full is None:        # another rank of the last stage holds them
                    continue
                if sh.pp == 1:          # the leader is the last stage
                    logits.append(full)
                else:                   # on to the leader: [N] tokens if greedy, else logits
                    pending.append(group.send_to_leader(
                        full.argmax(-1) if inflight.argmax else full))
    return inflight


def finish_step(group: Group, model: ShardedLlama, inflight: InFlight) -> torch.Tensor | None:
    """The rest of a started step: the leader receives what the last stage computed; every
    rank's sends are waited for."""
    sh, logits = group.shard, inflight.logits
    if sh.rank == 0 and sh.pp > 1:
        for part in inflight.parts:
            if part.last_rows:
                n, vocab = len(part.last_rows), model.config.vocab_size
                logits.append(group.recv_from_last([n], torch.int64) if inflight.argmax
                              else group.recv_from_last([n, vocab], torch.float32))
    for work in inflight.pending:
        group.wait(work)
    if sh.rank != 0 or not logits:
        return None
    return logits[0] if len(logits) == 1 else torch.cat(logits)


def _step_command(engine: str, s: StepInputs, micro_batches: int, argmax: bool) -> Step:
    return Step(engine, s.token_ids, s.positions, s.q_lens, s.ctx_lens,
                [list(t) for t in s.block_tables], s.last_rows, micro_batches, argmax)


def _step_inputs(cmd: Step) -> StepInputs:
    return StepInputs(cmd.token_ids, cmd.positions, cmd.q_lens, cmd.ctx_lens, cmd.block_tables,
                      cmd.last_rows, [])


class RankState:
    """What every rank keeps: its model, its own paged cache, the store pool slice."""

    def __init__(self, group: Group, model: ShardedLlama, config: EngineConfig):
        self.group, self.model, self.config = group, model, config
        sh = group.shard
        l0, l1 = sh.layers
        self.cache = LocalKVCache(model.local, config.num_kv_blocks, config.block_size,
                                  model.dtype, config.device, num_layers=l1 - l0,
                                  layer_offset=l0, head_offset=sh.kv_heads[0])
        backend = config.resolved_attention_backend()
        self.runners = {"decode": ModelRunner(model, self.cache, config.device, backend)}
        self.pool_info = None
        self.pool = self.generations = None

    def attach(self, info, pool=None) -> StoreKVCache:
        """Map the store's pool (the leader passes the one it mapped) and attend over this
        rank's slice of it in prefill steps."""
        from services.kvstore.layout import close_pool, open_pool
        old = self.pool_info if pool is None else None
        if pool is None:
            pool, self.generations = open_pool(info)
        self.pool_info, self.pool = info, pool
        cache = StoreKVCache(pool, self.group.shard.kv_heads)
        self.runners["prefill"] = ModelRunner(self.model, cache, self.config.device,
                                              self.config.resolved_attention_backend())
        if old is not None and old.handle.base != info.handle.base:
            close_pool(old)
        return cache

    def load_kv(self, src: list[int], dst: list[int]) -> None:
        self.cache.load_from_store(self.pool, src, dst)
        if self.pool.is_cuda:
            torch.cuda.current_stream(self.pool.device).synchronize()
        self.group.barrier()

    def load_blocks(self, blocks: torch.Tensor, dst: list[int]) -> None:
        for i, d in enumerate(dst):
            self.cache.load_block(blocks[i], d)

    def step(self, engine: str, step: StepInputs, micro_batches: int = 1,
             argmax: bool = False) -> torch.Tensor | None:
        return self.finish(engine, self.start(engine, step, micro_batches, argmax))

    def start(self, engine: str, step: StepInputs, micro_batches: int = 1,
              argmax: bool = False) -> InFlight:
        return start_step(self.group, self.model, self.runners[engine], step, micro_batches,
                          argmax)

    def finish(self, engine: str, inflight: InFlight) -> torch.Tensor | None:
        logits = finish_step(self.group, self.model, inflight)
        if engine == "prefill":   # every rank's KV is in the store before the leader commits
            if self.pool is not None and self.pool.is_cuda:
                torch.cuda.current_stream(self.pool.device).synchronize()
            self.group.barrier()
        return logits


class GroupRunner:
    """The leader's runner for one engine (decode or prefill): the LLMEngine calls run(),
    or, `depth` steps in flight at once, submit() and later collect() (pipelining)."""

    def __init__(self, leader: "GroupLeader", engine: str):
        self.leader, self.engine = leader, engine

    @property
    def depth(self) -> int:
        """Steps the engine may keep in flight: one per pipeline stage, so every stage has
        a step to work on (decode; prefill steps end in a barrier before the commit)."""
        pp = self.leader.group.shard.pp
        return pp if self.engine == "decode" and self.leader.pipeline_decode else 1

    def run(self, batch):
        return self.collect(self.submit(batch))

    def submit(self, batch):
        step = prepare_step(batch)
        mb = self.leader.micro_batches_for(step)
        # with PP, a step whose every token is a plain greedy one is sampled where its
        # logits are: the last stage sends [N] tokens to the leader, not [N, vocab] logits
        argmax = self.leader.sample_on_last and self.leader.shape[1] > 1 \
            and argmax_suffices(step.samplers)
        self.leader.group.send_command(_step_command(self.engine, step, mb, argmax))
        t0 = time.perf_counter()
        inflight = self.leader.rank.start(self.engine, step, mb, argmax)
        self.leader.step_s += time.perf_counter() - t0
        return step, inflight

    def collect(self, submitted):
        step, inflight = submitted
        t0 = time.perf_counter()
        logits = self.leader.rank.finish(self.engine, inflight)
        self.leader.wait_s += time.perf_counter() - t0
        if logits is None:
            return torch.empty(0), []
        return logits.cpu(), step.samplers


class LeaderCache:
    """The decode engine's cache as the leader sees it: its own slice, and hand-offs that
    every rank copies (LoadKV) before the leader's fence."""

    def __init__(self, leader: "GroupLeader"):
        self.leader = leader
        c = leader.rank.cache
        self.num_blocks, self.block_size, self.tensor = c.num_blocks, c.block_size, c.tensor

    def layer(self, layer: int):
        return self.leader.rank.cache.layer(layer)

    def load_from_store(self, pool, src_blocks: list[int], dst_blocks: list[int]) -> None:
        src, dst = [int(b) for b in src_blocks], [int(b) for b in dst_blocks]
        self.leader.group.send_command(LoadKV(src, dst))
        self.leader.rank.load_kv(src, dst)

    def load_block(self, block, dst: int) -> None:
        self.load_blocks(block.unsqueeze(0), [dst])

    def load_blocks(self, blocks: torch.Tensor, dst: list[int]) -> None:
        """A tcp hand-off: whole blocks [n, L, 2, bs, H, D] the leader read over the wire
        go to every rank in one broadcast; each copies its (layer, head) slice."""
        blocks = blocks.contiguous()
        self.leader.group.send_command(LoadBlocks([int(d) for d in dst], list(blocks.shape),
                                                  str(blocks.dtype).replace("torch.", "")))
        self.leader.group.broadcast_bytes(blocks)
        self.leader.rank.load_blocks(blocks, dst)


class GroupLeader:
    """Global rank 0: the only ZeroMQ face of the group; drives the followers."""

    def __init__(self, rank: RankState, procs: list | None = None, micro_batches: int = 2,
                 pipeline_decode: bool = True):
        self.rank, self.group = rank, rank.group
        self.micro_batches = micro_batches   # per step, with PP > 1 ...
        self.micro_batch_min_tokens = MICRO_BATCH_MIN_TOKENS   # ... of at least this many tokens
        self.pipeline_decode = pipeline_decode   # decode keeps PP steps in flight
        self.sample_on_last = True    # greedy steps: the last stage sends tokens, not logits
        self.procs = procs or []      # follower processes this leader spawned (same host)
        self.step_s = 0.0             # the leader's own share of the steps
        self.wait_s = 0.0             # waiting for the last stage's logits: the bubble
        self.stopped = self.failed = False

    def micro_batches_for(self, step: StepInputs) -> int:
        """Micro-batches pay where a step is compute-bound (prefill chunks, big batches): a
        stage's second pass over its weights costs little next to the overlap it buys. A
        small decode step is bound by reading the weights, and each micro-batch reads them
        again (measured on SmolLM2 PP=2, 8 streams: 212 tok/s in one, 162 in two)."""
        if self.group.shard.pp == 1 or len(step.token_ids) < self.micro_batch_min_tokens:
            return 1
        return self.micro_batches

    @property
    def shape(self) -> tuple[int, int]:
        return self.group.shard.tp, self.group.shard.pp

    def runner(self, engine: str) -> GroupRunner:
        return GroupRunner(self, engine)

    def attach_pool(self, info, pool) -> StoreKVCache:
        self.group.send_command(AttachPool(msgspec.msgpack.encode(info)))
        return self.rank.attach(info, pool)

    def rank_health(self) -> list[dict]:
        """Each rank: alive (its process runs; for ranks this leader did not spawn, as far
        as the last collective showed)."""
        out = [{"rank": 0, "alive": True, "pid": os.getpid()}]
        for r, p in enumerate(self.procs, start=1):
            code = p.poll() if p is not None else None
            out.append({"rank": r, "alive": code is None, "pid": p.pid if p else None,
                        **({"exit_code": code} if code is not None else {})})
        return out

    def tick(self) -> None:
        """Between steps: a dead rank process fails the group now; an idle group is pinged
        so that no follower's wait reaches the collective timeout."""
        for r, p in enumerate(self.procs, start=1):
            if p is not None and p.poll() is not None:
                self.failed = True
                raise GroupError(f"rank {r} (pid {p.pid}) of the TP={self.shape[0]} x "
                                 f"PP={self.shape[1]} group exited with code {p.returncode}")
        if time.monotonic() - self.group.last_command > KEEPALIVE_S:
            self.group.send_command(Ping())

    def stop(self, reason: str = "") -> None:
        """Stop every rank: politely when the group is whole, by signal when a rank failed
        (a collective with a dead peer could wait out the timeout)."""
        if self.stopped:
            return
        self.stopped = True
        if not self.failed and not self.group.failed:
            try:
                self.group.send_command(Stop(reason))
            except GroupError as e:
                log.warning("stopping the group: %s", e)
        else:
            for p in self.procs:
                if p is not None and p.poll() is None:
                    p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                p.kill()
                p.wait()
        self.group.close()


def follow(rank: RankState) -> str:
    """A follower's loop: apply the leader's commands until Stop (or the group fails:
    GroupError). Returns the stop reason."""
    from shared import protocol as P
    group = rank.group
    while True:
        cmd = group.recv_command()
        if isinstance(cmd, Step):
            rank.step(cmd.engine, _step_inputs(cmd), cmd.micro_batches, cmd.argmax)
        elif isinstance(cmd, LoadKV):
            rank.load_kv(cmd.src, cmd.dst)
        elif isinstance(cmd, LoadBlocks):
            blocks = torch.empty(cmd.shape, dtype=getattr(torch, cmd.dtype))
            rank.load_blocks(group.broadcast_bytes(blocks), cmd.dst)
        elif isinstance(cmd, AttachPool):
            rank.attach(msgspec.msgpack.decode(cmd.info, type=P.KVPoolInfo))
        elif isinstance(cmd, Stop):
            return cmd.reason
        # Ping: nothing to do; it kept our wait inside the timeout


def group_threads(config: EngineConfig, world: int) -> int:
    """Torch threads per rank: the configured count, else the cores split over the ranks."""
    return config.threads or max(1, (os.cpu_count() or 1) // world)


def build_rank(config: EngineConfig, tp: int, pp: int, rank: int, timeout_s: float = 20.0,
               connect_timeout_s: float = 30.0) -> RankState:
    """Join the group (environment: MASTER_ADDR/PORT) and load this rank's shard."""
    from shared.models.config import ModelConfig
    from shared.models.hub import resolve_model
    path = resolve_model(config.model)
    cfg = ModelConfig.from_dir(path)
    shard = Shard.of(cfg, tp, pp, rank)
    if config.device == "cuda":   # one GPU per rank, by its place on this host
        import dataclasses
        local = int(os.environ.get("LOCAL_RANK", rank))
        config = dataclasses.replace(config, device=f"cuda:{local}")
        torch.cuda.set_device(local)
    if config.device == "cpu":
        torch.set_num_threads(group_threads(config, tp * pp))
    group = Group(shard, config.device, timeout_s, connect_timeout_s)
    try:
        model = load_sharded(path, shard, config.resolved_dtype(), config.device,
                             max_positions=config.max_model_len)
        model.set_reduce(group.all_reduce if tp > 1 else None)
        from shared.engine.packed_linear import pack_linears
        pack_linears(model)
        if config.device == "cpu":
            from duet_kernels import cpu_kernels
            cpu_kernels.load()
        log.info("%s of tp=%d pp=%d ready", shard.describe(), tp, pp)
        return RankState(group, model, config)
    except BaseException:
        group.close()
        raise


def build_group_engine(config: EngineConfig, tp: int, pp: int, procs: list | None = None,
                       timeout_s: float = 20.0, connect_timeout_s: float = 30.0,
                       micro_batches: int = 2, pipeline_decode: bool = True):
    """The leader's LLMEngine over a group (this process is rank 0)."""
    import dataclasses

    from shared.engine.engine import LLMEngine
    from shared.models.hub import resolve_model
    from shared.models.loader import generation_eos_ids
    from shared.tokenization import Tokenizer
    if config.device.startswith("cuda"):
        config = dataclasses.replace(config, enforce_eager=True)   # no CUDA graphs in groups yet
    rank = build_rank(config, tp, pp, 0, timeout_s, connect_timeout_s)
    leader = GroupLeader(rank, procs, micro_batches, pipeline_decode)
    path = resolve_model(config.model)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    eos = generation_eos_ids(path, rank.model.config)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = tuple(sorted(set(eos) | {tokenizer.eos_token_id}))
    engine = LLMEngine(rank.model, dataclasses.replace(config, threads=group_threads(config, tp * pp)),
                       eos, tokenizer, kv_cache=LeaderCache(leader),
                       runner=leader.runner("decode"))
    return engine
