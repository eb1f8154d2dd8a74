"""Per-request bookkeeping: the request id, the access log line and the request metrics.

Every request gets a fresh id (32 hex digits), answered in `X-Request-ID` and carried by
every log line written while serving it (`log_format = json`). A caller's own X-Request-ID
is not reused: it is the caller's free text, and could name a patient.
The access log names the method, the path with patient ids masked (never the query string),
the status and the duration. Metrics label by route template (`/fhir/<resource_type>`), never
by the path itself.
"""
from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, Response, g, request

from adapter.logsafe import redact_path
from adapter.metrics import REQUEST_SECONDS, REQUESTS

access_log = logging.getLogger("adapter.access")


def _route_template() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


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
        REQUESTS.labels(route, method, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(route, method).observe(elapsed)
        path = redact_path(request.path)
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        access_log.info("%s %s %s %.0f ms", method, path, response.status_code, elapsed * 1000,
                        extra={"request_id": request_id, "method": method, "route": route,
                               "path": path, "status": response.status_code,
                               "duration_ms": round(elapsed * 1000, 1)})
        return response
