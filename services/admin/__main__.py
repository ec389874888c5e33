"""python -m services.admin: the Flask admin console (served by waitress)."""
from __future__ import annotations

import logging
import os

import click


@click.command(help="Run the Duet admin console: workers, KV pool and lease ledger, TTFT "
                    "by stage, goodput; flip roles and drain workers.")
@click.option("--gateway-url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--kvstore-addr", default="ipc:///tmp/duet/kvstore.sock", show_default=True,
              help="'' to leave the KV-store out")
@click.option("--tokenizer-addr", default="ipc:///tmp/duet/tokenizer.sock", show_default=True,
              help="'' to leave the tokenizer out")
@click.option("--supervisor-url", default=None,
              help="duet up's supervisor metrics (restarts per service), e.g. http://127.0.0.1:8002")
@click.option("--curve-dir", default=None, help="the mesh's CURVE keys (duet keys generate)")
@click.option("--api-key", default=None, envvar="DUET_API_KEY",
              help="a gateway API key, when the gateway requires one [env DUET_API_KEY]")
@click.option("--token", default=None, envvar="DUET_ADMIN_TOKEN",
              help="require this bearer token for the console's API [env DUET_ADMIN_TOKEN]")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="a Host name (besides loopback) browsers may use to reach the console")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--log-level", default="INFO", show_default=True)
def main(gateway_url, kvstore_addr, tokenizer_addr, supervisor_url, curve_dir, api_key, token,
         allow_hosts, host, port, log_level):
    logging.basicConfig(level=log_level, format="%(asctime)s admin[%(process)d] %(levelname)s %(message)s")
    from services.admin.app import create_app
    from services.admin.sources import Sources
    from services.gateway.server import serve
    try:
        sources = Sources(gateway_url, kvstore_addr or None, tokenizer_addr or None,
                          supervisor_url=supervisor_url, curve_dir=curve_dir, api_key=api_key)
    except ValueError as e:
        raise click.BadParameter(str(e))
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise click.UsageError(f"--host {host} would let anyone who reaches it flip roles and "
                               f"drain workers: set --token (or DUET_ADMIN_TOKEN), or keep "
                               f"--host 127.0.0.1 and tunnel to it")
    hosts = tuple(allow_hosts) + ((host,) if host not in ("0.0.0.0", "::") else ())
    logging.info("admin console on http://%s:%d (pid %d)", host, port, os.getpid())
    from services.admin.sources import History
    history = History(sources).start()   # the charts' readings, every 2 s, 10 minutes kept
    try:
        serve(create_app(sources, token=token, allowed_hosts=hosts, history=history), host,
              port, threads=8)
    finally:
        history.stop()
        sources.close()


if __name__ == "__main__":
    main()
