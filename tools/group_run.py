"""Run prompts through one engine on a TP x PP group (this process leads, the other ranks
are spawned) and print what came out as JSON: each prompt's tokens, each rank's RSS, step
timings; optionally every sampled token's logits (torch.save, keyed by request and
position, so that shapes scheduling steps differently still compare).

    python tools/group_run.py --model DIR --tp 2 --pp 2 --prompts '[[1,2,3],[4,5]]'
    python tools/group_run.py --plain ...      # the single-process engine, for reference
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@click.command()
@click.option("--model", required=True)
@click.option("--tp", default=1, type=int)
@click.option("--pp", default=1, type=int)
@click.option("--plain", is_flag=True, help="the ordinary one-process engine (no group)")
@click.option("--dtype", default="float32")
@click.option("--prompts", "prompts_json", required=True, help="JSON list of token-id lists")
@click.option("--max-tokens", default=16, type=int)
@click.option("--max-num-batched-tokens", default=512, type=int)
@click.option("--num-kv-blocks", default=256, type=int)
@click.option("--threads", default=None, type=int)
@click.option("--logits-out", default=None, help="torch.save every token's logits here")
@click.option("--micro-batches", default=2, type=int, help="per step, with PP > 1")
@click.option("--no-pipeline", is_flag=True, help="PP decode: one step in flight, not PP")
@click.option("--micro-batch-min-tokens", default=None, type=int,
              help="smallest step split into micro-batches (default: the runner's)")
@click.option("--stagger", is_flag=True, help="add the prompts one step apart (mixed batches)")
def main(model, tp, pp, plain, dtype, prompts_json, max_tokens, max_num_batched_tokens,
         num_kv_blocks, threads, logits_out, micro_batches, no_pipeline, micro_batch_min_tokens,
         stagger):
    import torch

    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    from shared.parallel.launch import spawn_followers
    from shared.parallel.runner import build_group_engine
    cfg = EngineConfig(model=model, dtype=dtype, num_kv_blocks=num_kv_blocks,
                       max_num_batched_tokens=max_num_batched_tokens, threads=threads)
    prompts = json.loads(prompts_json)
    t0 = time.perf_counter()
    procs = []
    if plain:
        from shared.models.hub import resolve_model
        from shared.models.loader import load_model
        eng = LLMEngine(load_model(resolve_model(model), cfg.resolved_dtype()), cfg)
    else:
        procs = spawn_followers(cfg, tp, pp, log_level="WARNING")
        eng = build_group_engine(cfg, tp, pp, procs, micro_batches=micro_batches,
                                 pipeline_decode=not no_pipeline)
        if micro_batch_min_tokens is not None:
            eng.group.micro_batch_min_tokens = micro_batch_min_tokens
    load_s = time.perf_counter() - t0
    rss = [rss_mb(os.getpid())] + [rss_mb(p.pid) for p in procs]
    recorded = {}
    if logits_out and eng.group is not None:
        eng.group.sample_on_last = False   # the logits themselves must come to the leader
    if logits_out:
        def keyed(fn):
            def call(arg):
                logits, seqs = fn(arg)
                for row, s in zip(logits, seqs):   # the logits of token len(s) of s
                    recorded[f"{s.request_id}/{s.index}/{len(s)}"] = row.clone()
                return logits, seqs
            return call
        eng.runner.run = keyed(eng.runner.run)
        if hasattr(eng.runner, "collect"):
            eng.runner.collect = keyed(eng.runner.collect)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"p{i}" for i in range(len(prompts))]
    out = {rid: [] for rid in ids}
    t1 = time.perf_counter()
    pending = list(zip(ids, prompts))
    steps = 0
    first_token_s = {}
    while pending or eng.has_unfinished():
        if pending and (stagger or steps == 0):
            take = 1 if stagger else len(pending)
            for rid, p in pending[:take]:
                eng.add_request(rid, p, params)
            pending = pending[take:]
        for o in eng.step():
            if not out[o.request_id]:
                first_token_s[o.request_id] = time.perf_counter() - t1
            out[o.request_id].extend(o.new_token_ids)
        steps += 1
    gen_s = time.perf_counter() - t1
    if logits_out:
        torch.save(recorded, logits_out)
    group = eng.group
    result = {"tokens": [out[r] for r in ids], "rss_mb": rss, "load_s": load_s,
              "generate_s": gen_s, "steps": steps, "first_token_s": [first_token_s[r] for r in ids],
              "idle": eng.idle_counts(), "max_in_flight": eng.stats.max_in_flight}
    if group is not None:
        result["comm"] = group.group.stats()
        result["leader_step_s"], result["leader_wait_s"] = group.step_s, group.wait_s
        group.stop("done")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
