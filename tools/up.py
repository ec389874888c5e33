"""`duet up`: the whole mesh as separate processes on this machine.

kvstore, tokenizer, gateway and the workers each run as `python -m services.X`, talking
over ipc:// sockets in a private run directory, under a Supervisor (supervisor.py) that
restarts whichever one crashes. Ctrl-C / SIGTERM stops every child (SIGTERM, then SIGKILL
after a grace period): no orphans.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from tools.supervisor import Supervisor


@dataclass
class Mesh:
    model: str = "smollm2"
    prefill: int = 1
    decode: int = 1
    colocated: bool = False
    port: int = 8000
    admin_port: int = 8001               # the admin console; 0: none
    supervisor_port: int = 8002          # the supervisor's metrics (restarts); 0: none
    kv_metrics_port: int = 0             # the KV store's Prometheus metrics; 0: none
    queue_timeout_s: float = 30.0        # how long a request may wait for a worker
    host: str = "127.0.0.1"
    dtype: str = "auto"
    device: str = "cpu"                  # cpu, or cuda: the store's pool and the workers on GPUs
    devices: str | None = None           # GPU ordinals for the workers, round-robin ("0,1")
    kv_blocks: int = 2048
    worker_blocks: int = 2048
    max_num_seqs: int = 64               # sequences each worker runs at once
    max_num_batched_tokens: int = 2048   # tokens one engine step computes (chunked prefill)
    worker_threads: int | None = None    # torch threads per worker (None: the cores / workers)
    worker_args: tuple = ()              # more flags for every worker (--enforce-eager, ...)
    core_share: bool = True              # CPU workers share the cores by load (shared/cores.py)
    kv_transport: str = "auto"           # how decode workers take hand-offs: auto, shm, tcp
    layerwise_min_tokens: int = 512      # prompts this long hand over layer by layer (0: never)
    prefill_tp: int = 1                  # each prefill worker: a TP x PP group of processes
    prefill_pp: int = 1
    decode_tp: int = 1                   # each decode (or --colocated) worker's group shape
    decode_pp: int = 1
    curve_dir: str | None = None         # None: fresh keys in the run dir, unless insecure
    insecure: bool = False               # no CURVE at all (any local process may join)
    api_keys: str | None = None
    max_concurrency_per_key: int = 64    # requests one API key may hold; 0: no limit
    heartbeat_s: float = 0.5
    log_level: str = "INFO"
    log_dir: str | None = None
    supervisor: Supervisor = field(default_factory=Supervisor)

    def __post_init__(self):
        if self.colocated:
            self.prefill, self.decode = 0, 1
        for name in ("prefill", "decode"):
            if not 0 <= getattr(self, name) <= 64:
                raise ValueError(f"--{name} {getattr(self, name)} must be in [0, 64]")
        if not self.colocated and (self.prefill < 1 or self.decode < 1):
            raise ValueError("disaggregated mode needs --prefill >= 1 and --decode >= 1 "
                             "(or use --colocated)")
        for name in ("prefill_tp", "prefill_pp", "decode_tp", "decode_pp"):
            if not 1 <= getattr(self, name) <= 64:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be in "
                                 f"[1, 64]")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} must be in [1, 65535]")
        if not 0 <= self.admin_port <= 65535 or self.admin_port == self.port:
            raise ValueError(f"--admin-port {self.admin_port} must be in [0, 65535] (0: no "
                             f"console) and differ from --port {self.port}")
        if not 0 <= self.supervisor_port <= 65535 or (self.supervisor_port and self.supervisor_port
                                                       in (self.port, self.admin_port)):
            raise ValueError(f"--supervisor-port {self.supervisor_port} must be in [0, 65535] "
                             f"(0: none) and differ from the other ports")
        if self.queue_timeout_s < 0:
            raise ValueError(f"--queue-timeout {self.queue_timeout_s} must be >= 0 seconds")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r} must be cpu or cuda "
                             f"(place workers on GPUs with --devices 0,1,...)")
        if self.devices is not None:
            if self.device != "cuda":
                raise ValueError(f"--devices {self.devices!r} needs --device cuda")
            parts = [p.strip() for p in self.devices.split(",")]
            if not parts or not all(p.isdigit() for p in parts):
                raise ValueError(f"--devices {self.devices!r} must be GPU ordinals like 0,1")
        if self.kv_transport not in ("auto", "shm", "cuda_ipc", "tcp"):
            raise ValueError(f"--kv-transport {self.kv_transport!r} must be auto, shm, cuda_ipc "
                             f"or tcp")
        if self.layerwise_min_tokens < 0:
            raise ValueError(f"--kv-layerwise-min-tokens {self.layerwise_min_tokens} must be "
                             f">= 0 (0: never)")
        if self.insecure and self.curve_dir:
            raise ValueError(f"--insecure and --curve-dir {self.curve_dir} contradict each other")
        self.run_dir = tempfile.mkdtemp(prefix="duet-run-")
        self.addr = {name: f"ipc://{self.run_dir}/{name}.sock"
                     for name in ("gateway", "kvstore", "tokenizer")}

    def shape(self, role: str) -> tuple[int, int]:
        """(tp, pp) of a worker in this role."""
        if role == "prefill":
            return self.prefill_tp, self.prefill_pp
        return self.decode_tp, self.decode_pp

    @property
    def ranks(self) -> int:
        """Model processes in all: every worker's group, rank by rank."""
        return (self.prefill * self.prefill_tp * self.prefill_pp
                + self.decode * self.decode_tp * self.decode_pp)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_curve(self):
        """CurveConfig for a client of this mesh's sockets (a probe, a debug tool); None
        when the mesh runs --insecure. Valid once start() has made or taken the keys."""
        if not self.curve_dir:
            return None
        from shared.transport import CurveConfig
        return CurveConfig.from_dir(self.curve_dir, "client")

    @property
    def admin_url(self) -> str | None:
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else None

    @property
    def supervisor_url(self) -> str | None:
        return f"http://127.0.0.1:{self.supervisor_port}" if self.supervisor_port else None

    @property
    def procs(self) -> list:
        """Each service's current process (a restarted one's new process), named."""
        out = []
        for c in self.supervisor.children.values():
            if c.proc is not None:
                c.proc.duet_name = c.name
                out.append(c.proc)
        return out

    def pid(self, name: str) -> int:
        return self.supervisor.children[name].pid

    def _spawn(self, name: str, module: str, *args: str, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", module, *args, "--log-level", self.log_level]
        log_path = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            log_path = os.path.join(self.log_dir, f"{name}.log")
        self.supervisor.add(name, cmd, env, log_path)

    def start(self) -> None:
        from shared.config import EngineConfig
        from shared.models.hub import resolve_model
        model_dir = str(resolve_model(self.model))      # convert once, before the children
        if self.device == "cpu":
            from duet_kernels import cpu_kernels
            cpu_kernels.load()                           # build once, before the workers
        dtype = EngineConfig(dtype=self.dtype, device=self.device).resolved_dtype()
        gpus = [f"cuda:{p.strip()}" for p in (self.devices or "0").split(",")]
        store_device = gpus[0] if self.device == "cuda" else "cpu"
        if self.curve_dir is None and not self.insecure:
            # authenticated by default: this run's own server and client keypairs
            from shared.transport import generate_keys
            self.curve_dir = str(generate_keys(os.path.join(self.run_dir, "keys")))
        curve = ["--curve-dir", self.curve_dir] if self.curve_dir else []
        if self.supervisor_port:
            self.supervisor.serve_metrics(self.supervisor_port)
        workers = self.ranks   # each rank of a TP/PP group is a process of its own
        # the cores shared by the workers: the small services take ~10% of a core at 16
        # streams (measured), and a worker on both cores of this 2-core machine decodes
        # 16 streams 25% faster than on one
        threads = str(self.worker_threads or max(1, (os.cpu_count() or 1) // workers))
        share = []
        if self.sharing_cores:
            # each worker steps on every core while the others idle, on its share while
            # they are busy: one stream decodes on both cores between prompts
            threads = str(self.worker_threads or os.cpu_count() or 1)
            share = ["--core-share", self.core_share_name]
        self._spawn("kvstore", "services.kvstore", "--bind", self.addr["kvstore"],
                    "--model", model_dir, "--dtype", dtype, "--num-blocks", str(self.kv_blocks),
                    "--device", store_device,
                    *(["--metrics-port", str(self.kv_metrics_port)] if self.kv_metrics_port else []),
                    *curve)
        self._spawn("tokenizer", "services.tokenizer", "--bind", self.addr["tokenizer"],
                    "--model", model_dir, *curve)
        gw = ["--model", model_dir, "--served-model-name", os.path.basename(self.model.rstrip("/")),
              "--router-addr", self.addr["gateway"], "--tokenizer-addr", self.addr["tokenizer"],
              "--kvstore-addr", self.addr["kvstore"], "--host", self.host, "--port", str(self.port),
              "--heartbeat", str(self.heartbeat_s), "--queue-timeout", str(self.queue_timeout_s),
              *curve]
        if self.api_keys:
            gw += ["--api-keys", self.api_keys,
                   "--max-concurrency-per-key", str(self.max_concurrency_per_key)]
        self._spawn("gateway", "services.gateway", *gw)
        if self.admin_port:
            # loopback only, whatever --host says: it can drain workers (tunnel to reach it,
            # or run `python -m services.admin --host ... --token ...` yourself)
            env = {"DUET_API_KEY": self.api_keys.split(",")[0].strip()} if self.api_keys else {}
            self._spawn("admin", "services.admin", "--gateway-url", self.url,
                        "--kvstore-addr", self.addr["kvstore"], "--tokenizer-addr",
                        self.addr["tokenizer"], "--host", "127.0.0.1",
                        "--port", str(self.admin_port), *curve, env=env,
                        *(["--supervisor-url", self.supervisor_url] if self.supervisor_url else []))
        common = ["--model", model_dir, "--dtype", dtype, "--gateway-addr", self.addr["gateway"],
                  "--kvstore-addr", self.addr["kvstore"], "--threads", threads,
                  "--num-kv-blocks", str(self.worker_blocks), "--max-num-seqs", str(self.max_num_seqs),
                  "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                  "--heartbeat", str(self.heartbeat_s),
                  "--kv-layerwise-min-tokens", str(self.layerwise_min_tokens),
                  *share, *self.worker_args, *curve]
        roles = [("both", 1)] if self.colocated else [("prefill", self.prefill), ("decode", self.decode)]
        placed = 0
        for role, count in roles:
            for i in range(count):
                device = gpus[placed % len(gpus)] if self.device == "cuda" else "cpu"
                placed += 1
                transport = self.kv_transport if role == "decode" else "auto"
                tp, pp = self.shape(role)
                self._spawn(f"{role}-{i}", "services.worker", "--role", role,
                            "--worker-id", f"{role}-{i}", "--device", device,
                            "--kv-transport", transport, "--tp", str(tp), "--pp", str(pp),
                            *common)

    def wait_ready(self, timeout_s: float = 300) -> dict:
        import json
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervisor.poll()
            failed = [c["service"] for c in self.supervisor.status() if c["state"] == "failed"]
            if failed:
                raise RuntimeError(f"{', '.join(failed)} kept crashing at start (see "
                                   f"{self.log_dir or 'the log above'})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    body = json.loads(r.read())
                    want = 1 if self.colocated else self.prefill + self.decode
                    if body.get("ok") and len(body.get("workers", [])) >= want:
                        return body
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the mesh was not ready within {timeout_s:.0f}s")

    def kv_status(self, timeout_s: float = 5.0) -> dict:
        """The store's status reply (counts, the lease ledger, its epoch)."""
        from services.kvstore.client import KVStoreClient
        from shared.transport import close_context, make_context
        ctx = make_context()
        try:
            with KVStoreClient(ctx, self.addr["kvstore"], f"probe-{os.getpid()}",
                               curve=self.client_curve(), timeout_s=timeout_s) as kv:
                return kv.status()
        finally:
            close_context(ctx)

    def wait_idle(self, timeout_s: float = 20) -> tuple[dict, dict]:
        """Wait until every pool is back to idle: no live lease in the store, nothing
        running, waiting or in flight on any worker, every worker block free. Returns the
        store's status and /health; AssertionError naming what is still busy."""
        import json
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                st = self.kv_status()
                with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
                    health = json.loads(r.read())
            except Exception as e:   # a service restarting (OSError, KVStoreError): ask again
                st, health = {"ledger": [f"unreachable: {e}"]}, {"workers": [], "inflight": 1}
            busy = [w for w in health["workers"] if w["running"] or w["waiting"] or w["inflight"]]
            full = all(w["free_blocks"] == w["total_blocks"] for w in health["workers"])
            if not st["ledger"] and not busy and full and not health["inflight"]:
                return st, health
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle: ledger={st['ledger']} "
                                     f"workers={health['workers']}")
            time.sleep(0.2)

    def supervise(self) -> None:
        """Restart what crashed (the supervisor's poll), from a background thread until
        stop(): for a mesh run from Python (tests, benchmarks)."""
        self._supervising = threading.Event()

        def loop():
            while not self._supervising.wait(0.2):
                self.supervisor.poll()
        threading.Thread(target=loop, name="duet-supervisor", daemon=True).start()

    @property
    def sharing_cores(self) -> bool:
        """Whether the workers share the host's cores by load: on the CPU, more than one
        worker, each a single process."""
        workers = self.prefill + self.decode
        return (self.core_share and self.device == "cpu" and workers > 1
                and self.ranks == workers)

    @property
    def core_share_name(self) -> str:
        return f"up-{os.getpid()}-{id(self) & 0xffff:x}"

    def stop(self, grace_s: float = 10.0) -> None:
        if getattr(self, "_supervising", None) is not None:
            self._supervising.set()
        self.supervisor.stop(grace_s)
        if self.sharing_cores:
            from shared.cores import remove_share
            remove_share(self.core_share_name)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together while chosen: separate
    free_port() calls may hand the same just-released port out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_mesh(model_dir, log_dir, **kw) -> Mesh:
    """A mesh on free ports, started and ready (for tests and benchmarks: fp32 and small
    pools unless told otherwise); stopped again if it never gets ready."""
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_blocks", 512)
    kw.setdefault("worker_blocks", 512)
    kw.setdefault("heartbeat_s", 0.5)
    port, admin, sup = free_ports(3)
    kw.setdefault("admin_port", admin)
    kw.setdefault("supervisor_port", sup)
    mesh = Mesh(model=str(model_dir), port=port, log_dir=str(log_dir), **kw)
    try:
        mesh.start()
        mesh.wait_ready(timeout_s=180)
    except BaseException:
        mesh.stop()
        raise
    mesh.supervise()
    return mesh


def run_up(mesh: Mesh) -> int:
    stopping = []

    def on_signal(signum, _frame):
        if stopping:   # a second Ctrl-C while stopping: let the cleanup finish
            return
        stopping.append(signum)
        raise KeyboardInterrupt

    # explicit for SIGINT too: a shell that starts us in the background ignores it
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        mesh.start()
        body = mesh.wait_ready()
        from tools.debug_cli import write_mesh_file
        write_mesh_file(mesh)   # for `duet status`, `duet kv ...`, `duet worker ...`
        mode = "colocated" if mesh.colocated else f"{mesh.prefill} prefill + {mesh.decode} decode"
        print(f"Duet is up ({mode}, model {mesh.model}, {len(body['workers'])} workers)\n"
              f"  OpenAI API:  {mesh.url}/v1  (chat: {mesh.url}/v1/chat/completions)\n"
              f"  health:      {mesh.url}/health\n  metrics:     {mesh.url}/metrics\n"
              + (f"  admin:       {mesh.admin_url}\n" if mesh.admin_url else "") +
              f"Press Ctrl-C to stop.", flush=True)
        while True:
            mesh.supervisor.poll()
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nstopping Duet ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"duet up failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stopping.append("cleanup")   # from here on, signals no longer interrupt
        from tools.debug_cli import remove_mesh_file
        remove_mesh_file(mesh)
        mesh.stop()
