"""Operator endpoints on the gateway: list workers, flip a worker's role at run time."""
from __future__ import annotations

from flask import Blueprint, jsonify, request


def admin_blueprint(backend, api_keys: set[str] | None = None) -> Blueprint:
    bp = Blueprint("duet_admin", __name__)

    def error(status, message):
        return jsonify({"error": {"message": message, "type": "invalid_request_error",
                                  "param": None, "code": None}}), status

    @bp.before_request
    def check_key():
        if api_keys:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in api_keys:
                return error(401, "invalid or missing API key")

    @bp.get("/admin/workers")
    def workers():
        return jsonify(backend.health())

    @bp.post("/admin/workers/<worker_id>/role")
    def set_role(worker_id):
        body = request.get_json(silent=True) or {}
        role = body.get("role")
        try:
            backend.set_role(worker_id, role)
        except ValueError as e:
            return error(400, str(e))
        except KeyError as e:
            return error(404, str(e.args[0]))
        return jsonify({"worker_id": worker_id, "role": role})

    return bp
