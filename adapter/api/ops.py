"""Operations endpoints outside the FHIR base: /healthz, /readyz and /metrics."""
from __future__ import annotations

from flask import Blueprint, Response, json

from adapter.api.state import state
from adapter.readiness import readiness
from adapter.metrics import exposition

bp = Blueprint("ops", __name__)


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json",
                    headers={"Cache-Control": "no-store"})


@bp.get("/healthz")
def healthz() -> Response:
    """Alive: the process answers HTTP. Says nothing about dependencies (see /readyz)."""
    return _json({"status": "alive"})


@bp.get("/readyz")
def readyz() -> Response:
    """Ready: every dependency answers; 503 with the failing checks named when not. A model
    that could not load (keyword order) is not ready, unless allow_keyword_fallback makes it
    200 "degraded"."""
    app_state = state()
    checks = readiness(app_state.settings, app_state.source, app_state.runtime)
    ready = all(c.ok for c in checks)
    status = ("degraded" if any(c.degraded for c in checks) else "ready") if ready \
        else "not ready"
    return _json({"status": status, "checks": [c.to_json() for c in checks]},
                 200 if ready else 503)


@bp.get("/metrics")
def metrics() -> Response:
    body, content_type = exposition()
    return Response(body, content_type=content_type)
