"""Command line for a worker; `services.prefill` and `services.decode` preset the role."""
from __future__ import annotations

import logging

import click

from shared.config import EngineConfig
from services.worker.config import WorkerConfig
from shared.protocol import ROLES


def worker_command(default_role: str):
    @click.command(help=f"Run a Duet model worker (default role: {default_role}).")
    @click.option("--role", type=click.Choice(ROLES), default=default_role, show_default=True)
    @click.option("--model", default="smollm2", show_default=True,
                  help="built-in name or HF-style model directory")
    @click.option("--dtype", default="auto", show_default=True,
                  type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--gateway-addr", default="ipc:///tmp/duet/gateway.sock", show_default=True)
    @click.option("--kvstore-addr", default="ipc:///tmp/duet/kvstore.sock", show_default=True,
                  help="'' for none (role both only)")
    @click.option("--worker-id", default=None)
    @click.option("--num-kv-blocks", default=2048, show_default=True, type=int)
    @click.option("--max-num-seqs", default=64, show_default=True, type=int)
    @click.option("--max-num-batched-tokens", default=2048, show_default=True, type=int)
    @click.option("--threads", default=None, type=int, envvar="DUET_WORKER_THREADS",
                  help="torch threads (default: every core) [env DUET_WORKER_THREADS]")
    @click.option("--attention-backend", default="auto", show_default=True,
                  type=click.Choice(["auto", "torch", "triton"]))
    @click.option("--enforce-eager", is_flag=True, help="no CUDA graphs")
    @click.option("--cuda-graph-max-batch", default=32, show_default=True, type=int,
                  help="largest decode batch replayed from a CUDA graph")
    @click.option("--cuda-graph-max-tokens", default=512, show_default=True, type=int,
                  help="largest prefill/mixed step (tokens) replayed from a CUDA graph; 0: none")
    @click.option("--heartbeat", "heartbeat_s", default=0.5, show_default=True, type=float)
    @click.option("--kv-verify", default="all", show_default=True,
                  type=click.Choice(["all", "sample", "off"]),
                  help="checksums a decode hand-off verifies before decoding: every block, "
                       "one random block, or none")
    @click.option("--kv-transport", default="auto", show_default=True,
                  type=click.Choice(["auto", "shm", "cuda_ipc", "tcp"]),
                  help="how hand-offs reach this worker: map the store's pool (shm, cuda_ipc; "
                       "auto picks it where it can) or read blocks over the wire (tcp: a "
                       "store on another host; decode only)")
    @click.option("--kv-layerwise-min-tokens", "layerwise_min_tokens", default=512,
                  show_default=True, type=int,
                  help="prefill: hand prompts of at least this many uncached tokens over layer "
                       "by layer, so a decode worker reading over tcp fetches each layer while "
                       "later ones compute; 0: never")
    @click.option("--kv-prefetch-mb", "prefetch_max_mb", default=512, show_default=True,
                  type=int, help="decode over tcp: memory for layer-wise fetches in flight")
    @click.option("--tp", default=1, show_default=True, type=int,
                  help="tensor-parallel ranks per pipeline stage (this host spawns the group's "
                       "other ranks; under torchrun they are started for it)")
    @click.option("--pp", default=1, show_default=True, type=int, help="pipeline stages")
    @click.option("--group-timeout", "group_timeout_s", default=20.0, show_default=True,
                  type=float, help="seconds a collective may wait before the group is failed")
    @click.option("--core-share", default=None, envvar="DUET_CORE_SHARE",
                  help="share this host's cores with the other workers given the same name: "
                       "step on all of them (up to --threads) while the others are idle, on "
                       "a fair share while they are busy [env DUET_CORE_SHARE]")
    @click.option("--curve-dir", default=None)
    @click.option("--log-level", default="INFO", show_default=True)
    def cmd(role, model, dtype, device, gateway_addr, kvstore_addr, worker_id, num_kv_blocks,
            max_num_seqs, max_num_batched_tokens, threads, attention_backend, enforce_eager,
            cuda_graph_max_batch, cuda_graph_max_tokens, heartbeat_s, kv_verify, kv_transport,
            layerwise_min_tokens, prefetch_max_mb, tp, pp, group_timeout_s, core_share,
            curve_dir, log_level):
        logging.basicConfig(level=log_level, format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s")
        try:
            eng = EngineConfig(model=model, dtype=dtype, device=device, num_kv_blocks=num_kv_blocks,
                               max_num_seqs=max_num_seqs, threads=threads,
                               attention_backend=attention_backend, enforce_eager=enforce_eager,
                               max_num_batched_tokens=max_num_batched_tokens,
                               cuda_graph_max_batch=cuda_graph_max_batch,
                               cuda_graph_max_tokens=cuda_graph_max_tokens)
            from shared.container import default_worker_id
            worker_id = worker_id or default_worker_id(role)   # in a container: from its id
            kw = {"worker_id": worker_id} if worker_id else {}
            cfg = WorkerConfig(role=role, gateway_addr=gateway_addr, kvstore_addr=kvstore_addr or None,
                               engine=eng, heartbeat_s=heartbeat_s, curve_dir=curve_dir,
                               kv_verify=kv_verify, kv_transport=kv_transport, tp=tp, pp=pp,
                               layerwise_min_tokens=layerwise_min_tokens,
                               prefetch_max_mb=prefetch_max_mb,
                               group_timeout_s=group_timeout_s, core_share=core_share, **kw)
        except ValueError as e:
            raise click.BadParameter(str(e))
        from services.worker.worker import Worker
        from shared.parallel.group import GroupError
        try:
            w = Worker(cfg)
        except (ValueError, GroupError) as e:   # a shape the model cannot take, a pool it
            # cannot use, a rank that cannot reach the group
            raise click.ClickException(str(e))
        w.install_signal_handlers()
        w.run()
    return cmd


def main():
    worker_command("both")()
