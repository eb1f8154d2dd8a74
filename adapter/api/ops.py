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
    """Ready: every dependency answers; 503 with the failing checks named when not."""
    app_state = state()
    checks = readiness(app_state.settings, app_state.source, app_state.runtime)
    ready = all(c.ok for c in checks)
    return _json({"status": "ready" if ready else "not ready",
                  "checks": [c.to_json() for c in checks]}, 200 if ready else 503)


@bp.get("/metrics")
def metrics() -> Response:
    body, content_type = exposition()
    return Response(body, content_type=content_type)
