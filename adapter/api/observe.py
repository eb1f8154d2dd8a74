"""Per-request bookkeeping: the access log line and the request metrics.

The access log names the method, the path with patient ids masked (never the query string),
the status and the duration. Metrics label by route template (`/fhir/<resource_type>`), never
by the path itself.
"""
from __future__ import annotations

import logging
import time

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
        access_log.info("%s %s %s %.0f ms", method, redact_path(request.path),
                        response.status_code, elapsed * 1000)
        return response
