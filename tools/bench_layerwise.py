"""The layer-wise tcp hand-off through a real mesh: time to the first and the second token of
long prompts, with the decode worker reading over tcp layer by layer, over tcp after the
prefill, and mapping the pool (shm), one mesh after another on this machine.

    python tools/bench_layerwise.py [--lengths 1024,4096] [--reps 3] [--rounds 2]
        [--json results/bench_layerwise.json]

Each mode is `duet up`'s 1 prefill + 1 decode mesh on SmolLM2 (bf16 where the CPU runs
it): shm (the decode worker maps the store's pool), tcp (--kv-transport tcp,
--kv-layerwise-min-tokens 0: the blocks are read once prefill committed) and tcp
layer-wise (the default 512: each layer fetched while prefill computes the next). One
streaming /v1/completions request at a time, a fresh random prompt each (no prefix hits),
8 tokens out. Token 1 comes from prefill, so the hand-off shows in token 2: TTFT, time to
token 2 (TT2T), and the decode side's kv_handoff stage (its claim to its copy) from the
gateway's /metrics. The modes take turns --rounds times (this VM's speed drifts by
+-20% over minutes); medians over every round's --reps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"shm": dict(kv_transport="auto"),
         "tcp": dict(kv_transport="tcp", layerwise_min_tokens=0),
         "tcp layer-wise": dict(kv_transport="tcp", layerwise_min_tokens=512)}


def stream(url: str, ids: list[int], max_tokens: int = 8) -> tuple[float, float]:
    """(TTFT, time to token 2) in seconds of one streaming completion."""
    body = json.dumps({"model": "smollm2", "prompt": ids, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    t0, times = time.perf_counter(), []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter() - t0)
    return times[0], times[1]


def handoff_sum(url: str) -> tuple[float, float]:
    """(sum, count) of the gateway's kv_handoff stage histogram."""
    s = c = 0.0
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if 'stage="kv_handoff"' in line:
                if line.startswith("duet_ttft_stage_seconds_sum"):
                    s = float(line.split()[-1])
                elif line.startswith("duet_ttft_stage_seconds_count"):
                    c = float(line.split()[-1])
    return s, c


def run_mode(name: str, model_dir: str, lengths: list[int], reps: int, vocab: int,
             seed: int, samples: dict) -> None:
    """One mesh of this mode: --reps requests per length, into samples[(mode, length)]."""
    from tools.up import start_mesh
    mesh = start_mesh(model_dir, tempfile.mkdtemp(prefix="bench-lw-"), prefill=1, decode=1,
                      dtype="auto", kv_blocks=2048, worker_blocks=2048, **MODES[name])
    rng = random.Random(seed)
    try:
        stream(mesh.url, [rng.randrange(100, vocab) for _ in range(600)])   # warm-up
        for n in lengths:
            got = samples.setdefault((name, n), {"ttft": [], "tt2t": [], "handoff": [],
                                                  "early": []})
            for _ in range(reps):
                s0, c0 = handoff_sum(mesh.url)
                a, b = stream(mesh.url, [rng.randrange(100, vocab) for _ in range(n)])
                s1, c1 = handoff_sum(mesh.url)
                got["ttft"].append(a)
                got["tt2t"].append(b)
                got["handoff"].append((s1 - s0) / max(c1 - c0, 1))
                lines = [h for h in mesh.kv_status()["handoffs"] if h["blocks"] >= n // 16]
                if name != "shm" and lines:
                    h = lines[-1]
                    got["early"].append(h["layers_read_before_commit"] / max(h["layers_read"], 1))
            print(f"  {name:15s} {n:5d} tokens: TTFT {1e3 * got['ttft'][-1]:8.1f} ms  token 2 "
                  f"at {1e3 * got['tt2t'][-1]:8.1f} ms", flush=True)
    finally:
        mesh.stop()


def summarize(samples: dict) -> list[dict]:
    med = statistics.median
    rows = []
    for (name, n), got in samples.items():
        row = {"mode": name, "prompt_tokens": n, "samples": len(got["ttft"]),
               "ttft_ms": round(1e3 * med(got["ttft"]), 1),
               "tt2t_ms": round(1e3 * med(got["tt2t"]), 1),
               "kv_handoff_ms": round(1e3 * med(got["handoff"]), 2)}
        if got["early"]:
            row["early_share"] = round(med(got["early"]), 3)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default="results/bench_layerwise.json")
    a = ap.parse_args()
    from shared.models.config import ModelConfig
    from shared.models.hub import resolve_model
    model_dir = str(resolve_model("smollm2"))
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    lengths = [int(x) for x in a.lengths.split(",")]
    samples: dict = {}
    for r in range(a.rounds):
        for name in a.modes.split(","):
            run_mode(name, model_dir, lengths, a.reps, vocab, r, samples)
    rows = summarize(samples)
    print("\n| mode | prompt tokens | TTFT ms | token 2 at ms | kv_handoff ms | "
          "fetched before commit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        share = f"{r['early_share']:.0%}" if "early_share" in r else "–"
        print(f"| {r['mode']} | {r['prompt_tokens']} | {r['ttft_ms']} | {r['tt2t_ms']} | "
              f"{r['kv_handoff_ms']} | {share} |")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
