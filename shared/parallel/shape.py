"""How a model splits over a tensor- x pipeline-parallel group: which query heads, KV heads,
MLP columns, vocabulary rows and layers each rank holds. Pure arithmetic, no processes.

Global rank = stage * tp + tp_rank: the ranks of one pipeline stage are adjacent, and the
group's leader (rank 0) is tensor rank 0 of the first stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.models.config import ModelConfig


def tp_sizes_that_work(cfg: ModelConfig, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if _tp_problem(cfg, t) is None]


def _tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    if cfg.num_heads % tp:
        return f"{cfg.num_heads} query heads do not divide by {tp}"
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        return (f"{cfg.num_kv_heads} KV heads neither divide by {tp} nor divide it "
                f"(a KV head is replicated only a whole number of times)")
    if cfg.intermediate_size % tp:
        return f"intermediate_size {cfg.intermediate_size} does not divide by {tp}"
    return None


def check_shape(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise ValueError naming the model's head counts and the sizes that work."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp={tp} and pp={pp} must be >= 1")
    if tp * pp > 1 and (cfg.is_moe or cfg.qk_norm):
        what = (f"{cfg.num_experts} experts (expert parallelism is not built yet)" if cfg.is_moe
                else "per-head q/k norms (not yet sharded)")
        raise ValueError(f"--tp {tp} --pp {pp}: this {cfg.architecture} has {what}; it runs "
                         f"as one process (--tp 1 --pp 1)")
    why = _tp_problem(cfg, tp)
    if why:
        raise ValueError(
            f"--tp {tp} does not fit this model ({cfg.num_heads} query heads, "
            f"{cfg.num_kv_heads} KV heads, intermediate_size {cfg.intermediate_size}): {why}; "
            f"TP sizes that work: {', '.join(map(str, tp_sizes_that_work(cfg)))}")
    if pp > cfg.num_layers:
        raise ValueError(f"--pp {pp} is more pipeline stages than this model's "
                         f"{cfg.num_layers} layers; PP sizes that work: 1..{cfg.num_layers}")


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items split into `parts` contiguous parts, the
    first n % parts parts one longer."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Shard:
    """What one rank of a (tp, pp) group holds of a model."""
    tp: int
    pp: int
    rank: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp: int, pp: int, rank: int) -> "Shard":
        check_shape(cfg, tp, pp)
        if not 0 <= rank < tp * pp:
            raise ValueError(f"rank {rank} is outside a group of {tp}x{pp}={tp * pp} ranks")
        return cls(tp, pp, rank, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size, cfg.vocab_size)

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def layers(self) -> tuple[int, int]:
        return split(self.num_layers, self.pp, self.stage)

    @property
    def q_heads(self) -> tuple[int, int]:
        n = self.num_heads // self.tp
        return self.tp_rank * n, (self.tp_rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """The KV heads this rank caches; with tp > kv heads each is replicated tp/kv times
        and a rank holds the one its query heads attend with."""
        if self.num_kv_heads >= self.tp:
            n = self.num_kv_heads // self.tp
            return self.tp_rank * n, (self.tp_rank + 1) * n
        h = self.tp_rank // (self.tp // self.num_kv_heads)
        return h, h + 1

    @property
    def kv_owner(self) -> bool:
        """Whether this rank writes its KV heads into the store: with replicated heads only
        the first replica does (the others hold the same bytes)."""
        if self.num_kv_heads >= self.tp:
            return True
        return self.tp_rank % (self.tp // self.num_kv_heads) == 0

    @property
    def mlp_cols(self) -> tuple[int, int]:
        n = self.intermediate_size // self.tp
        return self.tp_rank * n, (self.tp_rank + 1) * n

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """Rows of the embedding / lm_head; every shard is padded to vocab_shard rows."""
        n = self.vocab_shard
        return min(self.tp_rank * n, self.vocab_size), min((self.tp_rank + 1) * n, self.vocab_size)

    @property
    def vocab_shard(self) -> int:
        return -(-self.vocab_size // self.tp)

    def stage_ranks(self, stage: int | None = None) -> list[int]:
        s = self.stage if stage is None else stage
        return list(range(s * self.tp, (s + 1) * self.tp))

    def peer(self, stage: int) -> int:
        """This rank's tensor-parallel twin in another stage."""
        return stage * self.tp + self.tp_rank

    def describe(self) -> str:
        l0, l1 = self.layers
        h0, h1 = self.kv_heads
        return (f"rank {self.rank} (stage {self.stage}, tp rank {self.tp_rank}): layers "
                f"{l0}..{l1 - 1}, kv heads {h0}..{h1 - 1}")
