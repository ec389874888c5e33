"""LLMEngine: the in-process core that prefill and decode workers wrap.

    step() = schedule -> run the model -> sample -> update sequences

A runner with depth > 1 (a pipeline-parallel group's decode) keeps that many steps in
flight over disjoint sequences: step() submits the next one, and once the pipeline is
full (or nothing more can go in) takes the oldest one back, so every stage has work while
the leader waits for the last.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from shared.config import EngineConfig
from shared.engine.block_manager import BlockManager, blocks_for
from shared.engine.guided import Guides
from shared.engine.kv_cache import LocalKVCache
from shared.engine.model_runner import ModelRunner
from shared.engine.outputs import RequestOutput
from shared.engine.packed_linear import pack_linears
from shared.engine.sampler import SampleResult, sample
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledBatch, Scheduler
from shared.engine.sequence import Sequence, SeqStatus
from shared.models.llama import LlamaForCausalLM

log = logging.getLogger("duet.engine")


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0
    decode_tokens: int = 0
    max_in_flight: int = 0      # steps in flight at once, at most (a pipelined group's)


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig,
                 eos_token_ids: tuple[int, ...] = (), tokenizer=None,
                 block_manager=None, kv_cache=None, runner=None):
        """By default the engine owns its blocks and cache; a prefill worker passes the
        KV-store's pool (StoreKVCache) and a LeasedBlockManager instead; the leader of a
        TP/PP group passes its runner (shared/parallel/runner.py), which steps every rank."""
        if config.device == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        mc = model.config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 model.max_positions)
        self.block_manager = block_manager or BlockManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        if kv_cache is None:
            kv_cache = LocalKVCache(mc, config.num_kv_blocks, config.block_size,
                                    model.dtype, config.device)
        self.kv_cache = kv_cache
        pack_linears(model)   # bf16 on CPU: weights prepacked once (idempotent)
        if model.device.type == "cpu":
            # built (or loaded) now, not inside the first step: a fresh build takes a minute,
            # which a worker's first step must not (the gateway would call it stuck)
            from duet_kernels import cpu_kernels
            cpu_kernels.load()
        self.runner = runner or build_runner(model, kv_cache, config, self.max_model_len)
        self.group = getattr(runner, "leader", None)   # the GroupLeader of a TP/PP group
        self.requests: dict[str, list[Sequence]] = {}
        self.stats = EngineStats()
        # called with each scheduled batch, a context manager around running it (the
        # layer-wise hand-off publishes per layer inside it); None: nobody watches
        self.step_observer: Callable[[ScheduledBatch], ContextManager] | None = None
        self.in_flight: deque = deque()   # (batch, what runner.submit returned), oldest first
        self.guides = Guides(tokenizer, mc.vocab_size, tuple(sorted(self.eos_token_ids)))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Resolve the model (preparing a built-in on first use) and load it."""
        from shared.models.hub import resolve_model
        from shared.models.loader import generation_eos_ids, load_model
        from shared.tokenization import Tokenizer

        path = resolve_model(config.model)
        model = load_model(path, config.resolved_dtype(), config.device,
                           max_positions=config.max_model_len)
        tokenizer = Tokenizer(path)
        eos = generation_eos_ids(path, model.config)
        if tokenizer.eos_token_id is not None:
            eos = tuple(sorted(set(eos) | {tokenizer.eos_token_id}))
        return cls(model, config, eos, tokenizer)

    # -- requests -------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the limit a request would break."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is required")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is out of range [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; this model's context is "
                             f"{self.max_model_len} tokens (prompt must be shorter)")
        need = blocks_for(min(len(prompt_ids) + params.max_tokens, self.max_model_len),
                          self.config.block_size)
        if need > self.config.num_kv_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} KV blocks; the cache has "
                             f"{self.config.num_kv_blocks}")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival: float | None = None) -> None:
        """Queue a request (n choices)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params.validate()
        self.check_prompt(prompt_ids, params)
        arrival = time.monotonic() if arrival is None else arrival
        seqs = [Sequence(request_id, prompt_ids, params, i, arrival) for i in range(params.n)]
        if params.guided_kind is not None:
            for s in seqs:
                s.guide = self.guides.matcher(params.guided_kind, params.guided_spec)
        self.requests[request_id] = seqs
        for s in seqs:
            self.scheduler.add(s)

    def can_add_prefilled(self, num_prompt_tokens: int) -> bool:
        return (len(self.scheduler.running) < self.config.max_num_seqs and
                blocks_for(num_prompt_tokens + 1, self.config.block_size)
                <= self.block_manager.num_free_blocks)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], first_token: int,
                      params: SamplingParams, load_kv, arrival: float | None = None) -> None:
        """Join the running batch with the prompt's KV computed elsewhere.

        load_kv(block_ids) must fill our blocks for the prompt's tokens (the KV hand-off);
        the first token, sampled by prefill, counts as output token 1. Check
        `can_add_prefilled` first: this raises if there is no room.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not self.can_add_prefilled(len(prompt_ids)):
            raise RuntimeError(f"request {request_id}: no room for a prefilled sequence")
        seq = Sequence(request_id, prompt_ids, params, 0,
                       time.monotonic() if arrival is None else arrival)
        if params.guided_kind is not None:   # resume the grammar after prefill's token 1
            seq.guide = self.guides.matcher(params.guided_kind, params.guided_spec, [first_token])
        self.block_manager.allocate(seq, len(prompt_ids), [])
        try:
            load_kv(seq.block_table[:blocks_for(len(prompt_ids), self.config.block_size)])
        except BaseException:
            self.block_manager.free(seq)
            raise
        seq.num_computed_tokens = len(prompt_ids)
        self.block_manager.commit_full_blocks(seq)
        seq.append_token(first_token)
        if seq.generator is not None and not params.greedy:
            # prefill drew once from this seed; draw once too so colocated and
            # disaggregated seeded outputs agree
            torch.empty(self.model.config.vocab_size).exponential_(generator=seq.generator)
        seq.status = SeqStatus.RUNNING
        self.requests[request_id] = [seq]
        self.scheduler.running.append(seq)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request wherever it is; every block it held returns to the pool."""
        seqs = self.requests.pop(request_id, [])
        outs = []
        for s in seqs:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")
                outs.append(RequestOutput(request_id, s.index, [], True, "abort",
                                          num_prompt_tokens=s.num_prompt_tokens))
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        depth = getattr(self.runner, "depth", 1)
        if depth > 1 or self.in_flight:
            return self._step_pipelined(depth)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        with self.step_observer(batch) if self.step_observer else nullcontext():
            logits, samplers = self.runner.run(batch)
        self.stats.max_in_flight = max(self.stats.max_in_flight, 1)
        return self._after(batch, logits, samplers)

    def _step_pipelined(self, depth: int) -> list[RequestOutput]:
        """Submit a step over sequences not in flight (at most 1/depth of the active ones,
        so the steps in flight share them); take the oldest back once `depth` are in
        flight or nothing more could go in."""
        batch = None
        if len(self.in_flight) < depth:
            busy = frozenset(id(s) for b, _ in self.in_flight for s in b.seqs)
            active = len(self.scheduler.running) + len(self.scheduler.waiting)
            batch = self.scheduler.schedule(busy, max_seqs=max(1, -(-active // depth)))
            if batch:
                self.in_flight.append((batch, self.runner.submit(batch)))
                self.stats.max_in_flight = max(self.stats.max_in_flight, len(self.in_flight))
                if len(self.in_flight) < depth:
                    return []
        if not self.in_flight:
            return []
        done, submitted = self.in_flight.popleft()
        logits, samplers = self.runner.collect(submitted)
        # a sequence aborted while its step was in flight: its blocks are gone, its token too
        keep = [i for i, s in enumerate(samplers) if not s.is_finished]
        if len(keep) < len(samplers):
            logits, samplers = logits[keep], [samplers[i] for i in keep]
        return self._after(done, logits, samplers)

    def _after(self, batch: ScheduledBatch, logits: torch.Tensor, samplers) -> list[RequestOutput]:
        """Account a step that came back: computed tokens, full blocks, sampling."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.is_finished:
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
            if len(seq) - n < seq.num_prompt_tokens:
                self.stats.prompt_tokens_computed += min(n, seq.num_prompt_tokens - (len(seq) - n))
        self.stats.steps += 1
        outputs = []
        if logits.dim() == 1:   # tokens, sampled where the logits were (argmax_suffices)
            results = [SampleResult(int(t)) for t in logits.tolist()]
        else:
            guided = [i for i, s in enumerate(samplers) if s.guide is not None]
            if guided:
                self.guides.mask(logits, guided, [samplers[i].guide for i in guided])
            results = sample(logits, samplers)
        for seq, res in zip(samplers, results):
            if seq.guide is not None:
                seq.guide.consume_token(res.token_id)
            seq.append_token(res.token_id)
            self.stats.decode_tokens += 1
            reason = self._finish_reason(seq, res.token_id)
            if reason:
                self.scheduler.finish(seq, reason)
            outputs.append(RequestOutput(
                seq.request_id, seq.index, [res.token_id], reason is not None, reason,
                [res] if seq.params.logprobs is not None else [],
                seq.num_prompt_tokens, seq.num_cached_tokens))
            if reason and all(s.is_finished for s in self.requests.get(seq.request_id, [])):
                self.requests.pop(seq.request_id, None)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        return self.finish_reason_for(token, seq.params, seq.num_output_tokens, len(seq))

    def finish_reason_for(self, token: int, p: SamplingParams, num_output: int,
                           seq_len: int) -> str | None:
        """Why a sequence ends after emitting `token` as its num_output-th token, if it does."""
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if num_output >= p.max_tokens or seq_len >= self.max_model_len:
            return "length"
        return None

    # -- conveniences -------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[list[int]]]:
        """Run prompts to completion; returns, per prompt, each choice's output ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        results = {rid: [[] for _ in range(p.n)] for rid, p in zip(ids, plist)}
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id][out.index].extend(out.new_token_ids)
        return [results[rid] for rid in ids]

    def idle_counts(self) -> dict:
        bm = self.block_manager
        return {"total_blocks": bm.num_blocks, "free_blocks": bm.num_free_blocks,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)}


def build_runner(model: LlamaForCausalLM, kv_cache, config: EngineConfig,
                 max_model_len: int) -> ModelRunner:
    """The runner the config asks for: CudaGraphRunner on CUDA with the Triton backend
    unless enforce_eager, else an eager ModelRunner with the resolved backend."""
    backend = config.resolved_attention_backend()
    if backend == "triton" and config.device.startswith("cuda"):
        from duet_kernels._dispatch import HAS_TRITON
        if not HAS_TRITON:
            raise RuntimeError("attention_backend='triton' on CUDA needs the triton package "
                               "(pip install triton), or choose attention_backend='torch'")
    if config.use_cuda_graphs:
        from shared.engine.cuda_graphs import CudaGraphRunner
        return CudaGraphRunner(model, kv_cache, config.device,
                               max_batch=min(config.cuda_graph_max_batch, config.max_num_seqs),
                               max_model_len=max_model_len,
                               max_tokens=min(config.cuda_graph_max_tokens,
                                              config.max_num_batched_tokens),
                               max_seqs=config.max_num_seqs)
    return ModelRunner(model, kv_cache, config.device, backend)
