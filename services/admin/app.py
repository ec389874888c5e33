"""The Flask admin console: one page that shows the whole mesh and acts on its workers.

    GET  /                             the page (polls /api/status once a second)
    GET  /api/status                   every source's status (sources.Sources.snapshot)
    GET  /api/history                  the charts' series: the last minutes (sources.History)
    POST /api/workers/<id>/role        {"role": "prefill" | "decode" | "both"}
    POST /api/workers/<id>/drain       {"enable": true | false}

Actions take JSON bodies only (415 otherwise): a cross-site HTML form cannot send one,
so another page open in the operator's browser cannot flip roles behind their back.
With `token` set, every route but the page itself needs `Authorization: Bearer <token>`;
the page asks for it once and keeps it in the tab's sessionStorage. Requests must name a
loopback Host (or one of `allowed_hosts`), which stops DNS-rebinding pages, and POSTs
from another origin are refused; the page may not be framed.
"""
from __future__ import annotations

import hmac
from importlib import resources

from flask import Flask, Response, jsonify, request

from services.admin.sources import ActionError, Sources
from shared.protocol import ROLES


def create_app(sources: Sources, token: str | None = None,
               allowed_hosts: tuple[str, ...] = (), history=None) -> Flask:
    app = Flask("duet-admin")
    page = resources.files("services.admin").joinpath("console.html").read_text()

    def error(status: int, message: str):
        return jsonify({"error": {"message": message}}), status

    allowed = {"127.0.0.1", "localhost", "::1", "[::1]", *(allowed_hosts or ())}

    @app.before_request
    def check_request():
        # DNS rebinding: a hostile page whose name resolves to 127.0.0.1 would be
        # same-origin with the console; its requests carry its own Host name
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        if host not in allowed:
            return error(403, f"Host {request.host!r} is not this console's; allowed: "
                              f"{sorted(allowed)} (add one with --allow-host)")
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin and origin.split("://", 1)[-1] != request.host:
            return error(403, f"cross-origin request from {origin!r} refused")
        if token and request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            if not (auth.startswith("Bearer ") and
                    hmac.compare_digest(auth[7:].encode(), token.encode())):
                return error(401, "invalid or missing console token (Authorization: Bearer ...)")

    @app.after_request
    def no_framing(resp):
        resp.headers["X-Frame-Options"] = "DENY"   # no clickjacking of the action buttons
        resp.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        return resp

    @app.get("/")
    def index():
        return Response(page.replace("__NEEDS_TOKEN__", "true" if token else "false"),
                        content_type="text/html; charset=utf-8")

    @app.get("/api/status")
    def status():
        return jsonify(sources.snapshot())

    @app.get("/api/history")
    def history_series():
        if history is None:
            return error(404, "this console keeps no history (started without a sampler)")
        return jsonify(history.series())

    @app.post("/api/workers/<worker_id>/<action>")
    def act(worker_id: str, action: str):
        if not request.is_json:
            return error(415, "send a JSON body (Content-Type: application/json)")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        if action == "role":
            role = body.get("role")
            if role not in ("prefill", "decode", "both"):
                return error(400, f"role={role!r} must be prefill, decode or both")
            body = {"role": role}
        elif action == "drain":
            enable = body.get("enable", True)
            if not isinstance(enable, bool):
                return error(400, f"enable={enable!r} must be true or false")
            body = {"enable": enable}
        try:
            return jsonify(sources.admin(worker_id, action, body))
        except ActionError as e:
            return error(e.status, e.message)

    return app
