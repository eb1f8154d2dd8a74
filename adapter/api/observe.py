"""Per-request bookkeeping: the request id, the access log line and the request metrics.

Every request gets a fresh id (32 hex digits), answered in `X-Request-ID` and carried by
every log line written while serving it (`log_format = json`). A caller's own X-Request-ID
is not reused: it is the caller's free text, and could name a patient.
The access log names the method, the path with patient ids masked (never the query string),
the status and the duration. Metrics label by route template (`/fhir/<resource_type>`), never
by the path itself, and by a method from a fixed set (any other method is "other").
"""
from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, Response, g, request

from adapter.logsafe import redact_path
from adapter.metrics import REQUEST_SECONDS, REQUESTS

access_log = logging.getLogger("adapter.access")


#: the methods a metric may name; any other method (the caller's free text) counts as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _route_template() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def method_label(method: str) -> str:
    """A metrics label for the request method from a fixed set: the method is whatever the
    caller wrote, and one label per odd method would grow /metrics without bound."""
    return method if method in METHODS else "other"


def register_request_hooks(app: Flask) -> None:
    @app.before_request
    def _start_clock() -> None:
        g.request_started = time.perf_counter()
        g.request_id = uuid.uuid4().hex

    @app.after_request
    def _observe(response: Response) -> Response:
        if request.method == "OPTIONS" and response.status_code == 200 and not response.data:
            response.status_code = 204  # Flask's automatic OPTIONS: Allow header, no body
            del response.headers["Content-Type"]
        started = g.get("request_started")
        elapsed = time.perf_counter() - started if started is not None else 0.0
        route, method = _route_template(), request.method
        REQUESTS.labels(route, method_label(method), str(response.status_code)).inc()
        REQUEST_SECONDS.labels(route, method_label(method)).observe(elapsed)
        path = redact_path(request.path)
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        access_log.info("%s %s %s %.0f ms", method, path, response.status_code, elapsed * 1000,
                        extra={"request_id": request_id, "method": method, "route": route,
                               "path": path, "status": response.status_code,
                               "duration_ms": round(elapsed * 1000, 1)})
        return response
