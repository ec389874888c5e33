"""Decode a compressed bf16 tensor (shared/compress.py's format) on the GPU, in Triton.

Each lane of a program decodes one tile of the exponent stream, so a program decodes BLOCK
tiles side by side: per step every lane reads four stream bytes at its bit position (the
words are big-endian, so the bytes are the code bits in order; two zero words follow the
last tile), looks the code up in the 2**max_len table (symbol = exponent and top two mantissa
bits), advances by its length, and writes sign | symbol | low mantissa bits for its value. Lanes whose code is missing or that read past
their tile flag it; the caller raises naming the tile, as the CPU decoder does.

    huff_decode_bf16_triton(words, tiles, table, max_len, raw, n, tile) -> bf16 bits (int16)
Tested against the CPU codec in the interpreter (TRITON_INTERPRET=1, small tiles);
tools/gpu_check.sh runs it compiled and measures its TB/s.
"""
from __future__ import annotations

import torch

from ._dispatch import require_triton, tl, triton


@triton.jit
def _huff_decode_kernel(bytes_ptr, offs_ptr, table_ptr, raw_ptr, out_ptr, bad_ptr, n, tiles,
                        TILE: tl.constexpr, MAX_LEN: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = t < tiles
    start = tl.load(offs_ptr + t, mask=live, other=0).to(tl.int64) * 32
    stop = tl.load(offs_ptr + t + 1, mask=live, other=0).to(tl.int64) * 32
    bit = start
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    base = t.to(tl.int64) * TILE
    for i in range(TILE):
        at = base + i
        m = live & (at < n)
        byte = bit >> 3
        b0 = tl.load(bytes_ptr + byte, mask=m, other=0).to(tl.uint32)
        b1 = tl.load(bytes_ptr + byte + 1, mask=m, other=0).to(tl.uint32)
        b2 = tl.load(bytes_ptr + byte + 2, mask=m, other=0).to(tl.uint32)
        b3 = tl.load(bytes_ptr + byte + 3, mask=m, other=0).to(tl.uint32)
        window = (b0 << 24) | (b1 << 16) | (b2 << 8) | b3
        window = window << (bit & 7).to(tl.uint32)
        code = (window >> (32 - MAX_LEN)).to(tl.int32)
        e = tl.load(table_ptr + code, mask=m, other=0)
        length = e >> 16
        bad = bad | (m & (length == 0)).to(tl.int32)
        bit = bit + tl.where(m, length, 0).to(tl.int64)
        g = (at >> 2) * 3   # the value's 6 raw bits: four values in three bytes
        r0 = tl.load(raw_ptr + g, mask=m, other=0).to(tl.int32)
        r1 = tl.load(raw_ptr + g + 1, mask=m, other=0).to(tl.int32)
        r2 = tl.load(raw_ptr + g + 2, mask=m, other=0).to(tl.int32)
        r = (((r0 << 16) | (r1 << 8) | r2) >> (18 - 6 * (at & 3)).to(tl.int32)) & 63
        val = ((r & 32) << 10) | ((e & 0x3FF) << 5) | (r & 31)
        tl.store(out_ptr + at, val.to(tl.int16), mask=m)
    bad = bad | (live & (bit > stop)).to(tl.int32)
    tl.store(bad_ptr + t, bad, mask=live)


def huff_decode_bf16_triton(words: torch.Tensor, tiles: torch.Tensor, table: torch.Tensor,
                            max_len: int, raw: torch.Tensor, n: int, tile: int,
                            block: int = 64) -> torch.Tensor:
    """The bf16 bits (int16 [n]) of the tensor whose parts these are (all on one device)."""
    require_triton()
    nt = tiles.numel() - 1
    if raw.numel() != (n + 3) // 4 * 3:
        raise ValueError(f"huff_decode: the raw plane has {raw.numel()} bytes; {n} values need "
                         f"{(n + 3) // 4 * 3}")
    if nt != -(-n // tile):
        raise ValueError(f"huff_decode: {nt} tile offsets for {n} values in tiles of {tile}")
    end = int(tiles[-1])
    if end + 2 > words.numel():
        raise ValueError(f"huff_decode: the stream has {words.numel()} words, its tiles and "
                         f"padding need {end + 2} (truncated or corrupt)")
    out = torch.empty(n, dtype=torch.int16, device=raw.device)
    bad = torch.zeros(max(nt, 1), dtype=torch.int32, device=raw.device)
    grid = (triton.cdiv(max(nt, 1), block),)
    _huff_decode_kernel[grid](words.view(torch.uint8), tiles, table.to(torch.int32), raw, out,
                              bad, n, nt, TILE=tile, MAX_LEN=max_len, BLOCK=block)
    flagged = torch.nonzero(bad).flatten()
    if flagged.numel():
        raise ValueError(f"huff_decode: tile {int(flagged[0])} does not decode (its bits run "
                         f"out or match no code: a truncated or corrupt stream)")
    return out
