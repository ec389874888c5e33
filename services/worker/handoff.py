"""The decode side of the KV hand-off: read store blocks, fenced by generation numbers.

The store bumps a block's generation whenever it hands the block out again. The reader
checks the generations it was promised before and after copying: if either differs, the
block was recycled under it and the copy is refused rather than used as someone's KV.
"""
from __future__ import annotations

import torch


class StaleBlockError(RuntimeError):
    pass


def check_generations(generations: torch.Tensor, block_ids: list[int], expected: list[int],
                      when: str) -> None:
    now = generations[torch.tensor(block_ids, dtype=torch.int64)].tolist()
    if now != list(expected):
        bad = [(b, e, n) for b, e, n in zip(block_ids, expected, now) if e != n]
        raise StaleBlockError(f"KV blocks recycled {when} copy (block, expected gen, found): "
                              f"{bad[:4]}")


def fenced_copy(local_cache, pool: torch.Tensor, generations: torch.Tensor,
                src_blocks: list[int], expected: list[int], dst_blocks: list[int]) -> None:
    """Copy store blocks into the worker's paged cache, straight from the shared pages."""
    check_generations(generations, src_blocks, expected, "before")
    local_cache.load_from_store(pool, src_blocks, dst_blocks)
    check_generations(generations, src_blocks, expected, "after")
