"""Operator endpoints on the gateway: list workers, flip a worker's role at run time,
drain a worker (no new requests; the ones it holds finish) and undrain it."""
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

    def body_field(name: str, kind: type):
        """The JSON object body's `name`, which must be a `kind`; (value, None) or
        (None, error response). A form or text body is refused: a cross-site page can
        send those, not JSON."""
        if not request.is_json:
            return None, error(415, "send a JSON body (Content-Type: application/json)")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return None, error(400, "the body must be a JSON object")
        if name not in body:
            return None, error(400, f"the body needs {name!r}")
        value = body[name]
        if not isinstance(value, kind):
            return None, error(400, f"{name}={value!r} must be a {kind.__name__}")
        return value, None

    def act(method: str, worker_id: str, value, reply: dict):
        """backend.<method>(worker_id, value): 400 bad value, 404 unknown worker, 503 when
        the gateway could not apply it."""
        if not hasattr(backend, method):
            return error(400, "this gateway runs the model in-process: it has no workers")
        try:
            getattr(backend, method)(worker_id, value)
        except ValueError as e:
            return error(400, str(e))
        except KeyError as e:
            return error(404, str(e.args[0]))
        except (TimeoutError, RuntimeError) as e:
            return error(503, str(e))
        return jsonify({"worker_id": worker_id, **reply})

    @bp.post("/admin/workers/<worker_id>/role")
    def set_role(worker_id):
        role, bad = body_field("role", str)
        return bad or act("set_role", worker_id, role, {"role": role})

    @bp.post("/admin/workers/<worker_id>/drain")
    def set_drain(worker_id):
        enable, bad = body_field("enable", bool)
        return bad or act("set_drain", worker_id, enable, {"draining": enable})

    return bp
