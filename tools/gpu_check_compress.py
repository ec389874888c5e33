"""GPU step of tools/gpu_check.sh: decode a compressed bf16 tensor with the Triton kernel
(duet_kernels/huffman_decode.py), check it bit for bit, and time it beside a plain bf16 copy.

    python tools/gpu_check_compress.py [--rows 4096 --cols 4096] [--json F] [--table F]

The tensor: Gaussian weights with log-normal row scales, encoded on the host (numpy coder
where the C++ kernels are off). Reports decode TB/s of bf16 output, the copy's TB/s, the
share of bf16 and the lanes in flight (one per 4,096-value tile in this format).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument("--table", default=None)
    a = ap.parse_args()
    from duet_kernels.huffman_decode import huff_decode_bf16_triton
    from shared import compress as C
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(a.rows, a.cols, generator=g)
         * torch.exp(torch.randn(a.rows, 1, generator=g) * 0.5) * 0.02).to(torch.bfloat16)
    t0 = time.perf_counter()
    parts = C.encode_bf16(w)
    encode_s = time.perf_counter() - t0
    table = C.decode_table(parts["lens"].numpy(), C.MAX_LEN).to(dev)
    p = {k: v.to(dev) for k, v in parts.items()}
    want = w.view(-1).view(torch.int16).to(dev)
    res = {"values": w.numel(), "tiles": int(parts["tiles"].numel() - 1),
           "share": round(sum(v.numel() * v.element_size() for v in parts.values())
                          / (w.numel() * 2), 4), "encode_s": round(encode_s, 2)}
    rows = []
    for block in (16, 32, 64):
        out = huff_decode_bf16_triton(p["exp"], p["tiles"], table, C.MAX_LEN, p["raw"],
                                      w.numel(), C.TILE, block=block)
        ok = torch.equal(out, want)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters = 10
        start.record()
        for _ in range(iters):
            huff_decode_bf16_triton(p["exp"], p["tiles"], table, C.MAX_LEN, p["raw"],
                                    w.numel(), C.TILE, block=block)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        rows.append({"block": block, "bit_exact": ok, "ms": round(ms, 3),
                     "tb_s": round(w.numel() * 2 / ms / 1e9, 4)})
    src = want.view(torch.bfloat16)
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    copy_ms = start.elapsed_time(end) / 20
    res.update(decode=rows, copy_tb_s=round(w.numel() * 2 * 2 / copy_ms / 1e9, 3))
    lines = [f"compressed decode (Triton), {a.rows}x{a.cols} bf16, {res['tiles']} tiles, "
             f"{100 * res['share']:.1f}% of bf16; bf16 copy {res['copy_tb_s']} TB/s (read+write)",
             "| lanes per program | bit-exact | ms | TB/s of bf16 out |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['block']} | {r['bit_exact']} | {r['ms']} | {r['tb_s']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if a.table:
        with open(a.table, "w") as f:
            f.write(text + "\n")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
