"""`python -m services.tokenizer`: run one tokenizer service until SIGTERM/SIGINT."""
from __future__ import annotations

import logging
import signal

import click


@click.command()
@click.option("--model", default="smollm2", show_default=True,
              help="built-in model name or an HF-style model directory")
@click.option("--bind", "bind_addr", default="tcp://127.0.0.1:5570", show_default=True,
              help="ZeroMQ address to bind (tcp://host:port, tcp://host:* or ipc://path)")
@click.option("--curve-dir", default=None, type=click.Path(file_okay=False),
              help="CURVE key directory; when given only its clients may connect")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(model, bind_addr, curve_dir, log_level):
    """Serve tokenization, chat templates and detokenization over ZeroMQ."""
    from services.tokenizer.service import TokenizerService
    from shared.transport import CurveConfig

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    curve = CurveConfig.from_dir(curve_dir, "server") if curve_dir else None
    service = TokenizerService(model, bind_addr, curve)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    click.echo(f"tokenizer ready on {service.address} (model {service.model_dir})", err=False)
    service.serve()
    logging.getLogger("duet.tokenizer").info("tokenizer on %s stopped", service.address)


if __name__ == "__main__":
    main()
