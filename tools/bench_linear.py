"""The CPU decode step's two C++ paths beside their baselines, in one process; prints tables.

    python tools/bench_linear.py [--json results/bench_linear.json]

1. bf16 linears: every linear of SmolLM2-135M's shape (30 layers of distinct random
   weights, qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, lm_head 49152x576,
   269 MB: more than the caches hold, so each pass streams the weights from memory) through
   oneDNN's prepacked GEMM (torch.ops.mkldnn) and Duet's kernel (duet_kernels/cpu/linear.cpp),
   at 1..256 rows.
2. The engine's decode step on the real SmolLM2 (bf16): the fused decode stack
   (duet_kernels/cpu/decode_stack.cpp) against the layer-by-layer path (DUET_FUSED_DECODE=0), at
   1, 8 and 32 streams, with the greedy tokens of both compared.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def timed(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def bench_linears(rows: list[int]) -> list[dict]:
    from duet_kernels import cpu_kernels
    mod = cpu_kernels.load()
    if mod is None or not mod.linear_bf16_supported():
        raise SystemExit("Duet's bf16 linear needs AVX-512 BF16 or AVX2+FMA, and the C++ kernels")
    torch.manual_seed(0)
    ws = [torch.randn(n, k).to(torch.bfloat16) for _ in range(30) for n, k in SHAPES]
    ws.append(torch.randn(*LM_HEAD).to(torch.bfloat16))
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in ws]
    duet = [mod.pack_bf16(w) for w in ws]
    mb = sum(w.numel() for w in ws) * 2 / 1e6
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in (576, 1536)}

        def one():
            for w, p in zip(ws, onednn):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        def own():
            for w, p in zip(ws, duet):
                mod.linear_bf16(xs[w.shape[1]], p, w.shape[0])
        reps = max(3, 40 // max(1, m // 8))
        a, b = timed(one, reps), timed(own, reps)
        out.append({"rows": m, "onednn_ms": round(a, 2), "duet_ms": round(b, 2),
                    "onednn_gb_s": round(mb / a, 1), "duet_gb_s": round(mb / b, 1),
                    "speedup": round(a / b, 2)})
        print(f"  rows {m:4d}: oneDNN {a:7.2f} ms ({mb / a:5.1f} GB/s)   Duet {b:7.2f} ms "
              f"({mb / b:5.1f} GB/s)   {a / b:.2f}x", flush=True)
    return out


def bench_steps(streams: list[int], tokens: int) -> list[dict]:
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    eng = LLMEngine.from_config(EngineConfig(dtype="bfloat16", num_kv_blocks=2048,
                                             max_num_batched_tokens=2048))
    tok = eng.tokenizer
    out = []
    for b in streams:
        prompts = [tok.encode(f"Story {i}: once upon a time, in a land far away, there lived")
                   for i in range(b)]
        ms, toks = {"1": [], "0": []}, {}
        for mode in ("1", "0", "1", "0"):   # interleaved: drift hits both alike
            os.environ["DUET_FUSED_DECODE"] = mode
            eng.model._stack = None
            eng.block_manager.reset_prefix_cache()
            sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
            ids = [f"{mode}-{b}-{i}-{len(ms[mode])}" for i in range(b)]
            for rid, p in zip(ids, prompts):
                eng.add_request(rid, p, sp)
            got = {rid: [] for rid in ids}
            while any(s.num_computed_tokens < s.num_prompt_tokens
                      for s in eng.scheduler.running) or eng.scheduler.waiting:
                for o in eng.step():
                    got[o.request_id].extend(o.new_token_ids)
            n, t = 0, time.perf_counter()
            while eng.has_unfinished():
                for o in eng.step():
                    got[o.request_id].extend(o.new_token_ids)
                n += 1
            ms[mode].append((time.perf_counter() - t) / n * 1e3)
            toks.setdefault(mode, [got[r] for r in ids])
        os.environ.pop("DUET_FUSED_DECODE", None)
        fused, loop = min(ms["1"]), min(ms["0"])
        same = toks["1"] == toks["0"]
        out.append({"streams": b, "fused_ms": round(fused, 2), "layer_loop_ms": round(loop, 2),
                    "speedup": round(loop / fused, 2), "same_tokens": same})
        print(f"  {b:3d} streams: fused {fused:6.2f} ms/step   layer by layer {loop:6.2f} "
              f"ms/step   {loop / fused:.2f}x   tokens identical: {same}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8,16,64,256")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--json", default="results/bench_linear.json")
    a = ap.parse_args()
    print(f"bf16 linears of SmolLM2's shape ({torch.get_num_threads()} threads):")
    lin = bench_linears([int(r) for r in a.rows.split(",")])
    print("decode step, SmolLM2 bf16 in-process (best of 2 each):")
    steps = bench_steps([int(s) for s in a.streams.split(",")], a.tokens)
    res = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
           "linears": lin, "decode_steps": steps}
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    print("\n| rows | oneDNN ms | Duet ms | Duet GB/s | speedup |\n| --- | --- | --- | --- | --- |")
    for r in lin:
        print(f"| {r['rows']} | {r['onednn_ms']} | {r['duet_ms']} | {r['duet_gb_s']} | "
              f"{r['speedup']}x |")
    print("\n| streams | fused ms/step | layer by layer | speedup | same tokens |\n"
          "| --- | --- | --- | --- | --- |")
    for r in steps:
        print(f"| {r['streams']} | {r['fused_ms']} | {r['layer_loop_ms']} | {r['speedup']}x | "
              f"{r['same_tokens']} |")


if __name__ == "__main__":
    main()
