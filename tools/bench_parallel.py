"""TP/PP groups on this machine: SmolLM2 decode tokens/s and TTFT at TP=1 vs TP=3 and
PP=1 vs PP=2 (the engine driven in-process by its leader, every other rank a process),
with the time each step spends in all-reduce and send/recv; then, through a real mesh,
each heterogeneous prefill -> decode pair's KV hand-off as a share of TTFT (the gateway's
per-stage TTFT histograms).

    python tools/bench_parallel.py [--out results/bench_parallel.json]
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def group_run(model: str, *args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "group_run.py"), "--model", model, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def engine_rows(model: str, prompt: list[int], streams: int, max_tokens: int) -> list[dict]:
    rows = []
    for label, shape in (("TP=1", ["--plain"]), ("TP=3", ["--tp", "3"]),
                         ("PP=2, 1 step in flight", ["--pp", "2", "--micro-batches", "1",
                                                     "--no-pipeline"]),
                         ("PP=2, 1 step, 2 micro-batches", ["--pp", "2", "--micro-batches", "2",
                                                            "--no-pipeline"]),
                         ("PP=2, 2 steps in flight", ["--pp", "2", "--micro-batches", "1"])):
        r = group_run(model, *shape, "--dtype", "auto", "--prompts",
                      json.dumps([prompt] * streams), "--max-tokens", str(max_tokens),
                      "--max-num-batched-tokens", "2048", "--num-kv-blocks", "512")
        ttft = max(r["first_token_s"])
        decode_s = r["generate_s"] - ttft
        steps = r["steps"]
        comm = r.get("comm", {})
        rows.append({
            "shape": label, "streams": streams, "ttft_ms": round(1000 * ttft, 1),
            "decode_tok_s": round(streams * (max_tokens - 1) / decode_s, 1),
            "step_ms": round(1000 * r["generate_s"] / steps, 2),
            "all_reduce_ms_per_step": round(1000 * comm.get("all_reduce", {}).get("s", 0) / steps, 2),
            "all_reduce_calls_per_step": round(comm.get("all_reduce", {}).get("calls", 0) / steps, 1),
            "send_recv_ms_per_step": round(1000 * (comm.get("isend", {}).get("s", 0) + comm.get("wait", {}).get("s", 0)
                                                  + comm.get("recv", {}).get("s", 0)) / steps, 2),
            "broadcast_ms_per_step": round(1000 * comm.get("broadcast", {}).get("s", 0) / steps, 2),
            "leader_wait_ms_per_step": round(1000 * r.get("leader_wait_s", 0) / steps, 2),
            "max_in_flight": r.get("max_in_flight", 1),
            "rss_mb": [round(x) for x in r["rss_mb"]]})
        print(rows[-1], flush=True)
    return rows


def _stage_means(metrics: str) -> dict[str, float]:
    sums, counts = {}, {}
    for m in re.finditer(r'duet_ttft_stage_seconds_(sum|count)\{stage="([^"]+)"\} ([0-9.e+-]+)',
                         metrics):
        (sums if m.group(1) == "sum" else counts)[m.group(2)] = float(m.group(3))
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


def _ttft_mean(metrics: str) -> float:
    s = re.search(r"duet_ttft_seconds_sum ([0-9.e+-]+)", metrics)
    c = re.search(r"duet_ttft_seconds_count ([0-9.e+-]+)", metrics)
    return float(s.group(1)) / float(c.group(1))


def handoff_rows(model: str, requests_n: int) -> list[dict]:
    import openai

    from tools.up import start_mesh
    rows = []
    pairs = [("TP=1 -> TP=1", {}), ("TP=3 -> TP=1", {"prefill_tp": 3}),
             ("TP=1 -> PP=2", {"decode_pp": 2}), ("PP=2 -> TP=3", {"prefill_pp": 2, "decode_tp": 3}),
             ("TP=3 -> PP=2", {"prefill_tp": 3, "decode_pp": 2})]
    text = ("Summarize the history of the printing press in Europe, its spread, and the "
            "changes it brought to science, religion and politics. ") * 6
    for label, shape in pairs:
        with tempfile.TemporaryDirectory() as logs:
            mesh = start_mesh(model, logs, prefill=1, decode=1, dtype="auto", **shape)
            try:
                c = openai.OpenAI(base_url=mesh.url + "/v1", api_key="none", max_retries=0)
                name = c.models.list().data[0].id
                for i in range(requests_n):
                    c.chat.completions.create(model=name, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": f"{i}: {text}"}])
                with urllib.request.urlopen(mesh.url + "/metrics") as r:
                    metrics = r.read().decode()
                stages = _stage_means(metrics)
                ttft = _ttft_mean(metrics)
                rows.append({"pair": label, "requests": requests_n,
                             "ttft_ms": round(1000 * ttft, 1),
                             "kv_handoff_ms": round(1000 * stages.get("kv_handoff", 0), 2),
                             "handoff_share_pct": round(100 * stages.get("kv_handoff", 0) / ttft, 2),
                             "prefill_compute_ms": round(1000 * stages.get("prefill_compute", 0), 1)})
                print(rows[-1], flush=True)
            finally:
                mesh.stop()
    return rows


@click.command()
@click.option("--model", default="smollm2")
@click.option("--out", default=None)
@click.option("--max-tokens", default=64, type=int)
@click.option("--requests", "requests_n", default=8, type=int)
@click.option("--engine-only", is_flag=True, help="skip the hand-off rows (a mesh per pair)")
def main(model, out, max_tokens, requests_n, engine_only):
    from shared.models.hub import resolve_model
    from shared.tokenization import Tokenizer
    path = str(resolve_model(model))
    tok = Tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": (
        "Summarize the history of the printing press in Europe, its spread, and the changes "
        "it brought. ") * 8}])
    t0 = time.time()
    result = {"cores": os.cpu_count(), "prompt_tokens": len(prompt), "max_tokens": max_tokens,
              "engine": engine_rows(path, prompt, 1, max_tokens) + engine_rows(path, prompt, 8, max_tokens),
              "handoff": [] if engine_only else handoff_rows(path, requests_n)}
    result["seconds"] = round(time.time() - t0)
    print(f"\n{'shape':<30} streams  TTFT ms  decode tok/s  step ms  all-reduce ms/step  "
          f"send+recv ms/step  leader waiting ms/step")
    for r in result["engine"]:
        print(f"{r['shape']:<30} {r['streams']:>7} {r['ttft_ms']:>8} {r['decode_tok_s']:>13} "
              f"{r['step_ms']:>8} {r['all_reduce_ms_per_step']:>19} {r['send_recv_ms_per_step']:>18}"
              f" {r['leader_wait_ms_per_step']:>23}")
    print("\nprefill -> decode   TTFT ms  KV hand-off ms  share of TTFT")
    for r in result["handoff"]:
        print(f"{r['pair']:<18} {r['ttft_ms']:>8} {r['kv_handoff_ms']:>15} {r['handoff_share_pct']:>13}%")
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
