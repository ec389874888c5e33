"""LLMEngine: the in-process core that prefill and decode workers wrap.

    step() = schedule -> run the model -> sample -> update sequences
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from shared.config import EngineConfig
from shared.engine.block_manager import BlockManager, blocks_for
from shared.engine.model_runner import ModelRunner
from shared.engine.outputs import RequestOutput
from shared.engine.sampler import sample
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Sequence, SeqStatus
from shared.models.llama import LlamaForCausalLM

log = logging.getLogger("duet.engine")


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0
    decode_tokens: int = 0


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig,
                 eos_token_ids: tuple[int, ...] = (), tokenizer=None):
        if config.device == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        mc = model.config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 model.max_positions)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.runner = ModelRunner(model, config.num_kv_blocks, config.block_size, config.device)
        self.requests: dict[str, list[Sequence]] = {}
        self.stats = EngineStats()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Resolve the model (preparing a built-in on first use) and load it."""
        from shared.models.hub import resolve_model
        from shared.models.loader import generation_eos_ids, load_model
        from shared.tokenization import Tokenizer

        path = resolve_model(config.model)
        model = load_model(path, config.resolved_dtype(), config.device)
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
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params.validate()
        self.check_prompt(prompt_ids, params)
        arrival = time.monotonic() if arrival is None else arrival
        seqs = [Sequence(request_id, prompt_ids, params, i, arrival) for i in range(params.n)]
        self.requests[request_id] = seqs
        for s in seqs:
            self.scheduler.add(s)

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
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, samplers = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
            if len(seq) - n < seq.num_prompt_tokens:
                self.stats.prompt_tokens_computed += min(n, seq.num_prompt_tokens - (len(seq) - n))
        self.stats.steps += 1
        outputs = []
        for seq, res in zip(samplers, sample(logits, samplers)):
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
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
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
