"""Serve the gateway app with waitress (a production WSGI server, not Flask's dev server).

Each streaming response holds one waitress worker thread for its whole life, so the
thread count bounds concurrent streams: the default 1024 holds the 512-stream target with
room to spare. connection_limit is raised to match (waitress defaults to 100), and poll()
replaces select() so more than 1024 sockets work.
"""
from __future__ import annotations

import json
import logging
import signal
import threading

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

log = logging.getLogger("duet.gateway.server")

DEFAULT_THREADS = 1024
MAX_WIRE_BODY_BYTES = 16 << 20


def _adjustments(threads: int, connection_limit: int | None, channel_timeout: int) -> dict:
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    return dict(threads=threads,
                connection_limit=connection_limit or max(2 * threads, 1024),
                channel_timeout=channel_timeout,   # idle keep-alive sockets only
                asyncore_use_poll=True, backlog=2048, ident="duet",
                # waitress buffers a whole body before the app sees it: bound that; the app
                # itself answers bodies over its own (smaller) limit with a JSON 413
                max_request_body_size=MAX_WIRE_BODY_BYTES,
                cleanup_interval=30,
                # keep reading a connection while its request runs, so waitress notices a
                # client that left and the app can stop a non-streaming generation. A client
                # that half-closes its socket after sending (nc -N) now reads as gone.
                channel_request_lookahead=1,
                # whole seconds: waitress int()s it, and 0.5 became 0, a busy poll loop
                asyncore_loop_timeout=1)


class _OpenAIErrorTask(ErrorTask):
    """What waitress answers itself, before the app sees a request (a malformed request
    line or chunked body, headers or a body over its limits): OpenAI's JSON error shape,
    like every answer of the app."""

    def execute(self):
        e = self.request.error
        body = json.dumps({"error": {
            "message": f"{e.reason}: {str(e.body).strip()}",
            "type": "invalid_request_error" if 400 <= e.code < 500 else "server_error",
            "param": None, "code": None}}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _OpenAIErrorTask


def _use_openai_errors(server) -> None:
    servers = [server] if isinstance(server, BaseWSGIServer) else [
        s for s in server.map.values() if isinstance(s, BaseWSGIServer)]
    for s in servers:
        s.channel_class = _Channel


class ServerHandle:
    """A waitress server running on a background thread; stop() shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 threads: int = DEFAULT_THREADS, connection_limit: int | None = None,
                 channel_timeout: int = 120):
        self.server = create_server(app, host=host, port=port,
                                    **_adjustments(threads, connection_limit, channel_timeout))
        _use_openai_errors(self.server)
        port = getattr(self.server, "effective_port", None)  # one socket, or several:
        self.host, self.port = host, port or self.server.effective_listen[0][1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "ServerHandle":
        self._thread = threading.Thread(target=self.server.run, name="duet-waitress",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop worker threads (waiting up to timeout_s for running requests), close
        every socket, and wait for the I/O loop to exit."""
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)
        wasyncore.close_all(self.server._map, ignore_all=True)
        if self._thread is not None:
            self._thread.join(timeout_s)


def make_server(app, host: str = "127.0.0.1", port: int = 0, threads: int = DEFAULT_THREADS,
                connection_limit: int | None = None, channel_timeout: int = 120) -> ServerHandle:
    """A not-yet-started server; port 0 picks a free port (see .port / .url)."""
    return ServerHandle(app, host, port, threads, connection_limit, channel_timeout)


def serve(app, host: str = "0.0.0.0", port: int = 8000, threads: int = DEFAULT_THREADS,
          connection_limit: int | None = None, channel_timeout: int = 120) -> None:
    """Serve in the foreground until SIGINT or SIGTERM."""
    handle = make_server(app, host, port, threads, connection_limit, channel_timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    handle.start()
    log.info("gateway listening on %s (%d threads)", handle.url, threads)
    while not stop.wait(0.5):
        if not handle.running:
            raise RuntimeError("the waitress I/O loop exited unexpectedly")
    log.info("shutting down the gateway")
    handle.stop()
