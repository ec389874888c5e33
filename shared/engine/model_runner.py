"""Runs one scheduled batch through the model: packs inputs, attends over the paged
cache, returns logits for the sequences that need their next token."""
from __future__ import annotations

import torch

from shared.engine.attention import TorchPagedAttention, build_metadata
from shared.engine.scheduler import ScheduledBatch
from shared.engine.sequence import Sequence
from shared.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache, device: str = "cpu"):
        self.model = model
        self.kv_cache = kv_cache   # LocalKVCache or StoreKVCache
        self.block_size = kv_cache.block_size
        self.device = device
        self.scale = model.config.head_dim ** -0.5

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
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
        meta = build_metadata(q_lens, ctx_lens, tables, self.block_size)
        attn = TorchPagedAttention(self.kv_cache, meta, self.scale)
        dev = self.device
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), attn)
        if not samplers:
            return torch.empty(0), []
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=dev)])
        return logits.cpu(), samplers
