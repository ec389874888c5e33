"""The supervisor of `duet up`: keeps every process of the mesh running.

A child that exits is started again after a backoff that doubles from 0.5 s to 8 s (and
resets once it has run for a minute). One that exits `max_crashes` times within
`window_s` is marked failed and left down, visibly (`duet status`, the console, the
`duet_service_up` gauge), while the rest of the mesh goes on serving. A dead KV store's
shared-memory segment is removed before the store starts again. Only stop() (Ctrl-C,
SIGTERM) ends the mesh. Restarts are counted in `duet_restarts_total{service}`, served
with the other gauges on the supervisor's own metrics port.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from shared.buffers.shm import SHM_DIR

BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
STABLE_S = 60.0


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict | None = None
    log_path: str | None = None
    proc: subprocess.Popen | None = None
    state: str = "starting"                 # running | backoff | failed | stopped
    restarts: int = 0
    crashes: deque = field(default_factory=deque)   # monotonic times of recent exits
    started_at: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    def __init__(self, max_crashes: int = 5, window_s: float = 60.0,
                 on_event: Callable[[str], None] | None = None,
                 backoff_s: tuple[float, ...] = BACKOFF_S):
        self.children: dict[str, Child] = {}
        self.max_crashes, self.window_s, self.backoff_s = max_crashes, window_s, backoff_s
        self.on_event = on_event or (lambda line: print(f"duet: {line}", file=sys.stderr,
                                                        flush=True))
        self._lock = threading.RLock()
        self._metrics = None

    # -- children -------------------------------------------------------------------
    def add(self, name: str, cmd: list[str], env: dict | None = None,
            log_path: str | None = None) -> Child:
        child = Child(name, cmd, env, log_path)
        with self._lock:
            self.children[name] = child
            self._start(child)
        return child

    def _start(self, child: Child) -> None:
        out = open(child.log_path, "ab") if child.log_path else None
        try:
            child.proc = subprocess.Popen(child.cmd, stdout=out,
                                          stderr=subprocess.STDOUT if out else None,
                                          env={**os.environ, **child.env} if child.env else None)
        finally:
            if out is not None:
                out.close()   # the child has its own descriptor
        child.state, child.started_at = "running", time.monotonic()

    def poll(self) -> None:
        """Notice exits and restart what is due; call it every fraction of a second."""
        now = time.monotonic()
        with self._lock:
            for child in self.children.values():
                if child.state == "running" and child.proc.poll() is not None:
                    self._exited(child, now)
                if child.state == "backoff" and now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
                    self.on_event(f"{child.name} restarted (restart {child.restarts}, "
                                  f"pid {child.pid})")
            self._update_metrics()

    def _exited(self, child: Child, now: float) -> None:
        child.last_exit = child.proc.returncode
        if now - child.started_at > STABLE_S:
            child.crashes.clear()
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.window_s:
            child.crashes.popleft()
        if child.name == "kvstore":
            remove_store_segments(child.proc.pid)
        if len(child.crashes) >= self.max_crashes:
            child.state = "failed"
            self.on_event(f"{child.name} exited with code {child.last_exit} "
                          f"{len(child.crashes)} times within {self.window_s:.0f}s: marked "
                          f"FAILED, not restarted; the rest of the mesh keeps serving")
            return
        delay = self.backoff_s[min(len(child.crashes) - 1, len(self.backoff_s) - 1)]
        child.state, child.next_start = "backoff", now + delay
        self.on_event(f"{child.name} exited with code {child.last_exit}; restarting in "
                      f"{delay:g}s")

    def status(self) -> list[dict]:
        with self._lock:
            return [{"service": c.name, "state": c.state, "pid": c.pid, "restarts": c.restarts,
                     "last_exit": c.last_exit} for c in self.children.values()]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child (in reverse start order: workers before the store), then
        SIGKILL what is left after the grace period; remove any store segment left."""
        with self._lock:
            children = list(self.children.values())
            for c in children:
                c.state = "stopped"
            for c in reversed(children):
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in children:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
                if c.name == "kvstore":
                    remove_store_segments(c.proc.pid)
        if self._metrics is not None:
            self._metrics[0].shutdown()
            self._metrics[0].server_close()
            self._metrics = None

    # -- metrics -------------------------------------------------------------------------
    def serve_metrics(self, port: int, host: str = "127.0.0.1") -> None:
        """duet_restarts_total{service} and duet_service_up{service} on http://host:port."""
        import prometheus_client as prom
        registry = prom.CollectorRegistry()
        self._restarts = prom.Counter("duet_restarts", "Times the supervisor restarted a "
                                      "service", ["service"], registry=registry)
        self._up = prom.Gauge("duet_service_up", "1 while the service runs, 0 while it waits "
                              "to restart or has failed", ["service"], registry=registry)
        self._counted: dict[str, int] = {}
        server, _ = prom.start_http_server(port, addr=host, registry=registry)
        self._metrics = (server,)
        self._update_metrics()

    def _update_metrics(self) -> None:
        if self._metrics is None:
            return
        for c in self.children.values():
            seen = self._counted.get(c.name, 0)
            self._restarts.labels(service=c.name).inc(c.restarts - seen)
            self._counted[c.name] = c.restarts
            self._up.labels(service=c.name).set(1 if c.state == "running" else 0)


def remove_store_segments(pid: int) -> list[str]:
    """The shm segments a store process `pid` created (it names them duet-kv-<pid>-...);
    a store killed with SIGKILL cannot remove its own."""
    gone = []
    for path in glob.glob(os.path.join(SHM_DIR, f"duet-kv-{pid}-*")):
        try:
            os.unlink(path)
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone
