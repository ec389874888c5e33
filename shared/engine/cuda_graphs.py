"""CUDA graphs for decode steps and for prefill (and mixed) steps.

A step launches a few hundred small kernels; replaying them as one captured graph removes
the per-launch CPU cost, which dominates at small batch and short chunks. Two families of
graphs, all captured largest-first into one shared memory pool:

- decode graphs, one per batch-size bucket (1, 2, 4, 8, 16, 24, 32, ...): one new token
  per sequence, paged decode attention, logits inside the graph;
- prefill graphs, one per token-count bucket (16, 32, 48, 64, 96, 128, ...): any step
  with T packed new tokens over B <= T sequences (chunked prefill, prefix hits, decode
  tokens riding along), varlen prefill attention; the graph ends at the final hidden
  states and the lm_head runs eagerly on just the rows that need a token.

Each family reads one set of static input buffers sized for its largest bucket. A step
copies its inputs in and pads the bucket's unused slots so the kernels skip them: padded
tokens get slot -1 (write_kv writes nothing) and belong to no sequence; padded sequences
get context length 0 and, for prefill, an empty query range. Steps larger than the
largest bucket run eagerly.

Without CUDA nothing is captured and the same static-buffer path runs eagerly, so CPU
tests (Triton interpreter) exercise the padding exactly as a replay would see it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, fields

import numpy as np
import torch

from shared.engine.model_runner import ModelRunner, StepInputs
from shared.engine.triton_attention import TritonAttnMetadata, TritonPagedAttention, token_slots


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8th, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture for prefill: 16, then each power of two from 32 and 1.5x it
    (32, 48, 64, 96, 128, 192, 256, ...), and max_tokens itself. Padding wastes < 50%."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    sizes, p = [16], 32
    while p <= max_tokens:
        sizes += [p, p * 3 // 2]
        p *= 2
    sizes = [t for t in sizes if t < max_tokens]
    return sizes + [max_tokens]


def pick_bucket(n: int, buckets: list[int]) -> int | None:
    """Smallest bucket holding `n`; None when it exceeds the largest."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class _StaticBuffers:
    """Dataclass mixin: allocate every field on a device and copy prefixes between twins."""

    def copy_from(self, src, sizes: dict[str, int]) -> None:
        """Copy the first sizes[field] rows of every field (asynchronously from pinned memory)."""
        for f in fields(self):
            n = sizes[f.name]
            getattr(self, f.name)[:n].copy_(getattr(src, f.name)[:n], non_blocking=True)


@dataclass
class DecodeBuffers(_StaticBuffers):
    """Inputs of a decode step, one slot per sequence, sized for the largest bucket."""
    input_ids: torch.Tensor      # [N] int64
    positions: torch.Tensor      # [N] int64
    slot_mapping: torch.Tensor   # [N] int64, -1 = padded slot
    context_lens: torch.Tensor   # [N] int32, 0 = padded slot
    block_tables: torch.Tensor   # [N, W] int32, W = blocks of the longest allowed context

    @classmethod
    def allocate(cls, n: int, width: int, device, pin: bool = False) -> "DecodeBuffers":
        def zeros(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device, pin_memory=pin)
        return cls(zeros(n, dtype=torch.int64), zeros(n, dtype=torch.int64),
                   torch.full((n,), -1, dtype=torch.int64, device=device, pin_memory=pin),
                   zeros(n, dtype=torch.int32), zeros(n, width, dtype=torch.int32))

    def sizes(self, bucket: int) -> dict[str, int]:
        return {f.name: bucket for f in fields(self)}

    def view(self, n: int, scale: float, kv_cache, cu_seqlens: torch.Tensor) -> tuple:
        """(input_ids, positions, attention) over the first n slots."""
        meta = TritonAttnMetadata(self.slot_mapping[:n], self.block_tables[:n],
                                  self.context_lens[:n], cu_seqlens[:n + 1], 1, True)
        return self.input_ids[:n], self.positions[:n], TritonPagedAttention(kv_cache, meta, scale)


@dataclass
class PrefillBuffers(_StaticBuffers):
    """Inputs of a prefill/mixed step: T token slots and S sequence slots, sized for the
    largest token bucket and the most sequences a step may hold."""
    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64, -1 = padded token
    cu_seqlens: torch.Tensor     # [S + 1] int32 query offsets; padded sequences are empty
    context_lens: torch.Tensor   # [S] int32, 0 = padded sequence
    block_tables: torch.Tensor   # [S, W] int32

    @classmethod
    def allocate(cls, tokens: int, seqs: int, width: int, device, pin: bool = False) -> "PrefillBuffers":
        def zeros(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device, pin_memory=pin)
        return cls(zeros(tokens, dtype=torch.int64), zeros(tokens, dtype=torch.int64),
                   torch.full((tokens,), -1, dtype=torch.int64, device=device, pin_memory=pin),
                   zeros(seqs + 1, dtype=torch.int32), zeros(seqs, dtype=torch.int32),
                   zeros(seqs, width, dtype=torch.int32))

    def sizes(self, tokens: int, seqs: int) -> dict[str, int]:
        return {"input_ids": tokens, "positions": tokens, "slot_mapping": tokens,
                "cu_seqlens": seqs + 1, "context_lens": seqs, "block_tables": seqs}

    def view(self, tokens: int, seqs: int, scale: float, kv_cache) -> tuple:
        """(input_ids, positions, attention) over the first `tokens` tokens and `seqs`
        sequences; the attention grid follows from the bucket alone (max_seqlen_q=tokens)."""
        meta = TritonAttnMetadata(self.slot_mapping[:tokens], self.block_tables[:seqs],
                                  self.context_lens[:seqs], self.cu_seqlens[:seqs + 1], tokens, False)
        return (self.input_ids[:tokens], self.positions[:tokens],
                TritonPagedAttention(kv_cache, meta, scale))


def _write_tables(tables: np.ndarray, step: StepInputs, block_size: int) -> None:
    """Table rows up to each context's last block; the rest is stale and never read."""
    for row, (length, table) in enumerate(zip(step.ctx_lens, step.block_tables)):
        n = -(-length // block_size)
        tables[row, :n] = table[:n]


def fill_decode_inputs(buf: DecodeBuffers, step: StepInputs, bucket: int, block_size: int) -> None:
    """Write a decode-only step into CPU buffers, padded to `bucket` slots.

    Padded slots get token 0 at position 0, slot -1 and context length 0.
    """
    B = len(step.q_lens)
    ids, pos, slots = buf.input_ids.numpy(), buf.positions.numpy(), buf.slot_mapping.numpy()
    ctx = buf.context_lens.numpy()
    ids[:B], pos[:B], ctx[:B] = step.token_ids, step.positions, step.ctx_lens
    ids[B:bucket], pos[B:bucket], ctx[B:bucket], slots[B:bucket] = 0, 0, 0, -1
    for row, (length, table) in enumerate(zip(step.ctx_lens, step.block_tables)):
        last = length - 1  # the new token's position
        slots[row] = table[last // block_size] * block_size + last % block_size
    _write_tables(buf.block_tables.numpy(), step, block_size)


def fill_prefill_inputs(buf: PrefillBuffers, step: StepInputs, tokens: int, seqs: int,
                        block_size: int) -> None:
    """Write a prefill/mixed step into CPU buffers, padded to `tokens` tokens and `seqs`
    sequences. Padded tokens: id 0, position 0, slot -1, outside every sequence's query
    range. Padded sequences: empty query range at the end, context length 0."""
    T, B = len(step.token_ids), len(step.q_lens)
    ids, pos, slots = buf.input_ids.numpy(), buf.positions.numpy(), buf.slot_mapping.numpy()
    cu, ctx = buf.cu_seqlens.numpy(), buf.context_lens.numpy()
    ids[:T], pos[:T] = step.token_ids, step.positions
    ids[T:tokens], pos[T:tokens], slots[T:tokens] = 0, 0, -1
    t = 0
    for ql, cl, table in zip(step.q_lens, step.ctx_lens, step.block_tables):
        slots[t:t + ql] = token_slots(ql, cl, table, block_size)
        t += ql
    cu[0] = 0
    cu[1:B + 1] = np.cumsum(step.q_lens)
    cu[B + 1:seqs + 1] = T
    ctx[:B], ctx[B:seqs] = step.ctx_lens, 0
    _write_tables(buf.block_tables.numpy(), step, block_size)


class CudaGraphRunner(ModelRunner):
    """ModelRunner with the Triton backend that replays captured graphs.

    max_batch: largest decode bucket (decode batches above it run eagerly); max_tokens:
    largest prefill token bucket (0: no prefill graphs; larger steps run eagerly);
    max_seqs: most sequences one step may hold (the engine's max_num_seqs);
    max_model_len bounds the block-table width of the static buffers.
    """

    def __init__(self, model, kv_cache, device, max_batch: int, max_model_len: int,
                 max_tokens: int = 0, max_seqs: int | None = None):
        super().__init__(model, kv_cache, device, "triton")
        self.buckets = graph_buckets(max_batch)
        self.token_buckets = token_buckets(max_tokens) if max_tokens > 0 else []
        self.max_seqs = max_seqs or max(self.buckets[-1], self.token_buckets[-1] if self.token_buckets else 1)
        self.table_width = -(-max_model_len // self.block_size)
        n, on_cuda = self.buckets[-1], torch.device(device).type == "cuda"
        with torch.inference_mode():
            self.host = DecodeBuffers.allocate(n, self.table_width, "cpu", pin=on_cuda)
            self.static = DecodeBuffers.allocate(n, self.table_width, device)
            self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
            self.logits = torch.zeros(n, model.config.vocab_size, device=device)
            if self.token_buckets:
                t, s = self.token_buckets[-1], self.prefill_seqs(self.token_buckets[-1])
                self.prefill_host = PrefillBuffers.allocate(t, s, self.table_width, "cpu", pin=on_cuda)
                self.prefill_static = PrefillBuffers.allocate(t, s, self.table_width, device)
                self.hidden = torch.zeros(t, model.config.hidden_size, device=device,
                                          dtype=model.dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        self.num_prefill_replays = 0
        # the next step refills the pinned host buffers only once their last copy is done
        self._inputs_copied = torch.cuda.Event() if on_cuda else None
        if on_cuda:
            self.capture()

    def prefill_seqs(self, tokens: int) -> int:
        """Sequence slots of a prefill bucket: every sequence has >= 1 token this step."""
        return min(self.max_seqs, tokens)

    @torch.inference_mode()
    def capture(self) -> None:
        # largest first within one pool: smaller graphs reuse the largest one's memory
        shapes = ([("prefill", t) for t in reversed(self.token_buckets)]
                  + [("decode", b) for b in reversed(self.buckets)])
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            for kind, size in shapes:
                forward = self._prefill_forward if kind == "prefill" else self._decode_forward
                # warm-up compiles every Triton variant for this shape outside the capture;
                # all slots are padding, so neither warm-up nor capture writes the cache
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    forward(size)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a service's other threads may touch CUDA meanwhile
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    forward(size)
                (self.prefill_graphs if kind == "prefill" else self.graphs)[size] = graph
            torch.cuda.synchronize()

    def _decode_forward(self, bs: int) -> None:
        ids, positions, attn = self.static.view(bs, self.scale, self.kv_cache, self.cu_seqlens)
        hidden = self.model(ids, positions, attn)
        self.logits[:bs] = self.model.compute_logits(hidden)

    def _prefill_forward(self, tokens: int) -> None:
        ids, positions, attn = self.prefill_static.view(tokens, self.prefill_seqs(tokens),
                                                        self.scale, self.kv_cache)
        self.hidden[:tokens] = self.model(ids, positions, attn)

    def _fits(self, step: StepInputs) -> bool:
        return max(step.ctx_lens) <= self.table_width * self.block_size

    def _copy_in(self, fill, host, static, sizes: dict[str, int]) -> None:
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
        fill()
        static.copy_from(host, sizes)
        if self._inputs_copied is not None:
            self._inputs_copied.record()

    def execute(self, step: StepInputs) -> torch.Tensor | None:
        """Replay for a step that fits a bucket; eager otherwise. The logits returned may
        be a view of a static buffer: valid until the next step."""
        if step.decode_only:
            bucket = pick_bucket(len(step.q_lens), self.buckets)
            if bucket is not None and self._fits(step):
                return self._execute_decode(step, bucket)
        else:
            bucket = pick_bucket(len(step.token_ids), self.token_buckets)
            if bucket is not None and self._fits(step) and len(step.q_lens) <= self.prefill_seqs(bucket):
                return self._execute_prefill(step, bucket)
        return super().execute(step)

    def _execute_decode(self, step: StepInputs, bucket: int) -> torch.Tensor | None:
        B = len(step.q_lens)
        self._copy_in(lambda: fill_decode_inputs(self.host, step, bucket, self.block_size),
                      self.host, self.static, self.static.sizes(bucket))
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
            self.num_replays += 1
        else:
            self._decode_forward(bucket)
        if not step.samplers:
            return None
        if len(step.samplers) == B:
            return self.logits[:B]
        return self.logits[torch.tensor(step.last_rows, device=self.device)]

    def _execute_prefill(self, step: StepInputs, tokens: int) -> torch.Tensor | None:
        seqs = self.prefill_seqs(tokens)
        host, static = self.prefill_host, self.prefill_static
        self._copy_in(lambda: fill_prefill_inputs(host, step, tokens, seqs, self.block_size),
                      host, static, static.sizes(tokens, seqs))
        graph = self.prefill_graphs.get(tokens)
        if graph is not None:
            graph.replay()
            self.num_prefill_replays += 1
        else:
            self._prefill_forward(tokens)
        if not step.samplers:
            return None
        rows = torch.tensor(step.last_rows, device=self.device)
        return self.model.compute_logits(self.hidden[rows])
