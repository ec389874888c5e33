"""CUDA graphs for decode steps.

A decode step launches a few hundred small kernels; replaying them as one captured graph
removes the per-launch CPU cost, which dominates at small batch. One graph per batch-size
bucket (1, 2, 4, 8, 16, 24, 32, ... up to the largest), captured largest-first into one
shared memory pool, all reading one set of static input buffers sized for the largest
bucket. A step copies its inputs in and pads the bucket's unused slots so the kernels
skip them: slot -1 (write_kv writes nothing) and context length 0 (decode attention
outputs zeros and reads no block table). Prefill and mixed steps, and decode batches
larger than the largest bucket, run eagerly.

Without CUDA nothing is captured and the same static-buffer path runs eagerly, so CPU
tests (Triton interpreter) exercise the padding exactly as a replay would see it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, fields

import torch

from shared.engine.model_runner import ModelRunner, StepInputs
from shared.engine.triton_attention import TritonAttnMetadata, TritonPagedAttention


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8th, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def pick_bucket(batch: int, buckets: list[int]) -> int | None:
    """Smallest bucket holding `batch` sequences; None when it exceeds the largest."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


@dataclass
class DecodeBuffers:
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

    def copy_from(self, src: "DecodeBuffers", n: int) -> None:
        """Copy the first n slots of every buffer (asynchronously from pinned memory)."""
        for f in fields(self):
            getattr(self, f.name)[:n].copy_(getattr(src, f.name)[:n], non_blocking=True)

    def view(self, n: int, scale: float, kv_cache, cu_seqlens: torch.Tensor) -> tuple:
        """(input_ids, positions, attention) over the first n slots."""
        meta = TritonAttnMetadata(self.slot_mapping[:n], self.block_tables[:n],
                                  self.context_lens[:n], cu_seqlens[:n + 1], 1, True)
        return self.input_ids[:n], self.positions[:n], TritonPagedAttention(kv_cache, meta, scale)


def fill_decode_inputs(buf: DecodeBuffers, step: StepInputs, bucket: int, block_size: int) -> None:
    """Write a decode-only step into CPU buffers, padded to `bucket` slots.

    Padded slots get token 0 at position 0, slot -1 and context length 0. Table rows are
    written only up to each context's last block; the rest is stale and never read.
    """
    B = len(step.q_lens)
    ids, pos, slots = buf.input_ids.numpy(), buf.positions.numpy(), buf.slot_mapping.numpy()
    ctx, tables = buf.context_lens.numpy(), buf.block_tables.numpy()
    ids[:B], pos[:B], ctx[:B] = step.token_ids, step.positions, step.ctx_lens
    ids[B:bucket], pos[B:bucket], ctx[B:bucket], slots[B:bucket] = 0, 0, 0, -1
    for row, (length, table) in enumerate(zip(step.ctx_lens, step.block_tables)):
        last = length - 1  # the new token's position
        slots[row] = table[last // block_size] * block_size + last % block_size
        n = last // block_size + 1
        tables[row, :n] = table[:n]


class CudaGraphRunner(ModelRunner):
    """ModelRunner with the Triton backend that replays captured graphs for decode steps.

    max_batch: largest bucket (decode batches above it run eagerly); max_model_len bounds
    the block-table width of the static buffers.
    """

    def __init__(self, model, kv_cache, device, max_batch: int, max_model_len: int):
        super().__init__(model, kv_cache, device, "triton")
        self.buckets = graph_buckets(max_batch)
        self.table_width = -(-max_model_len // self.block_size)
        n, on_cuda = self.buckets[-1], torch.device(device).type == "cuda"
        with torch.inference_mode():
            self.host = DecodeBuffers.allocate(n, self.table_width, "cpu", pin=on_cuda)
            self.static = DecodeBuffers.allocate(n, self.table_width, device)
            self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
            self.logits = torch.zeros(n, model.config.vocab_size, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        # the next step refills the pinned host buffers only once their last copy is done
        self._inputs_copied = torch.cuda.Event() if on_cuda else None
        if on_cuda:
            self.capture()

    @torch.inference_mode()
    def capture(self) -> None:
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
                # warm-up compiles every Triton variant for this shape outside the capture;
                # all slots are padding, so neither warm-up nor capture writes the cache
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._decode_forward(bs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a service's other threads may touch CUDA meanwhile
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._decode_forward(bs)
                self.graphs[bs] = graph
            torch.cuda.synchronize()

    def _decode_forward(self, bs: int) -> None:
        ids, positions, attn = self.static.view(bs, self.scale, self.kv_cache, self.cu_seqlens)
        hidden = self.model(ids, positions, attn)
        self.logits[:bs] = self.model.compute_logits(hidden)

    def execute(self, step: StepInputs) -> torch.Tensor | None:
        """Replay for a decode-only step that fits a bucket; eager otherwise. The logits
        returned may be a view of the static buffer: valid until the next step."""
        B = len(step.q_lens)
        bucket = pick_bucket(B, self.buckets) if step.decode_only else None
        if bucket is None or max(step.ctx_lens) > self.table_width * self.block_size:
            return super().execute(step)
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
        fill_decode_inputs(self.host, step, bucket, self.block_size)
        self.static.copy_from(self.host, bucket)
        if self._inputs_copied is not None:
            self._inputs_copied.record()
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
