"""`python -m services.kvstore`: run the KV-block store until SIGINT/SIGTERM.

Every flag can also come from the environment as DUET_KVSTORE_<FLAG>
(e.g. DUET_KVSTORE_NUM_BLOCKS=4096).
"""
from __future__ import annotations

import logging
import signal

import click
import zmq

from services.kvstore.config import BLOCK_SIZES, KVStoreConfig
from shared.config import DTYPE_NAMES


@click.command(context_settings={"auto_envvar_prefix": "DUET_KVSTORE", "show_default": True})
@click.option("--bind", default="ipc:///tmp/duet/kvstore.sock",
              help="ZeroMQ address to bind: ipc://PATH or tcp://HOST:PORT.")
@click.option("--model", default="smollm2",
              help="Built-in model name or HF-style directory; sizes the pool (layers, KV heads, head dim).")
@click.option("--dtype", default="auto", type=click.Choice(["auto", *DTYPE_NAMES]),
              help="Element type of the pool; auto = as the engine picks on this CPU.")
@click.option("--num-blocks", default=1024, type=click.IntRange(min=1), help="Blocks in the pool.")
@click.option("--block-size", default=16, type=click.Choice([str(b) for b in BLOCK_SIZES]),
              help="Tokens per block (must match the workers').")
@click.option("--lease-ttl", "lease_ttl_s", default=30.0, type=click.FloatRange(min=0, min_open=True),
              help="Seconds an unclaimed lease lives before its blocks are freed.")
@click.option("--curve-dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="CURVE key directory; when given only its clients are admitted.")
@click.option("--metrics-port", default=None, type=click.IntRange(1, 65535),
              help="Serve Prometheus metrics over HTTP on this port.")
@click.option("--device", default="cpu",
              help="Where the pool lives: cpu (host shared memory) or cuda[:N] (that GPU's memory, "
                   "handed to workers on this host by CUDA IPC).")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(bind, model, dtype, num_blocks, block_size, lease_ttl_s, curve_dir, metrics_port, device,
         log_level):
    """Duet KV store: the block pool, prefix cache and leases shared by prefill and decode."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s kvstore %(name)s: %(message)s")
    from shared.models.hub import resolve_model
    from services.kvstore.service import KVStoreService

    try:
        model_dir = resolve_model(model)
        config = KVStoreConfig(model_dir=str(model_dir), bind=bind, dtype=dtype, num_blocks=num_blocks,
                               block_size=int(block_size), lease_ttl_s=lease_ttl_s, curve_dir=curve_dir,
                               metrics_port=metrics_port, device=device)
        service = KVStoreService(config)
    except (ValueError, FileNotFoundError, OSError, zmq.ZMQError) as e:
        raise click.ClickException(str(e)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: service.stop())
    logging.getLogger("services.kvstore").info("ready on %s", service.address)
    try:
        service.run()
    finally:
        service.close()


if __name__ == "__main__":
    main()
