"""Where the KV store's bytes live, described once.

On CPU, one shared-memory segment:
    offset 0                  pool   [num_blocks, num_layers, 2 (K, V), block_size,
                                      num_kv_heads, head_dim] of the pool dtype
    generations_offset(..)    generations  int64 [num_blocks]
    then                      progress     int32 [num_blocks]

generations_offset is the pool's nbytes rounded up to 64. KVPoolInfo.handle names the
pool part only (offset 0); open_pool() derives the generations view from it;
KVPoolInfo.progress names the progress array.

On a GPU (device 'cuda[:N]'), the pool is one dedicated device allocation exported
through the cuda_ipc backend (KVPoolInfo.handle, backend 'cuda_ipc'), and the generations
and progress stay in a small host shm segment (KVPoolInfo.generations, .progress), so the
store fences, recycles and serves layers without touching the GPU. One block
holds every layer and head of its tokens, so one (handle, block id) names it and a reader
of any TP/PP shape can slice its own layers and heads.

Layer-wise progress: progress[b] is how many of block b's layers its current writer has
finished for every token the block holds. Only the prefill writing the block sets it: 0
when it takes the block fresh, then layer by layer, num_layers once committed. The store
reads it to serve layers while later ones compute (KVRead.from_layers); a reader's
generation check covers a block recycled under it.

The generation fence: the store bumps generations[b] each time it hands block b out
fresh. A reader that was promised (b, g) checks generations[b] == g before and after
copying (check_generations); a mismatch means the block was recycled under it, and the
copy is refused rather than used as somebody's KV.
"""
from __future__ import annotations

import msgspec
import torch

from shared.buffers import shm
from shared.buffers.handle import ITEMSIZE, BufferHandle, numel
from shared.protocol import KVPoolInfo

GENERATIONS_ALIGN = 64


class StaleBlockError(RuntimeError):
    """A block's generation moved: it was recycled, and its bytes are not ours."""


def pool_shape(num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
               head_dim: int) -> list[int]:
    return [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]


def generations_offset(pool_nbytes: int) -> int:
    """Byte offset of the int64 generations array: after the pool, 64-aligned."""
    return -(-pool_nbytes // GENERATIONS_ALIGN) * GENERATIONS_ALIGN


def segment_nbytes(pool_nbytes: int, num_blocks: int) -> int:
    """Size of the whole segment: pool, padding, generations, progress."""
    return generations_offset(pool_nbytes) + num_blocks * (ITEMSIZE["int64"] + ITEMSIZE["int32"])


def generations_handle(pool: BufferHandle, num_blocks: int,
                       separate: BufferHandle | None = None) -> BufferHandle:
    """The handle of the generations array: `separate` where the store announced one (a
    GPU pool's), else the one that follows the shm pool `pool` names."""
    if separate is not None:
        if separate.backend != "shm" or separate.dtype != "int64" or separate.shape != [num_blocks]:
            raise ValueError(f"generations handle must be shm int64 [{num_blocks}], got "
                             f"{separate.backend} {separate.dtype} {separate.shape}")
        return separate
    if pool.backend != "shm" or pool.offset != 0:
        raise ValueError(f"KV pool handle must be an shm region at offset 0, got "
                         f"backend {pool.backend!r} offset {pool.offset}")
    return BufferHandle(backend="shm", base=pool.base, offset=generations_offset(pool.nbytes),
                        nbytes=num_blocks * ITEMSIZE["int64"], dtype="int64", shape=[num_blocks])


def parse_device(device: str) -> tuple[str, int]:
    """('cpu', 0) or ('cuda', N) from 'cpu', 'cuda', 'cuda:N'; ValueError naming the value."""
    if device == "cpu":
        return "cpu", 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"device={device!r} must be 'cpu', 'cuda' or 'cuda:N'")


class PoolSegment:
    """The memory a store creates: the pool tensor, the generations tensor, the
    KVPoolInfo that describes them. On 'cpu' both live in one shm segment named `name`;
    on 'cuda[:N]' the pool is an IpcBuffer on that GPU and the generations an shm
    segment named `name`. close() frees them (views elsewhere stay valid)."""

    def __init__(self, name: str, num_blocks: int, num_layers: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: str, epoch: int = 0,
                 device: str = "cpu"):
        kind, ordinal = parse_device(device)
        shape = pool_shape(num_blocks, num_layers, block_size, num_kv_heads, head_dim)
        pool_nbytes = numel(shape) * ITEMSIZE[dtype]
        self.device, self.gpu = device, None
        gen_handle = None
        gen_bytes = num_blocks * ITEMSIZE["int64"]
        if kind == "cpu":
            self.nbytes = segment_nbytes(pool_nbytes, num_blocks)
            self.region = shm.ShmRegion.create(name, self.nbytes)
            self.pool = self.region.tensor(dtype, shape)
            self.generations = self.region.tensor("int64", [num_blocks],
                                                  generations_offset(pool_nbytes))
            self.progress = self.region.tensor("int32", [num_blocks],
                                               generations_offset(pool_nbytes) + gen_bytes)
            handle = self.region.export(self.pool)
        else:
            from shared.buffers import cuda_ipc
            if not torch.cuda.is_available() or ordinal >= torch.cuda.device_count():
                raise ValueError(f"device={device!r}: no such GPU here "
                                 f"({torch.cuda.device_count()} visible)")
            self.nbytes = pool_nbytes
            self.region = shm.ShmRegion.create(name, gen_bytes + num_blocks * ITEMSIZE["int32"])
            try:
                self.gpu = cuda_ipc.IpcBuffer(pool_nbytes, ordinal)
                self.pool = self.gpu.tensor(dtype, shape)
                self.pool.zero_()
                torch.cuda.synchronize(ordinal)
            except BaseException:
                self.region.unlink()
                self.region.close()
                raise
            self.generations = self.region.tensor("int64", [num_blocks])
            self.progress = self.region.tensor("int32", [num_blocks], gen_bytes)
            # no event: the store never writes the pool; writers order their own writes
            handle = msgspec.structs.replace(self.gpu.export(self.pool), event="")
            gen_handle = self.region.export(self.generations)
        self.generations.zero_()
        self.progress.zero_()
        self.info = KVPoolInfo(handle=handle, num_blocks=num_blocks, num_layers=num_layers,
                               block_size=block_size, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, dtype=dtype, epoch=epoch,
                               generations=gen_handle, progress=self.region.export(self.progress))

    @property
    def name(self) -> str:
        """What names this pool to its readers (KVRef.handle.base, KVLease.pool): the shm
        segment's name, or the GPU allocation's IPC handle."""
        return self.info.handle.base

    @property
    def shm_name(self) -> str:
        return self.region.name

    def close(self) -> None:
        if self.region.owner:
            self.region.unlink()
            self.region.close()
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None


def open_pool(info: KVPoolInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, generations) views of the store's memory, zero-copy: the pool
    as [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] of
    info.dtype (on the store's GPU for a cuda_ipc pool), generations as int64
    [num_blocks] in host shm. ValueError when the handle does not match the
    announced shape or the segment is too small."""
    shape = pool_shape(info.num_blocks, info.num_layers, info.block_size,
                       info.num_kv_heads, info.head_dim)
    h = info.handle
    if h.shape != shape or h.dtype != info.dtype:
        raise ValueError(f"pool handle is {h.dtype} {h.shape}, KVPoolInfo announces {info.dtype} {shape}")
    gen = generations_handle(h, info.num_blocks, info.generations)
    if h.backend == "cuda_ipc":
        from shared.buffers import cuda_ipc
        return cuda_ipc.open(h), shm.open(gen)
    region = shm.ShmRegion.attach(h.base)
    need = segment_nbytes(h.nbytes, info.num_blocks)
    if region.nbytes < need:
        raise ValueError(f"shm {h.base!r} has {region.nbytes} bytes, the pool and its "
                         f"generations need {need}")
    return shm.open(h), shm.open(gen)


def open_progress(info: KVPoolInfo) -> torch.Tensor | None:
    """The int32 [num_blocks] layer-progress view of a pool (host shm), None when the
    store announces none. ValueError when the handle is not shm int32 [num_blocks]."""
    h = info.progress
    if h is None:
        return None
    if h.backend != "shm" or h.dtype != "int32" or h.shape != [info.num_blocks]:
        raise ValueError(f"progress handle must be shm int32 [{info.num_blocks}], got "
                         f"{h.backend} {h.dtype} {h.shape}")
    return shm.open(h)


def close_pool(info: KVPoolInfo) -> None:
    """Unmap this process's mapping of a pool it no longer uses (a restarted store's old
    one), once no views of it remain."""
    if info.handle.backend == "shm":
        shm.ShmRegion.attach(info.handle.base).close()
    elif info.generations is not None:
        shm.ShmRegion.attach(info.generations.base).close()


def check_generations(generations: torch.Tensor, block_ids: list[int], expected: list[int],
                      when: str = "") -> None:
    """The fence: StaleBlockError naming the first recycled blocks unless every block
    still carries the generation it was promised with."""
    if len(block_ids) != len(expected):
        raise ValueError(f"{len(block_ids)} block ids but {len(expected)} generations")
    if not block_ids:
        return
    now = generations[torch.tensor(block_ids, dtype=torch.int64)].tolist()
    if now != list(expected):
        bad = [(b, e, n) for b, e, n in zip(block_ids, expected, now) if e != n]
        raise StaleBlockError(f"KV blocks recycled {when} (block, expected generation, found): "
                              f"{bad[:4]}".replace("  ", " "))


# -- KV integrity ------------------------------------------------------------------------
CHECKSUM_MASK = (1 << 63) - 1    # checksums travel as non-negative int64


class KVChecksumError(StaleBlockError):
    """A block's bytes no longer hash to what their writer committed: corrupted KV, never
    to be decoded from. block_ids: the blocks that failed."""

    def __init__(self, message: str, block_ids: list[int]):
        super().__init__(message)
        self.block_ids = block_ids


_POS_WEIGHTS: dict[tuple, torch.Tensor] = {}


def checksum_kind(info: KVPoolInfo) -> str:
    """The checksum a pool's writers use: 'xxh3' for a host pool, 'wsum' for a GPU one (a
    reader holding the bytes elsewhere, over tcp, must compute the same one)."""
    return "wsum" if info.handle.backend == "cuda_ipc" else "xxh3"


def block_checksums(pool: torch.Tensor, block_ids: list[int], kind: str | None = None) -> list[int]:
    """One 63-bit checksum per block of `pool` ([num_blocks, ...], each block contiguous):
    'xxh3', xxh3-64 of its bytes, for host memory (zero-copy, from the shared pages);
    'wsum' (a GPU pool's) a position-weighted sum of its 32-bit words in int64, computed
    on the device (a flipped bit anywhere changes it), so only 8 bytes per block cross to
    the host. kind None: the one for where `pool` lives."""
    if not block_ids:
        return []
    kind = kind or ("wsum" if pool.is_cuda else "xxh3")
    if kind == "xxh3":
        import xxhash
        return [xxhash.xxh3_64_intdigest(pool[b].view(torch.uint8).numpy()) & CHECKSUM_MASK
                for b in block_ids]
    return _weighted_sums(pool, block_ids)


def _weighted_sums(pool: torch.Tensor, block_ids: list[int]) -> list[int]:
    """The GPU checksum (runs anywhere torch does; the tests run it on the CPU)."""
    idx = torch.tensor(block_ids, dtype=torch.int64, device=pool.device)
    words = pool.index_select(0, idx).view(torch.int32).reshape(len(block_ids), -1)
    key = (words.shape[1], str(pool.device))
    w = _POS_WEIGHTS.get(key)
    if w is None:   # distinct odd weights per position: a swap or a flip moves the sum
        w = (torch.arange(words.shape[1], dtype=torch.int64, device=pool.device)
             * 0x9E3779B1 + 0x7F4A7C15) | 1
        _POS_WEIGHTS[key] = w
    sums = (words.to(torch.int64) * w).sum(dim=1)
    return [int(v) & CHECKSUM_MASK for v in sums.tolist()]


def verify_checksums(pool: torch.Tensor, block_ids: list[int], expected: list[int],
                     when: str = "", kind: str | None = None) -> None:
    """KVChecksumError naming the blocks whose bytes do not hash to `expected`."""
    if len(block_ids) != len(expected):
        raise ValueError(f"{len(block_ids)} block ids but {len(expected)} checksums")
    got = block_checksums(pool, block_ids, kind)
    bad = [b for b, g, e in zip(block_ids, got, expected) if g != e]
    if bad:
        raise KVChecksumError(f"KV checksum mismatch {when}: blocks {bad[:8]} of "
                              f"{len(block_ids)} do not hold what their writer committed "
                              f"(corrupted in the store)", bad)
