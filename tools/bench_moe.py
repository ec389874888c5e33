"""Decode speed of a small random mixture-of-experts model beside the dense model with the
same active parameters, in one process, on this machine; prints a table.

    python tools/bench_moe.py [--streams 1,8] [--tokens 32] [--json results/bench_moe.json]

The MoE model is a Qwen3-MoE config (hidden 512, 8 layers, 16 experts of 512, top-2) with
random weights; its dense twin a Qwen3 (same attention) whose MLP is the size of the two
active experts (1024), so both do the same FLOPs per token. Each runs --tokens greedy
decode steps per stream after a 64-token prompt; the FLOPs per token count every matmul
a decode token runs (2 x the active weights it multiplies, attention's over its context
included). The MoE row pays for the routing and for gathering each expert's tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

COMMON = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def save(kind: str, where: str) -> str:
    import transformers
    torch.manual_seed(0)
    if kind == "moe":
        cfg = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=1024, moe_intermediate_size=512,
                                          num_experts=16, num_experts_per_tok=2, norm_topk_prob=True)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, intermediate_size=1024))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    path = os.path.join(where, kind)
    model.save_pretrained(path, safe_serialization=True)
    return path


def flops_per_token(cfg, context: int) -> float:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
    inter = cfg.moe_intermediate_size * cfg.num_experts_per_tok if cfg.is_moe \
        else cfg.intermediate_size
    mlp = 3 * h * inter + (h * cfg.num_experts if cfg.is_moe else 0)
    scores = 2 * cfg.num_heads * d * context
    return cfg.num_layers * (2 * (attn + mlp) + 2 * scores) + 2 * h * cfg.vocab_size


def run(path: str, streams: int, tokens: int, dtype: str) -> dict:
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    from shared.models.loader import load_model
    model = load_model(path, dtype)
    eng = LLMEngine(model, EngineConfig(model=path, dtype=dtype, num_kv_blocks=512))
    prompts = [[(7 * i + j) % 8000 + 100 for j in range(64)] for i in range(streams)]
    eng.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=tokens + 1,
                                                   ignore_eos=True))
    eng.step()                                      # the prompts, then only decode steps
    t0, made = time.perf_counter(), 0
    while eng.has_unfinished():
        made += sum(len(o.new_token_ids) for o in eng.step())
    dt = time.perf_counter() - t0
    f = flops_per_token(model.config, 64 + tokens // 2)
    return {"streams": streams, "tok_s": round(made / dt, 1),
            "gflop_per_token": round(f / 1e9, 4), "gflop_s": round(made * f / dt / 1e9, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default="results/bench_moe.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as where:
        for kind in ("moe", "dense"):
            path = save(kind, where)
            for s in (int(x) for x in a.streams.split(",")):
                r = dict(run(path, s, a.tokens, a.dtype), model=kind)
                rows.append(r)
                print(r, flush=True)
    print("\n| model | streams | decode tok/s | GFLOP per token | GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['streams']} | {r['tok_s']} | {r['gflop_per_token']} | "
              f"{r['gflop_s']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "dtype": a.dtype, "date": time.strftime("%Y-%m-%d")}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
