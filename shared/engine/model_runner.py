"""Runs one scheduled batch through the model: packs inputs, attends over the paged
cache, returns logits for the sequences that need their next token.

ModelRunner runs eagerly with either attention backend ('torch' on CPU, 'triton' on
CUDA); CudaGraphRunner (cuda_graphs.py) adds decode and prefill CUDA graphs on top; the
engine's `build_runner` picks one from its config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.engine.attention import TorchPagedAttention, build_metadata
from shared.engine.scheduler import ScheduledBatch
from shared.engine.sequence import Sequence
from shared.models.llama import LlamaForCausalLM

BACKENDS = ("torch", "triton")


@dataclass
class StepInputs:
    """One step's packed tokens, as host lists (the runner moves them to its device)."""
    token_ids: list[int]
    positions: list[int]
    q_lens: list[int]                # new tokens per sequence this step
    ctx_lens: list[int]              # cached + new tokens per sequence
    block_tables: list[list[int]]
    last_rows: list[int]             # packed row of each sequence due its next token
    samplers: list[Sequence]         # those sequences, in the same order

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.q_lens)


def prepare_step(batch: ScheduledBatch) -> StepInputs:
    ids, positions, q_lens, ctx_lens, tables, last_rows, samplers = [], [], [], [], [], [], []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        c = seq.num_computed_tokens
        ids.extend(seq.token_ids[c:c + n])
        positions.extend(range(c, c + n))
        q_lens.append(n)
        ctx_lens.append(c + n)
        tables.append(seq.block_table)
        if c + n == len(seq):  # this step reaches the end: a next token is due
            last_rows.append(len(ids) - 1)
            samplers.append(seq)
    return StepInputs(ids, positions, q_lens, ctx_lens, tables, last_rows, samplers)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache, device: str = "cpu",
                 attention_backend: str = "torch"):
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}: choose one of {BACKENDS}")
        self.model = model
        self.kv_cache = kv_cache   # LocalKVCache or StoreKVCache
        self.block_size = kv_cache.block_size
        self.device = device
        self.attention_backend = attention_backend
        self.scale = model.config.head_dim ** -0.5
        if attention_backend == "triton":  # imported here: CPU-only runs never load Triton
            from shared.engine import triton_attention
            self._triton = triton_attention

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits [N, vocab] fp32 on CPU for the N sequences due a token, and those sequences."""
        step = prepare_step(batch)
        logits = self.execute(step)
        if logits is None:
            return torch.empty(0), []
        return logits.cpu(), step.samplers

    def execute(self, step: StepInputs) -> torch.Tensor | None:
        """Forward one step eagerly; logits on the device, None if no sequence is due."""
        dev = self.device
        hidden = self.model(torch.tensor(step.token_ids, device=dev),
                            torch.tensor(step.positions, device=dev), self.attention(step))
        if not step.samplers:
            return None
        return self.model.compute_logits(hidden[torch.tensor(step.last_rows, device=dev)])

    def attention(self, step: StepInputs):
        if self.attention_backend == "triton":
            meta = self._triton.build_triton_metadata(step.q_lens, step.ctx_lens, step.block_tables,
                                                      self.block_size, self.device)
            return self._triton.TritonPagedAttention(self.kv_cache, meta, self.scale)
        meta = build_metadata(step.q_lens, step.ctx_lens, step.block_tables, self.block_size)
        return TorchPagedAttention(self.kv_cache, meta, self.scale)
