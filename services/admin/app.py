"""The Flask admin console: one page that shows the whole mesh and acts on its workers.

    GET  /                             the page (polls /api/status once a second)
    GET  /api/status                   every source's status (sources.Sources.snapshot)
    POST /api/workers/<id>/role        {"role": "prefill" | "decode" | "both"}
    POST /api/workers/<id>/drain       {"enable": true | false}

Actions take JSON bodies only (415 otherwise): a cross-site HTML form cannot send one,
so another page open in the operator's browser cannot flip roles behind their back.
With `token` set, every route but the page itself needs `Authorization: Bearer <token>`;
the page asks for it once and keeps it in the tab's sessionStorage.
"""
from __future__ import annotations

import hmac
from importlib import resources

from flask import Flask, Response, jsonify, request

from services.admin.sources import ActionError, Sources


def create_app(sources: Sources, token: str | None = None) -> Flask:
    app = Flask("duet-admin")
    page = resources.files("services.admin").joinpath("console.html").read_text()

    def error(status: int, message: str):
        return jsonify({"error": {"message": message}}), status

    @app.before_request
    def check_token():
        if token and request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            if not (auth.startswith("Bearer ") and hmac.compare_digest(auth[7:], token)):
                return error(401, "invalid or missing console token (Authorization: Bearer ...)")

    @app.get("/")
    def index():
        return Response(page.replace("__NEEDS_TOKEN__", "true" if token else "false"),
                        content_type="text/html; charset=utf-8")

    @app.get("/api/status")
    def status():
        return jsonify(sources.snapshot())

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
