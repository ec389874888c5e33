"""What the admin console reads: the gateway over HTTP, the KV-store and tokenizer over
their ZeroMQ control sockets. Each source is read on its own, so one that is down shows
as an error beside the others instead of blanking the page.

Actions (role flip, drain) go through the gateway's /admin endpoints: the gateway owns
routing, so it must know first.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("duet.admin")

from shared.protocol import TTFT_STAGES as STAGES


class ActionError(Exception):
    """A gateway admin call failed; `status` is the HTTP status to pass on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Sources:
    gateway_url: str
    kvstore_addr: str | None = None
    tokenizer_addr: str | None = None
    supervisor_url: str | None = None    # `duet up`'s supervisor metrics (restarts)
    curve_dir: str | None = None
    api_key: str | None = None
    timeout_s: float = 3.0
    action_timeout_s: float = 10.0   # above the gateway's own 5 s wait for its broker

    def __post_init__(self):
        if not self.gateway_url.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url={self.gateway_url!r} must start with http:// or https://")
        self.gateway_url = self.gateway_url.rstrip("/")
        # one zmq request at a time per client; a slow store does not hold up the tokenizer
        self._kv_lock, self._tok_lock, self._ctx_lock = (threading.Lock(), threading.Lock(),
                                                         threading.Lock())
        self._ctx = self._curve = self._kv = self._tok = None
        # unique per process: two consoles (or a console and `duet status`) must not
        # share a ROUTER identity, or the store routes one's replies to the other
        self._identity = f"admin-{uuid.uuid4().hex[:10]}"

    # -- gateway over HTTP -----------------------------------------------------------
    def _http(self, method: str, path: str, body: dict | None = None,
              timeout_s: float | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.gateway_url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:   # 4xx/5xx still carry a body worth showing
            return e.code, e.read()

    def gateway_health(self) -> dict:
        status, raw = self._http("GET", "/health")
        body = json.loads(raw)
        body["http_status"] = status   # 503 = not ready (no usable worker set), still a body
        return body

    def gateway_metrics(self, buckets: bool = False) -> dict:
        status, raw = self._http("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        out = summarize_metrics(raw.decode())
        if not buckets:
            out.pop("_buckets")
        return out

    def supervisor_status(self) -> list[dict]:
        """Every service `duet up` supervises: up or not, and how often it restarted."""
        with urllib.request.urlopen(self.supervisor_url.rstrip("/") + "/metrics",
                                    timeout=self.timeout_s) as r:
            return summarize_services(r.read().decode())

    def admin(self, worker_id: str, action: str, body: dict) -> dict:
        """POST /admin/workers/<id>/<action> on the gateway; ActionError on failure."""
        if action not in ("role", "drain"):
            raise ActionError(404, f"unknown action {action!r}: choose role or drain")
        path = f"/admin/workers/{urllib.request.quote(worker_id, safe='')}/{action}"
        try:
            status, raw = self._http("POST", path, body, self.action_timeout_s)
        except OSError as e:
            raise ActionError(502, f"gateway {self.gateway_url} unreachable: {e}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ActionError(502, f"gateway answered {status} with a non-JSON body") from None
        if status != 200:
            err = reply.get("error") if isinstance(reply, dict) else None
            msg = err.get("message") if isinstance(err, dict) else raw.decode(errors="replace")[:200]
            if status in (401, 403):   # the gateway's key, not the console's token
                raise ActionError(502, f"the gateway rejected the console's API key ({msg}); "
                                       f"start the console with --api-key or DUET_API_KEY")
            raise ActionError(status, msg)
        return reply

    # -- KV-store and tokenizer over ZeroMQ ------------------------------------------------
    def _clients(self):
        with self._ctx_lock:
            if self._ctx is None:
                from shared.transport import CurveConfig, make_context
                # keys first: a bad key dir raises its own error every time, not a half-set state
                curve = CurveConfig.from_dir(self.curve_dir, "client") if self.curve_dir else None
                self._curve, self._ctx = curve, make_context()
            return self._ctx, self._curve

    def _status(self, attr: str, lock: threading.Lock, make) -> dict:
        """status() of the client kept in self.<attr> (made by make(ctx, curve) on first
        use); a failed call drops the client, so a timed-out exchange starts clean."""
        with lock:
            ctx, curve = self._clients()
            client = getattr(self, attr)
            if client is None:
                client = make(ctx, curve)
                setattr(self, attr, client)
            try:
                return client.status()
            except BaseException:
                client.close()
                setattr(self, attr, None)
                raise

    def kvstore_status(self) -> dict:
        from services.kvstore.client import KVStoreClient
        data = self._status("_kv", self._kv_lock, lambda ctx, curve: KVStoreClient(
            ctx, self.kvstore_addr, self._identity, curve=curve, timeout_s=self.timeout_s))
        stats = data.get("stats", {})
        looked = stats.get("lookup_tokens", 0)
        return {"stats": stats, "idle": data.get("idle"), "dtype": data.get("dtype"),
                "ledger": data.get("ledger", []),
                "prefix_hit_rate": stats.get("hit_tokens", 0) / looked if looked else None,
                "pool": {k: data.get("pool", {}).get(k)
                         for k in ("backend", "device", "base", "nbytes", "shape")}}

    def tokenizer_status(self) -> dict:
        from services.tokenizer.client import TokenizerClient
        return self._status("_tok", self._tok_lock, lambda ctx, curve: TokenizerClient(
            ctx, self.tokenizer_addr, timeout_s=self.timeout_s, curve=curve))

    # -- everything at once ------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Every source's view, or {"error": ...} in its place."""
        out = {"time": time.time(), "gateway_url": self.gateway_url}
        reads = [("gateway", self.gateway_health), ("metrics", self.gateway_metrics)]
        if self.kvstore_addr:
            reads.append(("kvstore", self.kvstore_status))
        if self.tokenizer_addr:
            reads.append(("tokenizer", self.tokenizer_status))
        if self.supervisor_url:
            reads.append(("services", lambda: {"services": self.supervisor_status()}))
        def one(read):
            try:
                return read()
            except Exception as e:
                return {"error": f"{type(e).__name__}: {e}"[:300]}
        # in parallel: a source that is down costs its timeout once, not once per source
        with ThreadPoolExecutor(len(reads), thread_name_prefix="admin-read") as pool:
            for (name, _), result in zip(reads, pool.map(one, [r for _, r in reads])):
                out[name] = result
        return out

    def close(self) -> None:
        with self._kv_lock, self._tok_lock, self._ctx_lock:
            for c in (self._kv, self._tok):
                if c is not None:
                    c.close()
            self._kv = self._tok = None
            if self._ctx is not None:
                from shared.transport import close_context
                close_context(self._ctx)
                self._ctx = None


# -- Prometheus text -> the console's numbers ------------------------------------------------
def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """Histogram quantile by linear interpolation inside the bucket (as PromQL's
    histogram_quantile); None without observations. buckets: (upper bound, cumulative)."""
    if not count:
        return None
    rank, prev_le, prev_c = q * count, 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le   # beyond the last finite bound: report that bound
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def _histograms(families: dict, name: str, label: str | None) -> dict:
    """{label value (or ''): {"count", "sum", "buckets"}} of one histogram family."""
    out: dict[str, dict] = {}
    fam = families.get(name)
    if fam is None:
        return out
    for s in fam.samples:
        key = s.labels.get(label, "") if label else ""
        h = out.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": []})
        if s.name.endswith("_bucket"):
            h["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            h["count"] = s.value
        elif s.name.endswith("_sum"):
            h["sum"] = s.value
    for h in out.values():
        h["buckets"].sort()
    return out


def _latency_row(h: dict) -> dict:
    n = h["count"]
    return {"count": int(n), "mean_s": h["sum"] / n if n else None,
            "p50_s": _quantile(h["buckets"], n, 0.5), "p90_s": _quantile(h["buckets"], n, 0.9)}


def summarize_services(text: str) -> list[dict]:
    """The supervisor's /metrics as rows: service, up, restarts."""
    rows: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.labels.get("service")
            if name is None:
                continue
            row = rows.setdefault(name, {"service": name, "up": None, "restarts": 0})
            if s.name == "duet_service_up":
                row["up"] = bool(s.value)
            elif s.name == "duet_restarts_total":
                row["restarts"] = int(s.value)
    return list(rows.values())


def summarize_metrics(text: str) -> dict:
    """The gateway's /metrics reduced to what the console shows: TTFT whole and per stage,
    ITL and TPOT (count, mean, p50, p90), goodput, tokens and requests by status."""
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def total(name: str) -> float:
        fam = families.get(name)
        return sum(s.value for s in fam.samples if s.name.endswith("_total")) if fam else 0.0

    stages = _histograms(families, "duet_ttft_stage_seconds", "stage")
    order = [s for s in STAGES if s in stages] + sorted(set(stages) - set(STAGES))
    finished, good = total("duet_finished_requests"), total("duet_goodput_requests")
    requests = {}
    fam = families.get("duet_requests")
    for s in fam.samples if fam else []:
        if s.name.endswith("_total"):
            requests[f"{s.labels['endpoint']} {s.labels['status']}"] = int(s.value)
    running = families.get("duet_running_requests")
    whole = _histograms(families, "duet_ttft_seconds", None).get("", {"buckets": []})
    itl = _histograms(families, "duet_inter_token_latency_seconds", None).get("", {"buckets": []})
    return {
        "_buckets": {"ttft": whole["buckets"], "itl": itl["buckets"]},   # for History only
        "ttft": _latency_row(_histograms(families, "duet_ttft_seconds", None).get(
            "", {"count": 0, "sum": 0, "buckets": []})),
        "ttft_stages": [dict(stage=s, **_latency_row(stages[s])) for s in order],
        "itl": _latency_row(_histograms(families, "duet_inter_token_latency_seconds", None).get(
            "", {"count": 0, "sum": 0, "buckets": []})),
        "tpot": _latency_row(_histograms(families, "duet_tpot_seconds", None).get(
            "", {"count": 0, "sum": 0, "buckets": []})),
        "finished": int(finished), "goodput": int(good),
        "goodput_ratio": good / finished if finished else None,
        "prompt_tokens": int(total("duet_prompt_tokens")),
        "generation_tokens": int(total("duet_generation_tokens")),
        "running": int(running.samples[0].value) if running and running.samples else 0,
        "requests": requests,
    }


# -- the console's charts: a few minutes of readings --------------------------------------------
def _delta_quantile(now: list, before: list, q: float) -> float | None:
    """q-quantile of the observations between two readings of a cumulative histogram."""
    prev = dict(before)
    diff = [(le, c - prev.get(le, 0.0)) for le, c in now]
    return _quantile(diff, diff[-1][1] if diff else 0.0, q)


class History:
    """Readings of the gateway (tokens, TTFT and ITL histograms, queues, each worker's
    blocks and steps) and the store (blocks in use), every `period_s`, for the last
    `keep_s`; `series()` turns them into the rates and windowed percentiles the charts
    draw. One sampler thread, whoever has the page open."""

    def __init__(self, sources: "Sources", period_s: float = 2.0, keep_s: float = 600.0):
        import collections
        self.sources, self.period_s = sources, period_s
        self.points: collections.deque = collections.deque(maxlen=max(2, int(keep_s / period_s)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "History":
        self._thread = threading.Thread(target=self._run, name="admin-history", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:   # a source that is down: no point this time
                log.debug("history sample failed: %s", e)
            self._stop.wait(self.period_s)

    def sample(self) -> None:
        p = {"t": time.time()}
        try:
            m = self.sources.gateway_metrics(buckets=True)
            p.update(gen=m["generation_tokens"], ttft=m["_buckets"]["ttft"],
                     itl=m["_buckets"]["itl"], running=m["running"])
        except Exception:
            pass
        try:
            h = self.sources.gateway_health()
            p["queue"] = int(h.get("queued", 0)) + int(h.get("waiting_handoffs", 0))
            p["workers"] = {w["worker_id"]: {
                "used": w["total_blocks"] - w["free_blocks"], "role": w["role"],
                "prefill_steps": w.get("prefill_steps", 0),
                "decode_steps": w.get("decode_steps", 0),
                "handoffs": w.get("handoffs", 0)} for w in h.get("workers", [])}
        except Exception:
            pass
        if self.sources.kvstore_addr:
            try:
                st = self.sources.kvstore_status()["stats"]
                p["store_used"] = st["total_blocks"] - st["free_blocks"]
            except Exception:
                pass
        with self._lock:
            self.points.append(p)

    def series(self) -> dict:
        """Per interval between readings: output tok/s, TTFT p50/p99 and ITL p50 of what
        finished in it (None: nothing did), KV blocks in use (store, each worker), queue
        depth, each worker's steps/s."""
        with self._lock:
            pts = list(self.points)
        out = {"t": [], "tok_s": [], "ttft_p50": [], "ttft_p99": [], "itl_p50": [],
               "store_used": [], "queue": [], "running": [], "workers": {}, "steps_s": {},
               "handoffs_s": {},
               "period_s": self.period_s}
        for a, b in zip(pts, pts[1:]):
            dt = b["t"] - a["t"]
            if dt <= 0:
                continue
            out["t"].append(round(b["t"], 3))
            both = "gen" in a and "gen" in b
            out["tok_s"].append(round((b["gen"] - a["gen"]) / dt, 2) if both else None)
            out["ttft_p50"].append(_delta_quantile(b["ttft"], a["ttft"], 0.5) if both else None)
            out["ttft_p99"].append(_delta_quantile(b["ttft"], a["ttft"], 0.99) if both else None)
            out["itl_p50"].append(_delta_quantile(b["itl"], a["itl"], 0.5) if both else None)
            out["store_used"].append(b.get("store_used"))
            out["queue"].append(b.get("queue"))
            out["running"].append(b.get("running"))
            n = len(out["t"])
            for wid, w in (b.get("workers") or {}).items():
                col = out["workers"].setdefault(wid, [None] * (n - 1))
                col.append(w["used"])
                before = (a.get("workers") or {}).get(wid)
                if before is not None:
                    steps = (w["prefill_steps"] + w["decode_steps"]
                             - before["prefill_steps"] - before["decode_steps"])
                    out["steps_s"][wid] = round(max(steps, 0) / dt, 2)
                    out["handoffs_s"][wid] = round(
                        max(w.get("handoffs", 0) - before.get("handoffs", 0), 0) / dt, 2)
            for col in out["workers"].values():
                col.extend([None] * (n - len(col)))
        return out
