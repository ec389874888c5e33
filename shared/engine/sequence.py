"""A sequence: one generation stream (one of a request's `n` choices) and its KV blocks."""
from __future__ import annotations

import enum
import itertools

import torch

from shared.engine.sampling_params import SamplingParams

_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Owns its token ids and its block table; the block manager only edits the table."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 index: int = 0, arrival: float = 0.0):
        self.seq_id = next(_counter)
        self.request_id = request_id
        self.index = index                       # choice index within the request
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0             # tokens whose KV is in the cache
        self.num_cached_tokens = 0               # of those, served by the prefix cache
        self.block_table: list[int] = []
        self.guide = None   # its llguidance matcher, for a structured-output request
        self.block_hashes: list[bytes] = []      # chained hashes of the full blocks so far
        self.finish_reason: str | None = None
        self.arrival = arrival
        self.first_token_time: float | None = None
        self.output_logprobs: list = []
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # Choice i of a seeded request uses seed+i, so choice 0 equals an n=1 request.
            self.generator = torch.Generator().manual_seed(params.seed + index)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
