"""The `duet` command line: run the mesh, talk to the engine, debug services."""
from __future__ import annotations

import json
import sys
import time

import click


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
    from shared.engine.outputs import TextStream
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


if __name__ == "__main__":
    main()
