"""Engine benchmark on SmolLM2, baselines in the same run; prints a table, writes JSON.

    python tools/bench_engine.py [--dtype auto] [--json results/bench_engine.json]

Rows: single-stream decode vs transformers.generate (same weights, fp32), aggregate
decode at 32 concurrent streams, prefill of a 1,000-token prompt. llama.cpp (the
CPU speed peer) is measured when llama-cpp-python is installed, else the figures the
project measured on this machine class are shown and marked as quoted.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

LLAMA_CPP_QUOTED = {"decode_1": 131.0, "prefill_1000": 250.0}


def bench_duet(dtype: str, decode_tokens: int, streams: int) -> dict:
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    eng = LLMEngine.from_config(EngineConfig(dtype=dtype, num_kv_blocks=4096,
                                             max_num_batched_tokens=2048))
    tok = eng.tokenizer
    prompt = tok.encode("Once upon a time, in a land far away, there lived")
    sp = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    eng.generate([prompt], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    t = time.perf_counter()
    eng.generate([prompt], sp)
    single = decode_tokens / (time.perf_counter() - t)
    prompts = [tok.encode(f"Story {i}: once upon a time there was a") for i in range(streams)]
    eng.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2))
    # steady-state decode: time only steps after every stream has finished its prompt
    for i, p in enumerate(prompts):
        eng.add_request(f"b{i}", p, sp)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) \
            or eng.scheduler.waiting:
        eng.step()
    n0, t = eng.stats.decode_tokens, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    batched = (eng.stats.decode_tokens - n0) / (time.perf_counter() - t)
    long_prompt = [(i * 7919) % 40000 + 100 for i in range(1000)]
    eng.block_manager.reset_prefix_cache()
    t = time.perf_counter()
    eng.generate([long_prompt], SamplingParams(temperature=0, max_tokens=1))
    prefill = 1000 / (time.perf_counter() - t)
    return {"dtype": str(eng.model.embed_tokens.weight.dtype).replace("torch.", ""),
            "decode_1": single, f"decode_{streams}": batched, "prefill_1000": prefill}


def bench_transformers(decode_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from shared.models.hub import prepare_model
    path = prepare_model("smollm2", quiet=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok("Once upon a time, in a land far away, there lived")["input_ids"]])
    model.generate(ids, max_new_tokens=4, do_sample=False)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                   do_sample=False)
    return {"decode_1": decode_tokens / (time.perf_counter() - t)}


def bench_llama_cpp(decode_tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from shared.models.hub import packaged_gguf
    llm = Llama(str(packaged_gguf("smollm2")), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    t = time.perf_counter()
    llm("Once upon a time", max_tokens=decode_tokens, temperature=0)
    dec = decode_tokens / (time.perf_counter() - t)
    long = " ".join(["word"] * 1000)
    t = time.perf_counter()
    llm(long, max_tokens=1)
    return {"decode_1": dec, "prefill_1000": 1000 / (time.perf_counter() - t)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--json", default="results/bench_engine.json")
    a = ap.parse_args()
    duet = bench_duet(a.dtype, a.decode_tokens, a.streams)
    hf = bench_transformers(a.decode_tokens)
    lc = bench_llama_cpp(a.decode_tokens)
    lc_src = "measured" if lc else "quoted"
    lc = lc or LLAMA_CPP_QUOTED
    s = f"decode_{a.streams}"
    rows = [
        ("decode, 1 stream (tok/s)", duet["decode_1"], f"transformers fp32 {hf['decode_1']:.1f}",
         duet["decode_1"] / hf["decode_1"], 2.0),
        (f"decode, {a.streams} streams aggregate (tok/s)", duet[s],
         f"llama.cpp 1 stream {lc['decode_1']:.1f} ({lc_src})", duet[s] / lc["decode_1"], 2.0),
        ("prefill, 1000-token prompt (tok/s)", duet["prefill_1000"],
         f"llama.cpp {lc['prefill_1000']:.1f} ({lc_src})", duet["prefill_1000"] / lc["prefill_1000"], 1.2),
    ]
    print(f"\nDuet engine on SmolLM2-135M, dtype {duet['dtype']}, {os.cpu_count()} CPU threads")
    print(f"{'metric':42} {'duet':>9}  {'baseline':34} {'ratio':>6} {'target':>7}")
    for name, v, base, ratio, target in rows:
        print(f"{name:42} {v:9.1f}  {base:34} {ratio:5.2f}x {target:5.1f}x {'ok' if ratio >= target else 'MISSED'}")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"duet": duet, "transformers": hf, "llama_cpp": lc, "llama_cpp_source": lc_src,
                   "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
