"""python -m services.gateway: the OpenAI-compatible HTTP front of the mesh."""
from __future__ import annotations

import logging

import click


@click.command(help="Run the Duet gateway: OpenAI API over HTTP, router to the workers.")
@click.option("--model", default="smollm2", show_default=True, help="built-in name or model dir")
@click.option("--served-model-name", default=None, help="name clients use (default: --model)")
@click.option("--router-addr", default="ipc:///tmp/duet/gateway.sock", show_default=True,
              help="ZeroMQ address workers connect to")
@click.option("--tokenizer-addr", "tokenizer_addrs", multiple=True,
              default=["ipc:///tmp/duet/tokenizer.sock"], show_default=True)
@click.option("--kvstore-addr", default="ipc:///tmp/duet/kvstore.sock", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", default=600, show_default=True, type=click.IntRange(4, 4096))
@click.option("--heartbeat", "heartbeat_s", default=0.5, show_default=True, type=float)
@click.option("--queue-timeout", "queue_timeout_s", default=30.0, show_default=True,
              type=click.FloatRange(min=0),
              help="seconds a request may wait for a worker before a 503 with Retry-After")
@click.option("--api-keys", default=None, help="comma-separated keys; requests need one")
@click.option("--max-concurrency-per-key", default=64, show_default=True,
              type=click.IntRange(min=0), help="requests one API key may hold at once; more "
              "get 429 (0: no limit)")
@click.option("--generation-config", default="auto", show_default=True,
              type=click.Choice(["auto", "none"]),
              help="auto: the model's generation_config.json sets default sampling parameters "
                   "(temperature, top_p, top_k, min_p, repetition_penalty), which requests "
                   "override; none: OpenAI's defaults")
@click.option("--curve-dir", default=None)
@click.option("--log-level", default="INFO", show_default=True)
def main(model, served_model_name, router_addr, tokenizer_addrs, kvstore_addr, host, port,
         threads, heartbeat_s, queue_timeout_s, api_keys, max_concurrency_per_key,
         generation_config, curve_dir, log_level):
    logging.basicConfig(level=log_level, format="%(asctime)s gateway[%(process)d] %(levelname)s %(message)s")
    from shared.models.hub import resolve_model
    from services.gateway.admin_routes import admin_blueprint
    from services.gateway.app import create_app
    from services.gateway.broker_client import BrokerClient
    from services.gateway.server import serve

    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:   # one fd per client connection: hundreds of streams need headroom
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    keys = {k.strip() for k in api_keys.split(",") if k.strip()} if api_keys else None
    backend = BrokerClient(resolve_model(model), router_addr, list(tokenizer_addrs),
                          kvstore_addr or None, heartbeat_s=heartbeat_s, curve_dir=curve_dir,
                          model_name=served_model_name or model, queue_timeout_s=queue_timeout_s)
    from shared.sampling_defaults import describe, sampling_defaults
    try:
        defaults = sampling_defaults(resolve_model(model)) if generation_config == "auto" else {}
    except ValueError as e:
        backend.close()
        raise click.ClickException(str(e)) from None
    logging.info("sampling defaults: %s (a request's own values override them)", describe(defaults))
    app = create_app(backend, api_keys=keys, max_concurrency_per_key=max_concurrency_per_key,
                     sampling_defaults=defaults)
    app.register_blueprint(admin_blueprint(backend, keys))
    logging.info("workers connect to %s", router_addr)
    try:
        serve(app, host, port, threads=threads)   # until SIGINT/SIGTERM
    finally:
        backend.close()


if __name__ == "__main__":
    main()
