"""GPU check for the whole mesh: `duet up --device cuda --prefill 1 --decode 1` on one GPU.

The KV-store pool lives in GPU memory and goes to the workers by CUDA IPC; prefill writes
each prompt's KV into it in place, decode copies its blocks out device to device under
the generation fence. Through HTTP (/v1/completions, the user's path):

  parity     32 concurrent greedy streams, fp32: text identical to the in-process CUDA
             engine (the gateway's own incremental detokenizer over the engine's tokens);
             every pool back to idle afterwards
  stages     the TTFT stage table, read from the gateway's /metrics
  speed      output tokens/s at 1, 32 and 128 concurrent streams in bf16, CUDA graphs vs
             eager (--enforce-eager)

The model: SmolLM2-135M's tokenizer and shapes with random weights (the device machine
has no checkpoint and the call carries at most 64 MiB), or --model DIR for a real one.

    python tools/gpu_check_mesh.py --tokenizer-dir DIR --json OUT.json --table OUT.txt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

N_PARITY, PARITY_TOKENS = 32, 32
SPEED_STREAMS, SPEED_PROMPT, SPEED_TOKENS = (1, 32, 128), 128, 128


def make_model(tokenizer_dir: str, out: str) -> str:
    """A model directory: the tokenizer and config of `tokenizer_dir`, random weights
    (projections ~ N(0, 1.5 / sqrt(fan_in)), as tools/gpu_check_engine.py's, so greedy
    tokens depend on the whole context rather than repeating)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = json.loads(open(os.path.join(tokenizer_dir, "config.json")).read())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items()
                                            if k not in ("architectures", "torch_dtype")}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(tokenizer_dir, f)):
            shutil.copy(os.path.join(tokenizer_dir, f), out)
    return out


def prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(100, vocab - 100, (k,), generator=g).tolist() for k in lens]


def post(url: str, body: dict, timeout_s: float = 300) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def run_streams(url: str, name: str, ps: list[list[int]], max_tokens: int,
                streams: int) -> tuple[list[dict], float]:
    body = lambda p: {"model": name, "prompt": p, "max_tokens": max_tokens,  # noqa: E731
                      "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        out = list(ex.map(lambda p: post(url, body(p)), ps))
    return out, time.perf_counter() - t0


def reference_texts(model_dir: str, ps: list[list[int]]) -> list[str]:
    """The in-process CUDA engine's greedy tokens, detokenized as the gateway does."""
    from services.gateway.text_stream import TextStream
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    from shared.tokenization import Tokenizer
    eng = LLMEngine.from_config(EngineConfig(model=model_dir, dtype="float32", device="cuda",
                                             num_kv_blocks=1024))
    sp = SamplingParams(temperature=0, max_tokens=PARITY_TOKENS, ignore_eos=True)
    outs = eng.generate(ps, sp)
    tok = Tokenizer(model_dir)
    texts = []
    for p, o in zip(ps, outs):
        ts = TextStream(tok, p, [])
        ts.add(list(o[0]), final=True)
        texts.append(ts.text)
    del eng
    torch.cuda.empty_cache()
    return texts


def ttft_stages(url: str) -> dict[str, tuple[float, int]]:
    """{stage: (mean ms, count)} from duet_ttft_stage_seconds."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    sums, counts = {}, {}
    for line in text.splitlines():
        if line.startswith("duet_ttft_stage_seconds_sum{") or \
                line.startswith("duet_ttft_stage_seconds_count{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            (sums if "_sum{" in line else counts)[stage] = float(line.rsplit(" ", 1)[1])
    return {s: (1000 * sums[s] / counts[s], int(counts[s])) for s in sums if counts.get(s)}


def mesh(model_dir: str, log_dir: str, dtype: str, eager: bool):
    from tools.up import start_mesh
    args = ("--enforce-eager",) if eager else ("--cuda-graph-max-batch", "128")
    return start_mesh(model_dir, log_dir, device="cuda", dtype=dtype, prefill=1, decode=1,
                      kv_blocks=4096, worker_blocks=4096, max_num_seqs=128, admin_port=0,
                      worker_args=args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-dir", help="a model directory whose tokenizer and config to use")
    ap.add_argument("--model", help="a real model directory instead of random weights")
    ap.add_argument("--json", default="results/gpu_mesh.json")
    ap.add_argument("--table", default=None)
    ap.add_argument("--log-dir", default=None)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="duet-gpu-mesh-")
    log_dir = a.log_dir or os.path.join(work, "logs")
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    lines = [f"device: {res['device']}   date: {res['date']}"]
    try:
        if a.model:
            model_dir, res["model"] = a.model, a.model
        else:
            model_dir = make_model(a.tokenizer_dir, os.path.join(work, "model"))
            res["model"] = "SmolLM2-135M tokenizer and shapes, random weights"
        lines.append(f"model: {res['model']}")
        vocab = json.loads(open(os.path.join(model_dir, "config.json")).read())["vocab_size"]
        name = os.path.basename(model_dir.rstrip("/"))

        # -- parity, fp32 ---------------------------------------------------------------
        ps = prompts(N_PARITY, 8, 300, vocab, seed=1)
        t0 = time.perf_counter()
        want = reference_texts(model_dir, ps)
        res["reference_s"] = time.perf_counter() - t0
        m = mesh(model_dir, os.path.join(log_dir, "fp32"), "float32", eager=False)
        try:
            outs, wall = run_streams(m.url, name, ps, PARITY_TOKENS, N_PARITY)
            got = [o["choices"][0]["text"] for o in outs]
            same = sum(g == w for g, w in zip(got, want))
            res["parity"] = {"identical": same, "of": len(ps), "wall_s": wall}
            first_bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
            if first_bad is not None:
                res["parity"]["first_mismatch"] = {"i": first_bad, "got": got[first_bad][:200],
                                                   "want": want[first_bad][:200]}
            st, health = m.wait_idle(timeout_s=30)
            res["idle"] = {"store": st["stats"], "workers": [
                (w["free_blocks"], w["total_blocks"]) for w in health["workers"]]}
            res["stages"] = ttft_stages(m.url)
        finally:
            m.stop()
        lines.append(f"32 concurrent greedy streams through HTTP, fp32, 1 prefill + 1 decode on "
                     f"one GPU, store pool in GPU memory (cuda_ipc): {same}/{len(ps)} texts "
                     f"identical to the in-process CUDA engine; pools idle after: yes")
        lines.append("TTFT stages (mean ms over the 32 requests):")
        for s, (ms, n) in res["stages"].items():
            lines.append(f"  {s:<18} {ms:9.2f}  (n={n})")

        # -- speed, bf16 -----------------------------------------------------------------
        res["speed"] = {}
        for mode in ("graphs", "eager"):
            m = mesh(model_dir, os.path.join(log_dir, mode), "bfloat16", eager=(mode == "eager"))
            try:
                run_streams(m.url, name, prompts(4, 32, 64, vocab, seed=3), 8, 4)   # warm
                for n in SPEED_STREAMS:
                    ps = prompts(2 * n if n > 1 else 4, SPEED_PROMPT, SPEED_PROMPT, vocab, seed=n)
                    outs, wall = run_streams(m.url, name, ps, SPEED_TOKENS, n)
                    toks = sum(o["usage"]["completion_tokens"] for o in outs)
                    res["speed"][f"{mode}/{n}"] = {"requests": len(ps), "tokens": toks,
                                                   "wall_s": wall, "tok_s": toks / wall}
                m.wait_idle(timeout_s=30)
            finally:
                m.stop()
        lines.append(f"output tokens/s through HTTP, bf16, prompts of {SPEED_PROMPT} tokens, "
                     f"{SPEED_TOKENS} new each (requests = 2 x streams):")
        lines.append("  streams   graphs tok/s   eager tok/s   graphs/eager")
        for n in SPEED_STREAMS:
            g, e = res["speed"][f"graphs/{n}"]["tok_s"], res["speed"][f"eager/{n}"]["tok_s"]
            lines.append(f"  {n:>7}   {g:12.1f}   {e:11.1f}   {g / e:11.2f}x")
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        lines.append(f"ERROR {res['error']}")
        import traceback
        traceback.print_exc()
        for root, _, files in os.walk(log_dir):
            for f in sorted(files):
                with open(os.path.join(root, f), errors="replace") as fh:
                    tail = fh.read().splitlines()[-25:]
                print(f"--- {os.path.join(root, f)} (last lines)\n" + "\n".join(tail), flush=True)
    finally:
        table = "\n".join(lines)
        print(table, flush=True)
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        if a.table:
            with open(a.table, "w") as f:
                f.write(table + "\n")
        if not a.log_dir:
            shutil.rmtree(work, ignore_errors=True)
    ok = "error" not in res and res["parity"]["identical"] == res["parity"]["of"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
