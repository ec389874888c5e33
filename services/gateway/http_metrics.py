"""The gateway's Prometheus metrics: one registry per app, every name `duet_`-prefixed.

TTFT is recorded whole and per stage (GenEvent.timings plus the gateway's own
gateway_queue and tokenize); inter-token latency per gap; TPOT per choice; goodput counts
finished requests whose TTFT and TPOT both met their targets.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
            2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
              0.5, 0.75, 1.0, 2.5, 5.0)


class GatewayMetrics:
    def __init__(self, ttft_target_s: float = 2.0, tpot_target_s: float = 0.2):
        if ttft_target_s <= 0 or tpot_target_s <= 0:
            raise ValueError(f"SLO targets must be > 0 s: ttft_target_s={ttft_target_s}, "
                             f"tpot_target_s={tpot_target_s}")
        self.ttft_target_s, self.tpot_target_s = ttft_target_s, tpot_target_s
        r = self.registry = CollectorRegistry()
        self.requests = Counter("duet_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("duet_ttft_seconds", "Time to first token (per choice)",
                              buckets=_LATENCY, registry=r)
        self.ttft_stage = Histogram("duet_ttft_stage_seconds", "TTFT split into its stages",
                                    ["stage"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("duet_inter_token_latency_seconds",
                             "Gap between consecutive token deliveries of one choice",
                             buckets=_TOKEN_GAP, registry=r)
        self.tpot = Histogram("duet_tpot_seconds",
                              "Time per output token after the first (per choice)",
                              buckets=_TOKEN_GAP, registry=r)
        self.prompt_tokens = Counter("duet_prompt_tokens", "Prompt tokens admitted",
                                     registry=r)
        self.generation_tokens = Counter("duet_generation_tokens", "Tokens generated",
                                         registry=r)
        self.running = Gauge("duet_running_requests", "Generation requests in flight",
                             registry=r)
        self.finished = Counter("duet_finished_requests",
                                "Generation requests that ended (any way)", registry=r)
        self.goodput = Counter("duet_goodput_requests",
                               "Finished requests meeting both the TTFT and TPOT targets",
                               registry=r)

    def watch_backend(self, backend) -> None:
        """Export the backend's own counters (the broker's dispatches, worker deaths, ...)
        on every scrape."""
        self.registry.register(_BackendCollector(backend))

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.ttft_stage.labels(stage=stage).observe(max(seconds, 0.0))

    def request_done(self, ok: bool, ttft_s: float | None, tpot_s: float | None) -> None:
        """A generation request ended. ok: it completed (no error, no disconnect).
        ttft_s/tpot_s: worst over its choices; tpot None when no choice had 2+ tokens."""
        self.finished.inc()
        if (ok and ttft_s is not None and ttft_s <= self.ttft_target_s
                and (tpot_s is None or tpot_s <= self.tpot_target_s)):
            self.goodput.inc()


class _BackendCollector:
    """backend.stats() as metrics: the broker's counters (monotonic) and its gauges."""

    COUNTERS = {"dispatched": "Requests sent to a worker (re-dispatches included)",
                "redispatched": "Requests moved to another worker after theirs was lost",
                "worker_deaths": "Workers dropped: silent past the timeout, gone, re-registered",
                "errors": "Requests a worker answered with an error",
                "kv_checksum_failures": "Hand-offs whose KV failed its checksum at the decode "
                                        "claim (never decoded; prefilled again)"}
    NAMES = {"kv_checksum_failures": "duet_kv_checksum_failures"}   # else duet_broker_<key>
    GAUGES = {"inflight": "Requests the broker holds", "workers": "Registered workers"}

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        try:
            stats = self.backend.stats()
        except Exception:   # a scrape must not fail because the backend is going away
            return
        for key, doc in self.COUNTERS.items():
            if key in stats:
                c = CounterMetricFamily(self.NAMES.get(key, f"duet_broker_{key}"), doc)
                c.add_metric([], stats[key])
                yield c
        for key, doc in self.GAUGES.items():
            if key in stats:
                g = GaugeMetricFamily(f"duet_broker_{key}", doc)
                g.add_metric([], stats[key])
                yield g
