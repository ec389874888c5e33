"""GPU check for duet_kernels/: the card's baselines, then kernel throughput against them.

Measures, in one process on one card: device-to-device copy bandwidth (1 GiB torch copy)
and bf16 matmul TFLOP/s as baselines; paged_decode_attention at batch 64, context 4096,
block 16, bf16, random block tables, for SmolLM2-like (Hq 9, Hkv 3, D 64) and
Llama-8B-like (32, 8, 128) heads, over a small sweep of tile/split configurations
(timed as CUDA-graph replays, as the engine runs it); and, as extras, prefill attention
TFLOP/s and pack/unpack_kv bandwidth. Prints a table and writes JSON (--json).

"% copy" compares memory traffic: kernel bytes moved / time against the copy's
read+write bytes / time (a copy of N bytes moves 2N through DRAM). Decode attention
counts only the K and V bytes it must read.

    python tools/gpu_check_kernels.py --json results/kernels.json [--budget-s 150]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duet_kernels import (pack_kv, paged_decode_attention_ref, paged_decode_attention_triton,  # noqa: E402
                     prefill_attention_triton, unpack_kv)
from duet_kernels.attention_decode import _choose_splits  # noqa: E402

DECODE_SHAPES = [("smollm2", 9, 3, 64), ("llama8b", 32, 8, 128)]
BATCH, CONTEXT, PAGE = 64, 4096, 16
COPY_BYTES, MATMUL_N = 1 << 30, 8192
PREFILL_B, PREFILL_N, PACK_LAYERS, PACK_BLOCKS = 4, 1024, 32, 256
# module constants so a CPU smoke run of this script (interpreter, fp16) can shrink everything
DEVICE, DTYPE = "cuda", torch.bfloat16


def time_ms(fn, iters=20, warmup=3) -> float:
    """Mean milliseconds per call on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_time_ms(fn, iters=50) -> float:
    """Capture fn once in a CUDA graph (after an eager warm-up that compiles) and time replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, iters=iters, warmup=3)


def copy_bandwidth(nbytes=None) -> dict:
    nbytes = nbytes or COPY_BYTES
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=20, warmup=3)
    del src, dst
    return {"bytes": nbytes, "ms": ms, "GBps_copied": nbytes / ms / 1e6, "GBps_traffic": 2 * nbytes / ms / 1e6}


def matmul_tflops(n=None) -> dict:
    n = n or MATMUL_N
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    ms = time_ms(lambda: a @ b, iters=20, warmup=3)
    return {"n": n, "ms": ms, "TFLOPs": 2 * n ** 3 / ms / 1e9}


def decode_configs(Hkv: int) -> list[dict]:
    """Default first, then tile/warp variants and half/double the default split size."""
    cfgs = [{}]
    for bn in (32, 64, 128):
        for warps in (4, 8):
            if (bn, warps) != (64, 4):
                cfgs.append({"block_n": bn, "num_warps": warps})
    splits = _choose_splits(CONTEXT, BATCH * Hkv, 64, torch.device(DEVICE))
    for n in (splits // 2, splits * 2):
        if 1 <= n <= CONTEXT // 64 and n != splits:
            cfgs.append({"num_splits": n})
    cfgs.append({"num_stages": 3})
    return cfgs


def bench_decode(name, Hq, Hkv, D, cfgs, copy_gbps, deadline) -> list[dict]:
    torch.manual_seed(0)
    nblk = CONTEXT // PAGE
    k_cache = torch.randn(BATCH * nblk, PAGE, Hkv, D, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(BATCH * nblk, device=DEVICE).view(BATCH, nblk).to(torch.int32)
    lens = torch.full((BATCH,), CONTEXT, device=DEVICE, dtype=torch.int32)
    q = torch.randn(BATCH, Hq, D, device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(q)
    scale = D ** -0.5
    kv_bytes = 2 * BATCH * CONTEXT * Hkv * D * k_cache.element_size()
    # each config's output is checked on 4 sequences (the reference materialises fp32 K/V)
    want = paged_decode_attention_ref(q[:4], k_cache, v_cache, tables[:4], lens[:4], scale).float()
    rows = []
    for cfg in cfgs:
        row = {"kernel": "paged_decode_attention", "shape": f"{name} B={BATCH} ctx={CONTEXT} Hq={Hq} Hkv={Hkv} D={D}",
               "config": cfg or "default", "kv_bytes": kv_bytes}
        if time.time() > deadline:
            rows.append({**row, "error": "skipped: time budget spent"})
            continue
        def fn(cfg=cfg):
            paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, out=out, **cfg)
        try:
            try:
                ms, row["timing"] = graph_time_ms(fn), "cuda_graph"
            except Exception as e:  # still report a number, and why graphs failed
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                ms, row["timing"] = time_ms(fn), "eager"
            gbps = kv_bytes / ms / 1e6
            err = (out[:4].float() - want).abs().max().item()
            row.update(us=ms * 1e3, GBps=gbps, pct_copy=100 * gbps / copy_gbps, max_abs_err_vs_ref=err)
            if not err < 3e-2:  # bf16 attention outputs of magnitude ~0.1; NaN fails too
                row["error"] = f"wrong output: max abs err {err:.2e} vs reference"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


def bench_prefill(matmul_tflops_: float) -> dict:
    """PREFILL_B prompts of PREFILL_N tokens, Llama-8B heads, no cached prefix; causal FLOPs / time."""
    Hq, Hkv, D, n, B = 32, 8, 128, PREFILL_N, PREFILL_B
    nblk = n // PAGE
    k_cache = torch.randn(B * nblk, PAGE, Hkv, D, device=DEVICE, dtype=DTYPE)
    tables = torch.arange(B * nblk, device=DEVICE, dtype=torch.int32).view(B, nblk)
    cu = torch.arange(0, (B + 1) * n, n, device=DEVICE, dtype=torch.int32)
    lens = torch.full((B,), n, device=DEVICE, dtype=torch.int32)
    q = torch.randn(B * n, Hq, D, device=DEVICE, dtype=DTYPE)
    ms = time_ms(lambda: prefill_attention_triton(q, k_cache, k_cache, tables, cu, lens, D ** -0.5, max_seqlen_q=n))
    flops = B * 4 * Hq * D * n * (n + 1) / 2  # QK^T and PV over the causal triangle
    tflops = flops / ms / 1e9
    return {"kernel": "prefill_attention", "shape": f"llama8b B={B} n={n}", "config": "default", "us": ms * 1e3,
            "TFLOPs": tflops, "pct_matmul": 100 * tflops / matmul_tflops_}


def bench_kv_pack(copy_gbps: float) -> list[dict]:
    """Hand-off of 256 blocks (a 4k-token prompt) of a 32-layer, 8-head, D=128 bf16 model."""
    L, H, D, n = PACK_LAYERS, 8, 128, PACK_BLOCKS
    cache = torch.randn(L, 2, n, PAGE, H, D, device=DEVICE, dtype=DTYPE)
    store = torch.empty(n, L, 2, PAGE, H, D, device=DEVICE, dtype=DTYPE)
    src = torch.randperm(n, device=DEVICE)
    dst = torch.randperm(n, device=DEVICE)
    moved = 2 * cache.numel() * cache.element_size()  # read + write
    rows = []
    for name, fn in [("pack_kv", lambda: pack_kv(cache, store, src, dst)),
                     ("unpack_kv", lambda: unpack_kv(store, cache, dst, src))]:
        ms = time_ms(fn)
        gbps = moved / ms / 1e6
        rows.append({"kernel": name, "shape": f"{n} blocks L={L} H={H} D={D}", "config": "default", "us": ms * 1e3,
                     "GBps": gbps, "pct_copy": 100 * gbps / copy_gbps})
    return rows


def print_table(res: dict) -> str:
    lines = [f"device: {res['device']}",
             f"copy {res['copy']['bytes'] / 2**30:g} GiB: {res['copy']['GBps_traffic']:.0f} GB/s read+write "
             f"({res['copy']['GBps_copied']:.0f} GB/s copied); bf16 matmul: {res['matmul']['TFLOPs']:.0f} TFLOP/s",
             f"{'kernel':<24}{'shape':<44}{'config':<40}{'us':>9}{'GB/s':>8}{'%copy':>7}  note"]
    for r in res["rows"]:
        cfg = r["config"] if isinstance(r["config"], str) else " ".join(f"{k}={v}" for k, v in r["config"].items())
        us = f"{r['us']:.1f}" if "us" in r else "-"
        gb = f"{r['GBps']:.0f}" if "GBps" in r else "-"
        pct = f"{r['pct_copy']:.0f}" if "pct_copy" in r else "-"
        if "error" in r:
            note = r["error"]
        elif "TFLOPs" in r:
            note = f"{r['TFLOPs']:.0f} TFLOP/s ({r['pct_matmul']:.0f}% of matmul)"
        elif "timing" in r:
            note = f"{r['timing']}, max err vs ref {r['max_abs_err_vs_ref']:.1e}"
        else:
            note = ""
        lines.append(f"{r['kernel']:<24}{r['shape']:<44}{cfg:<40}{us:>9}{gb:>8}{pct:>7}  {note}")
    dec = [r for r in res["rows"] if r["kernel"] == "paged_decode_attention" and "pct_copy" in r and "error" not in r]
    for shape in sorted({r["shape"] for r in dec}):
        best = max((r for r in dec if r["shape"] == shape), key=lambda r: r["pct_copy"])
        lines.append(f"best decode {shape}: {best['pct_copy']:.0f}% of copy with {best['config']} (target >= 60%)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path("results/kernels.json"))
    ap.add_argument("--table", type=Path, help="also write the printed table here")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop sweeping configs after this long")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_kernels: no CUDA device", file=sys.stderr)
        return 2
    deadline = time.time() + args.budget_s
    args.json.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "errors": [],
           "skipped": []}

    def save():
        args.json.write_text(json.dumps(res, indent=1, default=str))

    res["copy"] = copy_bandwidth()
    res["matmul"] = matmul_tflops()
    save()
    copy_gbps = res["copy"]["GBps_traffic"]
    # every shape's default config first, so a short budget still measures what the engine runs
    for sweep in (False, True):
        for name, Hq, Hkv, D in DECODE_SHAPES:
            cfgs = decode_configs(Hkv)[1:] if sweep else [{}]
            try:
                res["rows"] += bench_decode(name, Hq, Hkv, D, cfgs, copy_gbps, deadline)
            except Exception as e:
                res["errors"].append(f"decode {name}: {type(e).__name__}: {e}"[:500])
            torch.cuda.empty_cache()
            save()
    for extra in (lambda: [bench_prefill(res["matmul"]["TFLOPs"])], lambda: bench_kv_pack(copy_gbps)):
        if time.time() > deadline:
            res["skipped"].append("prefill / pack extras: time budget spent")
            break
        try:
            res["rows"] += extra()
        except Exception as e:
            res["errors"].append(f"{type(e).__name__}: {e}"[:500])
        torch.cuda.empty_cache()
        save()
    table = print_table(res) + "".join(f"\nERROR {e}" for e in res["errors"])
    table += "".join(f"\nSKIPPED {e}" for e in res["skipped"])
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    save()
    return 1 if res["errors"] or any("error" in r and "skipped" not in r["error"] for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
