"""Chart search, a SMART on FHIR app served by the adapter as static files (issue 19).

`/app/launch` is the launch URL an EHR opens (SMART App Launch 2.x): `iss` (the FHIR server
the EHR speaks for) and `launch` (the EHR's opaque launch context). `iss` must be one of the
adapter's `smart_issuers` — the app hands the access token it gets to this adapter, which
passes it on to its own FHIR server, so an `iss` outside that list would be a server the token
was never meant for; such a launch is refused here (400) before any page loads. Without
`launch` it is a standalone launch (the authorization server picks the patient).

The launch itself runs in the browser with the official SMART client (`fhirclient`, vendored
under static/vendor/fhirclient at the pinned version, licence beside it): discovery at
`{iss}/.well-known/smart-configuration`, PKCE S256 required (`pkceMode: "required"`), `state`
kept in sessionStorage, the code exchanged at the token endpoint from the browser. `/app/`
is the redirect URI and the search page. Nothing here is rendered per request except the small
`config.json`; every page has a Content-Security-Policy with `frame-ancestors` from
`smart_frame_ancestors` (default 'none') and no inline script.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, jsonify, request, send_from_directory

from adapter.api.state import state
from adapter.app.roots import allowed_issuers, app_root
from adapter.app.standin import register_standin

STATIC = Path(__file__).resolve().parent / "static"
bp = Blueprint("smart_app", __name__, url_prefix="/app")
DEFAULT_SCOPES = ("launch openid fhirUser patient/DocumentReference.rs "
                  "patient/Observation.rs patient/Condition.rs")


def issuer_allowed(iss: str) -> bool:
    return iss.rstrip("/") in allowed_issuers()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def security_headers(response: Response) -> Response:
    """CSP (own scripts only; discovery may read the issuers' origins), framing from
    `smart_frame_ancestors`, no referrer (a URL with `code` must not travel), no caching."""
    settings = state().settings
    connect = " ".join(sorted({"'self'", *(o for o in map(_origin, allowed_issuers()) if o)}))
    ancestors = settings.smart_frame_ancestors.strip() or "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; form-action 'self'; base-uri 'none'; "
        f"frame-ancestors {ancestors}")
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


bp.after_request(security_headers)


def _page(name: str, status: int = 200) -> Response:
    response = send_from_directory(STATIC, name, max_age=0)
    response.status_code = status
    return response


def _refusal(message: str) -> Response:
    """A plain-text 400 (no HTML built from the request: nothing of it is echoed)."""
    return Response(message + "\n", status=400, content_type="text/plain; charset=utf-8")


@bp.get("/launch")
def launch() -> Response:
    iss = request.args.get("iss", "")
    if iss and not issuer_allowed(iss):
        return _refusal("This launch names a FHIR server (iss) that this chart-search app is "
                        "not configured for, so it was not started: an app that followed any "
                        "iss would hand its access token to whoever sent the link. An "
                        "administrator can add the server to smart_issuers.")
    if not iss and request.args.get("launch"):
        return _refusal("This EHR launch has no iss (the FHIR server); the EHR must send both "
                        "iss and launch.")
    return _page("launch.html")


@bp.get("/")
def index() -> Response:
    return _page("index.html")


@bp.get("/config.json")
def config() -> Response:
    """What the browser side needs: client id, scopes, the issuers, the adapter's FHIR base."""
    settings = state().settings
    body: dict[str, Any] = {
        "clientId": settings.smart_client_id,
        "scope": settings.smart_scopes or DEFAULT_SCOPES,
        "issuers": allowed_issuers(),
        "redirectUri": app_root() + "/app/",
        "adapterBase": app_root() + "/fhir",
        "pageSize": 10,
    }
    return jsonify(body)


@bp.get("/static/<path:name>")
def static_file(name: str) -> Response:
    response = send_from_directory(STATIC, name, max_age=300)
    return response


def register(app: Flask) -> None:
    """The app's pages, and the SMART authorization stand-in when `smart_standin` is on."""
    app.register_blueprint(bp)
    if app.extensions["fhir_rerank"].settings.smart_standin:
        register_standin(app)
