"""Debug tools for a running mesh: `duet status`, `duet kv ...`, `duet tokenizer ...`.

Each talks to one service over its own socket (ZeroMQ with the mesh's CURVE keys, or
the gateway over HTTP). Addresses and keys come from the options, else from the mesh
file that `duet up` writes while it runs ($DUET_HOME/mesh.json), so on the machine that
runs `duet up` the commands need no options at all.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import click

DEFAULT_URL = "http://127.0.0.1:8000"


def mesh_file() -> Path:
    from shared.models.hub import duet_home
    return duet_home() / "mesh.json"


def write_mesh_file(mesh) -> Path:
    """Record a started mesh's addresses and key dir for the debug tools (0600)."""
    path = mesh_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "url": mesh.url, "admin_url": mesh.admin_url,
            "supervisor_url": mesh.supervisor_url,
            "addr": mesh.addr, "curve_dir": mesh.curve_dir, "run_dir": mesh.run_dir}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)   # O_CREAT's mode applies only to a new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)
    return path


def remove_mesh_file(mesh) -> None:
    """Remove the mesh file if it still describes this mesh (another may have replaced it)."""
    path = mesh_file()
    try:
        if json.loads(path.read_text()).get("run_dir") == mesh.run_dir:
            path.unlink()
    except (OSError, ValueError):
        pass


def running_mesh() -> dict | None:
    """The mesh file's contents when the `duet up` that wrote it is still alive."""
    try:
        info = json.loads(mesh_file().read_text())
        os.kill(info["pid"], 0)
        if not os.path.isdir(info["run_dir"]):   # a reused pid after a crash
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def _need(value, key: str, flag: str):
    """An option's value, else the running mesh's, else a clear error."""
    if value:
        return value
    info = running_mesh()
    if info is None:
        raise click.UsageError(f"no running mesh found ({mesh_file()} is missing or its "
                               f"`duet up` has exited): start one with `duet up` or pass {flag}")
    return info["addr"][key] if key in ("kvstore", "tokenizer", "gateway") else info[key]


def _curve_dir(curve_dir: str | None, insecure: bool) -> str | None:
    """The key dir to use: --curve-dir, else the running mesh's; none with --insecure."""
    if insecure:
        return None
    if curve_dir is None:
        info = running_mesh()
        curve_dir = info.get("curve_dir") if info else None
    return curve_dir or None


def _curve(curve_dir: str | None, insecure: bool):
    """Client keys (a CurveConfig) from _curve_dir, or None."""
    curve_dir = _curve_dir(curve_dir, insecure)
    if not curve_dir:
        return None
    from shared.transport import CurveConfig
    return CurveConfig.from_dir(curve_dir, "client")


def gateway_url(url: str | None) -> str:
    """--url, else the running mesh's gateway, else the default port."""
    if url:
        return url.rstrip("/")
    info = running_mesh()
    return info["url"] if info else DEFAULT_URL


_addr_opts = [
    click.option("--curve-dir", default=None, help="client keys (default: the running mesh's)"),
    click.option("--insecure", is_flag=True, help="connect without CURVE"),
    click.option("--timeout", "timeout_s", default=5.0, show_default=True, type=float),
]


def _with(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@contextmanager
def _context():
    from shared.transport import close_context, make_context
    ctx = make_context()
    try:
        yield ctx
    finally:
        close_context(ctx)


def _fail(service: str, addr: str, e: Exception):
    raise click.ClickException(f"{service} at {addr}: {type(e).__name__}: {e}")


# -- duet kv ----------------------------------------------------------------------------
@click.group("kv")
def kv():
    """Inspect the KV-store: pool counts, the live lease ledger, prefix hits."""


@contextmanager
def _kv_client(addr, curve_dir, insecure, timeout_s):
    from services.kvstore.client import KVStoreClient
    addr = _need(addr, "kvstore", "--addr")
    with _context() as ctx, KVStoreClient(ctx, addr, f"duet-cli-{uuid.uuid4().hex[:10]}",
                                          curve=_curve(curve_dir, insecure),
                                          timeout_s=timeout_s) as client:
        yield addr, client


def _kv_status(addr, curve_dir, insecure, timeout_s) -> tuple[str, dict]:
    with _kv_client(addr, curve_dir, insecure, timeout_s) as (addr, client):
        try:
            return addr, client.status()
        except Exception as e:
            _fail("kvstore", addr, e)


@kv.command("status")
@click.option("--addr", default=None, help="the store's address (default: the running mesh's)")
@_with(_addr_opts)
@click.option("--json", "as_json", is_flag=True)
def kv_status(addr, curve_dir, insecure, timeout_s, as_json):
    """Pool counts: free, cached (prefix index), leased; leases; prefix hit rate."""
    addr, st = _kv_status(addr, curve_dir, insecure, timeout_s)
    if as_json:
        click.echo(json.dumps({k: st[k] for k in ("stats", "idle", "dtype", "pool")}, indent=1))
        return
    s, pool = st["stats"], st["pool"]
    hit = s["hit_tokens"] / s["lookup_tokens"] if s["lookup_tokens"] else None
    click.echo(f"kvstore {addr}  {'idle' if st['idle'] else 'busy'}  pool {pool['backend']} "
               f"{pool.get('base', '')} {st['dtype']} {pool['shape']}")
    for k in ("total_blocks", "free_blocks", "cached_blocks", "leased_blocks", "leases",
              "expired_leases"):
        click.echo(f"  {k:<15} {s[k]}")
    click.echo(f"  {'prefix hits':<15} {s['hit_tokens']} of {s['lookup_tokens']} looked-up tokens"
               + (f" ({hit:.1%})" if hit is not None else ""))


@kv.command("ledger")
@click.option("--addr", default=None, help="the store's address (default: the running mesh's)")
@_with(_addr_opts)
@click.option("--json", "as_json", is_flag=True)
def kv_ledger(addr, curve_dir, insecure, timeout_s, as_json):
    """Every live lease: id, request, blocks, age, claimed."""
    ledger = _kv_status(addr, curve_dir, insecure, timeout_s)[1]["ledger"]
    if as_json:
        click.echo(json.dumps(ledger, indent=1))
        return
    if not ledger:
        click.echo("no live leases")
        return
    click.echo(f"{'lease':>6}  {'request':<28} {'blocks':>6} {'age s':>7}  claimed")
    for ls in ledger:
        click.echo(f"{ls['lease_id']:>6}  {ls['request_id'][:28]:<28} {len(ls['blocks']):>6} "
                   f"{ls['age_s']:>7.1f}  {'yes' if ls['claimed'] else 'no'}")


@kv.command("lookup")
@click.argument("text")
@click.option("--chat", is_flag=True, help="TEXT is a user message, through the chat template")
@click.option("--addr", default=None, help="the store's address (default: the running mesh's)")
@click.option("--tokenizer-addr", default=None, help="(default: the running mesh's)")
@_with(_addr_opts)
def kv_lookup(text, chat, addr, tokenizer_addr, curve_dir, insecure, timeout_s):
    """How much of TEXT's prompt the store already holds (the lookup's pin is released)."""
    ids = _tokenize(text, chat, tokenizer_addr, curve_dir, insecure, timeout_s)
    with _kv_client(addr, curve_dir, insecure, timeout_s) as (addr, client):
        rid = f"duet-cli-lookup-{uuid.uuid4().hex[:8]}"
        try:
            hit = client.lookup(rid, ids)
            if hit.lease_id is not None:
                client.release(rid, hit.lease_id)
        except Exception as e:
            _fail("kvstore", addr, e)
    click.echo(f"prompt: {len(ids)} tokens; cached prefix: {hit.num_tokens} tokens "
               f"({len(hit.block_ids)} blocks)")


# -- duet tokenizer ---------------------------------------------------------------------------
@click.group("tokenizer")
def tokenizer():
    """Call the tokenizer service: encode, decode."""


def _tokenize(text, chat, addr, curve_dir, insecure, timeout_s) -> list[int]:
    from services.tokenizer.client import TokenizerClient
    addr = _need(addr, "tokenizer", "--tokenizer-addr")
    with _context() as ctx:
        client = TokenizerClient(ctx, addr, timeout_s=timeout_s, curve=_curve(curve_dir, insecure))
        try:
            if chat:
                return client.tokenize(messages=[{"role": "user", "content": text}])
            return client.tokenize(text)
        except Exception as e:
            _fail("tokenizer", addr, e)
        finally:
            client.close()


@tokenizer.command("encode")
@click.argument("text")
@click.option("--chat", is_flag=True, help="TEXT is a user message, through the chat template")
@click.option("--addr", default=None, help="the tokenizer's address (default: the running mesh's)")
@_with(_addr_opts)
def tokenizer_encode(text, chat, addr, curve_dir, insecure, timeout_s):
    """Token ids of TEXT, one line, space-separated."""
    click.echo(" ".join(map(str, _tokenize(text, chat, addr, curve_dir, insecure, timeout_s))))


@tokenizer.command("decode")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--addr", default=None, help="the tokenizer's address (default: the running mesh's)")
@_with(_addr_opts)
def tokenizer_decode(ids, addr, curve_dir, insecure, timeout_s):
    """Text of token IDS."""
    from services.tokenizer.client import TokenizerClient
    addr = _need(addr, "tokenizer", "--addr")
    with _context() as ctx:
        client = TokenizerClient(ctx, addr, timeout_s=timeout_s, curve=_curve(curve_dir, insecure))
        try:
            click.echo(client.detokenize(list(ids), skip_special_tokens=False))
        except Exception as e:
            _fail("tokenizer", addr, e)
        finally:
            client.close()


# -- duet status ---------------------------------------------------------------------------------
@click.command("status")
@click.option("--url", default=None, help="the gateway (default: the running mesh's)")
@click.option("--kvstore-addr", default=None)
@click.option("--tokenizer-addr", default=None)
@_with(_addr_opts)
@click.option("--json", "as_json", is_flag=True)
def status(url, kvstore_addr, tokenizer_addr, curve_dir, insecure, timeout_s, as_json):
    """The whole mesh at a glance: what the admin console shows, in the terminal."""
    from services.admin.sources import Sources
    info = running_mesh() or {"addr": {}}
    src = Sources(gateway_url(url), kvstore_addr or info["addr"].get("kvstore"),
                  tokenizer_addr or info["addr"].get("tokenizer"),
                  supervisor_url=info.get("supervisor_url"),
                  curve_dir=_curve_dir(curve_dir, insecure), timeout_s=timeout_s)
    try:
        snap = src.snapshot()
    finally:
        src.close()
    if as_json:
        click.echo(json.dumps(snap, indent=1, default=str))
        return
    gw = snap["gateway"]
    if "error" in gw:
        click.echo(f"gateway {src.gateway_url}: DOWN ({gw['error']})")
    else:
        click.echo(f"gateway {src.gateway_url}: {'ready' if gw.get('ok') else 'NOT READY'}, "
                   f"{gw.get('mode', '-')}, {gw.get('inflight', 0)} in flight")
        for w in gw.get("workers", []):
            alive = w.get("ranks_alive") or []
            ranks = (f" ranks {''.join('+' if a else 'x' for a in alive)}"
                     if len(alive) > 1 else "")
            shape = f"TP{w.get('tp', 1)}xPP{w.get('pp', 1)}"
            click.echo(f"  {w['worker_id']:<12} {w['role']:<8} {shape:<9} "
                       f"{'draining' if w['draining'] else 'serving':<9}"
                       f" running {w['running']:<3} waiting {w['waiting']:<3} "
                       f"blocks free {w['free_blocks']}/{w['total_blocks']}{ranks}")
    kvs = snap.get("kvstore")
    if kvs is not None:
        if "error" in kvs:
            click.echo(f"kvstore: DOWN ({kvs['error']})")
        else:
            s = kvs["stats"]
            click.echo(f"kvstore: {'idle' if kvs['idle'] else 'busy'}, {s['free_blocks']} free / "
                       f"{s['cached_blocks']} cached / {s['leased_blocks']} leased of "
                       f"{s['total_blocks']} blocks, {s['leases']} live leases")
    tok = snap.get("tokenizer")
    if tok is not None:
        click.echo("tokenizer: " + (f"DOWN ({tok['error']})" if "error" in tok else
                                    f"up, vocab {tok.get('vocab_size')}, "
                                    f"{tok.get('tokenize', 0)} encodes"))
    svc = snap.get("services")
    if svc is not None:
        if "error" in svc:
            click.echo(f"supervisor: unreachable ({svc['error']})")
        else:
            click.echo("services: " + ", ".join(
                f"{r['service']} {'up' if r['up'] else 'DOWN'}"
                + (f" ({r['restarts']} restarts)" if r["restarts"] else "")
                for r in svc["services"]))
    m = snap["metrics"]
    if "error" not in m:
        ms = lambda s: "-" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
        click.echo(f"requests: {m['finished']} finished, goodput {m['goodput']}"
                   + (f" ({m['goodput_ratio']:.0%})" if m["goodput_ratio"] is not None else "")
                   + f", TTFT p50 {ms(m['ttft']['p50_s'])}")
        for r in m["ttft_stages"]:
            click.echo(f"  {r['stage']:<16} mean {ms(r['mean_s']):>10}  p90 {ms(r['p90_s']):>10}"
                       f"  ({r['count']})")
