"""A tensor- x pipeline-parallel process group on torch.distributed (gloo on CPU; on CUDA
an NCCL group carries the tensors and gloo the commands).

The usual environment names the group: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
LOCAL_RANK, so a group starts under torchrun across hosts as well as from
`duet serve worker --tp T --pp P`. Every collective has a timeout (no rank waits
forever on a dead or stuck peer), and joining has its own bounded wait that ends in an
error naming the master's address.

Commands from the leader travel as msgspec bytes (never pickle), sent to each follower
point to point without waiting (isend on their own tag), so the leader can send the next
step while later stages still run the last one; every rank takes them in order.
"""
from __future__ import annotations

import datetime
import logging
import os
import time

import msgspec
import torch
import torch.distributed as dist

from shared.parallel.shape import Shard

log = logging.getLogger("duet.parallel")
MAX_COMMAND_BYTES = 64 << 20
COMMAND_TAG = 7     # commands' own p2p stream: never matched with activations or logits


class GroupError(RuntimeError):
    """A rank of the group died, hung past the timeout, or could not join."""


# -- the leader's commands ------------------------------------------------------------------
class Step(msgspec.Struct, tag="step", array_like=True):
    engine: str                     # "decode" (the rank's own cache) or "prefill" (store pool)
    token_ids: list[int]
    positions: list[int]
    q_lens: list[int]
    ctx_lens: list[int]
    block_tables: list[list[int]]
    last_rows: list[int]
    micro_batches: int = 1          # pipeline micro-batches (see runner.split_step)
    argmax: bool = False            # the last stage samples (greedy): tokens, not logits


class LoadKV(msgspec.Struct, tag="load", array_like=True):
    """Copy store blocks src[i] into own cache blocks dst[i]: each rank its own slice."""
    src: list[int]
    dst: list[int]


class LoadBlocks(msgspec.Struct, tag="blocks", array_like=True):
    """Whole store blocks read over the wire by the leader (a tcp hand-off) follow as one
    tensor broadcast of `shape` ([n, layers, 2, block_size, kv heads, head dim]) in `dtype`;
    each rank copies its slice of block i into its own cache block dst[i]."""
    dst: list[int]
    shape: list[int]
    dtype: str


class AttachPool(msgspec.Struct, tag="pool", array_like=True):
    info: bytes                     # a msgpack KVPoolInfo


class Ping(msgspec.Struct, tag="ping", array_like=True):
    pass


class Stop(msgspec.Struct, tag="stop", array_like=True):
    reason: str = ""


Command = Step | LoadKV | LoadBlocks | AttachPool | Ping | Stop
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Command)


def env_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class Group:
    """This process's place in a (tp, pp) group and the collectives it uses."""

    def __init__(self, shard: Shard, device: str = "cpu", timeout_s: float = 20.0,
                 connect_timeout_s: float = 30.0):
        self.shard, self.device = shard, torch.device(device)
        self.timeout_s = timeout_s
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", "29500"))
        self.master = f"{addr}:{port}"
        try:
            store = dist.TCPStore(addr, port, shard.world, is_master=shard.rank == 0,
                                  timeout=datetime.timedelta(seconds=connect_timeout_s),
                                  wait_for_workers=False)
            dist.init_process_group("gloo", store=store, rank=shard.rank,
                                    world_size=shard.world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:   # DistStoreError, RuntimeError, socket errors
            raise GroupError(f"rank {shard.rank} of {shard.world} could not join the group at "
                             f"MASTER_ADDR:MASTER_PORT={self.master} within "
                             f"{connect_timeout_s:.0f}s: {type(e).__name__}: {e}") from None
        cuda = self.device.type == "cuda"
        # every rank creates every group, in one order (torch.distributed requires it)
        self.tp_group = None
        self.tensor_group = None
        for s in range(shard.pp):
            ranks = shard.stage_ranks(s)
            g = dist.new_group(ranks, backend="nccl" if cuda else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
            if s == shard.stage:
                self.tp_group = g
        if cuda:
            self.tensor_group = dist.new_group(list(range(shard.world)), backend="nccl",
                                               timeout=datetime.timedelta(seconds=timeout_s))
        self.last_command = time.monotonic()
        self.failed = False   # a collective failed: the group is broken for good
        self._len = torch.zeros(1, dtype=torch.int64)
        self._sending: list = []              # commands on their way: (work, tensor) pairs
        self.from_last_bytes = 0              # what the leader received from the last stage
        self.comm_s: dict[str, float] = {}    # seconds spent in each kind of collective
        self.comm_n: dict[str, int] = {}

    def stats(self) -> dict:
        out = {k: {"calls": self.comm_n[k], "s": round(v, 4)} for k, v in self.comm_s.items()}
        return dict(out, from_last_stage={"bytes": self.from_last_bytes})

    # -- commands (leader -> every rank) ---------------------------------------------------
    def send_command(self, cmd) -> None:
        """To every other rank, without waiting for them to take it: its length, then its
        bytes. A follower still busy with an earlier step takes it when done."""
        data = _encoder.encode(cmd)
        size = torch.tensor([len(data)], dtype=torch.int64)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._sending = [p for p in self._sending if not p[0].is_completed()]
        for r in range(1, self.shard.world):
            for t in (size, buf):
                self._sending.append((self._collective(dist.isend, t, dst=r, tag=COMMAND_TAG), t))
        self.last_command = time.monotonic()

    def recv_command(self):
        self._collective(dist.recv, self._len, src=0, tag=COMMAND_TAG)
        n = int(self._len[0])
        if not 0 < n <= MAX_COMMAND_BYTES:
            raise GroupError(f"a command of {n} bytes from the leader")
        buf = torch.empty(n, dtype=torch.uint8)
        self._collective(dist.recv, buf, src=0, tag=COMMAND_TAG)
        return _decoder.decode(buf.numpy().tobytes())

    # -- tensors ------------------------------------------------------------------------------
    def broadcast_bytes(self, t: torch.Tensor) -> torch.Tensor:
        """The leader's contiguous tensor t, as raw bytes, into every rank's t (same shape and
        dtype, allocated by the caller): any dtype, gloo included."""
        self._collective(dist.broadcast, t.view(-1).view(torch.uint8), src=0)
        return t

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum t over this stage's TP ranks, in place. bf16/fp16 are summed in fp32 on gloo
        (it has no bf16 sum; and a wider sum of the ranks' partials is also exacter)."""
        if t.dtype in (torch.float32, torch.float64) or t.is_cuda:
            self._collective(dist.all_reduce, t, group=self.tp_group)
            return
        wide = t.float()
        self._collective(dist.all_reduce, wide, group=self.tp_group)
        t.copy_(wide)

    def send_activations(self, x: torch.Tensor, residual: torch.Tensor):
        """Start sending (x, residual) to the next stage; returns the work to wait on."""
        peer = self.shard.peer(self.shard.stage + 1)
        both = torch.stack([x, residual]).contiguous()
        return self._collective(dist.isend, both, dst=peer, group=self.tensor_group), both

    def recv_activations(self, tokens: int, hidden: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        peer = self.shard.peer(self.shard.stage - 1)
        both = torch.empty(2, tokens, hidden, dtype=dtype, device=self.device)
        self._collective(dist.recv, both, src=peer, group=self.tensor_group)
        return both[0], both[1]

    def wait(self, pending) -> None:
        work, _tensor = pending   # the tensor stays referenced until its send is done
        self._collective(work.wait)

    def gather_vocab(self, part: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """The last stage's vocabulary shards [N, vshard] -> full logits [N, vocab] on the
        stage's first rank (the leader without PP); None on its other ranks."""
        sh = self.shard
        if sh.tp == 1:
            return part[:, :vocab]
        parts = [torch.empty_like(part) for _ in range(sh.tp)] if sh.tp_rank == 0 else None
        self._collective(dist.gather, part, parts, dst=sh.stage_ranks()[0], group=self.tp_group)
        return torch.cat(parts, dim=1)[:, :vocab] if parts is not None else None

    def send_to_leader(self, t: torch.Tensor):
        """With PP > 1, from the last stage's first rank: start sending what the leader
        waits for (logits, or tokens sampled here); the pending send."""
        t = t.contiguous()
        return self._collective(dist.isend, t, dst=0, group=self.tensor_group), t

    def recv_from_last(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Leader, with PP > 1: what the last stage sent (send_to_leader), in order."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self._collective(dist.recv, out, src=self.shard.stage_ranks(self.shard.pp - 1)[0],
                         group=self.tensor_group)
        self.from_last_bytes += out.numel() * out.element_size()
        return out

    def barrier(self) -> None:
        self._collective(dist.barrier)

    def _collective(self, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        except GroupError:
            raise
        except Exception as e:   # gloo: a closed peer connection or a timeout
            self.failed = True
            raise GroupError(f"rank {self.shard.rank}: {fn.__name__} across the group failed "
                             f"(a rank died or stalled past {self.timeout_s:.0f}s): "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
        finally:
            k = fn.__name__
            self.comm_s[k] = self.comm_s.get(k, 0.0) + time.perf_counter() - t0
            self.comm_n[k] = self.comm_n.get(k, 0) + 1

    def close(self) -> None:
        if self.failed:   # destroying a group with a dead peer may wait on it: leave it
            return
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:   # a dead peer: nothing left to tear down cleanly
            log.debug("destroy_process_group: %s", e)
