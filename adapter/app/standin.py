"""A local SMART authorization server for the demo and the tests (`smart_standin = true`).

Not for production: it signs nobody in and keeps its state in this process's memory (one
server process, which is what the adapter runs without redis_url). It is strict where the
SMART App Launch 2.x spec is, so that the app is shown to follow the spec, not to get away
with less:

- `/smart/launches` (POST {"patient": id}) and `/smart/ehr-launch?patient=id` play the EHR:
  an opaque, single-use `launch` bound to that patient (expires after 5 minutes), and the
  app's launch URL with `iss` = the first allowed issuer.
- `/smart/authorize`: `response_type=code`, the registered `client_id` and `redirect_uri`
  (`{root}/app/`), `aud` an allowed issuer, `state` present, PKCE `code_challenge` with
  `code_challenge_method=S256` (`plain` or none is refused). An EHR launch binds the patient
  of its `launch`; a standalone launch (`launch/patient` scope, no `launch`) shows a patient
  picker. Errors before the redirect URI is known are a 400 page; after, a redirect carrying
  `error`, `error_description` and the `state`.
- `/smart/token`: `grant_type=authorization_code`, the code (single use, 60 s), the same
  `redirect_uri` and `client_id`, and the `code_verifier` whose S256 is the challenge. The
  answer: a random bearer token expiring after `smart_token_lifetime` seconds, the scopes as
  asked, `patient`, `need_patient_banner: true`, `smart_style_url`.
- `/smart/introspect` (RFC 7662): `{"active": true, "patient", "scope", "exp"}` while a token
  lives — how a FHIR server (the tests' server, `set_auth(introspect=…)`) accepts its tokens.
- `/fhir/.well-known/smart-configuration`: the discovery document for the adapter's own
  `/fhir` (the demo's `iss`, served from files).

Nothing of a request (patient, code, token) is logged.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, jsonify, redirect, request

from adapter.api.state import state
from adapter.app.roots import allowed_issuers, app_root

bp = Blueprint("smart_standin", __name__, url_prefix="/smart")
well_known_bp = Blueprint("smart_well_known", __name__)
LAUNCH_TTL_S = 300.0
CODE_TTL_S = 60.0
_VERIFIER_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass
class StandInState:
    """Launches, codes and tokens of this process, each with its expiry (monotonic seconds)."""
    launches: dict[str, tuple[str, float]] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sweep(self, now: float) -> None:
        for table in (self.codes, self.tokens):
            for key in [k for k, v in table.items() if v["expires"] <= now]:
                del table[key]
        for key in [k for k, (_, exp) in self.launches.items() if exp <= now]:
            del self.launches[key]


def _standin() -> StandInState:
    from flask import current_app

    return current_app.extensions["smart_standin"]


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of a verifier (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _roots() -> tuple[str, list[str]]:
    return app_root(), allowed_issuers()


def _text(message: str, status: int = 400) -> Response:
    return Response(message + "\n", status=status, content_type="text/plain; charset=utf-8")


def _oauth_error(error: str, description: str, status: int = 400) -> Response:
    response = jsonify({"error": error, "error_description": description})
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


def _new_launch(patient: str) -> str:
    launch = secrets.token_urlsafe(24)
    standin = _standin()
    with standin.lock:
        standin.sweep(time.monotonic())
        standin.launches[launch] = (patient, time.monotonic() + LAUNCH_TTL_S)
    return launch


def _launch_url(launch: str) -> str:
    root, issuers = _roots()
    return f"{root}/app/launch?" + urlencode({"iss": issuers[0], "launch": launch})


@bp.post("/launches")
def create_launch() -> Response:
    body = request.get_json(silent=True) or {}
    patient = str(body.get("patient") or "").strip()
    if not patient:
        return _oauth_error("invalid_request", "give the patient: {\"patient\": \"<id>\"}")
    launch = _new_launch(patient)
    response = jsonify({"launch": launch, "url": _launch_url(launch)})
    response.status_code = 201
    return response


@bp.get("/ehr-launch")
def ehr_launch() -> Response:
    """The demo's "EHR": a fresh launch for `patient`, then on to the app's launch URL."""
    patient = request.args.get("patient", "").strip()
    if not patient:
        return _text("give the patient: /smart/ehr-launch?patient=<id>")
    return redirect(_launch_url(_new_launch(patient)), 302)


def _check_client(args: Any) -> str | None:
    """Why client_id / redirect_uri are wrong (no redirect may then be made), else None."""
    settings = state().settings
    root, _ = _roots()
    if args.get("client_id") != settings.smart_client_id:
        return "unknown client_id: this authorization server knows the chart-search app only"
    if args.get("redirect_uri") != root + "/app/":
        return f"redirect_uri must be the registered {root}/app/"
    return None


def _redirect_error(args: Any, error: str, description: str) -> Response:
    query = {"error": error, "error_description": description}
    if args.get("state"):
        query["state"] = args["state"]
    return redirect(args["redirect_uri"] + "?" + urlencode(query), 302)


def _authorize_problem(args: Any) -> tuple[str, str] | None:
    """(error, description) for a request the spec refuses, else None."""
    _, issuers = _roots()
    if args.get("response_type") != "code":
        return "unsupported_response_type", "response_type must be code"
    if not args.get("state"):
        return "invalid_request", "state is required (SMART App Launch: SHALL)"
    method = args.get("code_challenge_method")
    if not args.get("code_challenge") or not method:
        return "invalid_request", "PKCE is required: send code_challenge with " \
                                  "code_challenge_method=S256"
    if method != "S256":
        return "invalid_request", f"code_challenge_method {method[:20]!r} is not allowed; " \
                                  "only S256"
    if (args.get("aud") or "").rstrip("/") not in issuers:
        return "invalid_request", "aud is not a FHIR server this authorization server " \
                                  "protects"
    if not (args.get("scope") or "").strip():
        return "invalid_scope", "scope is required"
    return None


def _issue_code(args: Any, patient: str) -> Response:
    code = secrets.token_urlsafe(32)
    standin = _standin()
    with standin.lock:
        standin.codes[code] = {
            "patient": patient, "scope": " ".join(args["scope"].split()),
            "challenge": args["code_challenge"], "redirect_uri": args["redirect_uri"],
            "client_id": args["client_id"], "expires": time.monotonic() + CODE_TTL_S}
    return redirect(args["redirect_uri"] + "?" + urlencode({"code": code,
                                                           "state": args["state"]}), 302)


@bp.route("/authorize", methods=["GET", "POST"])
def authorize() -> Response:
    args = request.values
    bad_client = _check_client(args)
    if bad_client:
        return _text(bad_client)
    problem = _authorize_problem(args)
    if problem:
        return _redirect_error(args, *problem)
    scopes = args["scope"].split()
    launch = args.get("launch")
    if launch:
        if "launch" not in scopes:
            return _redirect_error(args, "invalid_scope", "an EHR launch asks for the launch "
                                   "scope")
        standin = _standin()
        with standin.lock:
            standin.sweep(time.monotonic())
            bound = standin.launches.pop(launch, None)  # single use
        if bound is None:
            return _redirect_error(args, "invalid_request", "unknown or expired launch; "
                                   "launch the app again from the EHR")
        return _issue_code(args, bound[0])
    if "launch/patient" not in scopes:
        return _redirect_error(args, "invalid_scope", "a standalone launch asks for "
                               "launch/patient (or send the EHR's launch)")
    chosen = (request.form.get("patient") or "").strip() if request.method == "POST" else ""
    if chosen:
        return _issue_code(args, chosen)
    return _picker(args)


def _picker(args: Any) -> Response:
    """The standalone launch's patient picker: a form that posts the request back."""
    hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                     for k, v in args.items() if k != "patient")
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>Choose a patient</title></head><body><main>"
            "<h1>SMART stand-in: choose a patient</h1>"
            "<form method=\"post\" action=\"authorize\">" + hidden +
            "<label for=\"patient\">Patient id</label> "
            "<input id=\"patient\" name=\"patient\" required autofocus> "
            "<button type=\"submit\">Open the chart</button></form></main></body></html>")
    return Response(page, content_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": "default-src 'none'; form-action 'self'; "
                                   "frame-ancestors 'none'", "Cache-Control": "no-store"})


@bp.post("/token")
def token() -> Response:
    form = request.form
    if form.get("grant_type") != "authorization_code":
        return _oauth_error("unsupported_grant_type", "grant_type must be authorization_code")
    verifier = form.get("code_verifier") or ""
    if not verifier:
        return _oauth_error("invalid_request", "code_verifier is required (PKCE)")
    if not 43 <= len(verifier) <= 128 or not set(verifier) <= _VERIFIER_CHARS:
        return _oauth_error("invalid_request", "code_verifier must be 43-128 characters of "
                            "[A-Za-z0-9-._~] (RFC 7636)")
    standin = _standin()
    with standin.lock:
        standin.sweep(time.monotonic())
        grant = standin.codes.pop(form.get("code") or "", None)  # single use, even on failure
    if grant is None:
        return _oauth_error("invalid_grant", "unknown, used or expired code")
    if form.get("redirect_uri") != grant["redirect_uri"]:
        return _oauth_error("invalid_grant", "redirect_uri differs from the authorization "
                            "request's")
    if form.get("client_id") != grant["client_id"]:
        return _oauth_error("invalid_client", "client_id differs from the authorization "
                            "request's")
    if not hmac.compare_digest(s256(verifier), grant["challenge"]):
        return _oauth_error("invalid_grant", "code_verifier does not match the "
                            "code_challenge (S256)")
    settings = state().settings
    lifetime = max(1, settings.smart_token_lifetime)
    access = secrets.token_urlsafe(32)
    with standin.lock:
        standin.tokens[access] = {"patient": grant["patient"], "scope": grant["scope"],
                                  "client_id": grant["client_id"],
                                  "expires": time.monotonic() + lifetime,
                                  "exp": int(time.time()) + lifetime}
    root, _ = _roots()
    response = jsonify({
        "access_token": access, "token_type": "Bearer", "expires_in": lifetime,
        "scope": grant["scope"], "patient": grant["patient"], "need_patient_banner": True,
        "smart_style_url": root + "/app/static/smart-style.json"})
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.post("/introspect")
def introspect() -> Response:
    standin = _standin()
    with standin.lock:
        standin.sweep(time.monotonic())
        grant = standin.tokens.get(request.form.get("token") or "")
    if grant is None:
        return jsonify({"active": False})
    return jsonify({"active": True, "scope": grant["scope"], "patient": grant["patient"],
                    "client_id": grant["client_id"], "token_type": "Bearer",
                    "exp": grant["exp"]})


def configuration(root: str) -> dict[str, Any]:
    """The SMART discovery document pointing at this stand-in."""
    return {
        "issuer": root + "/smart",
        "authorization_endpoint": root + "/smart/authorize",
        "token_endpoint": root + "/smart/token",
        "introspection_endpoint": root + "/smart/introspect",
        "grant_types_supported": ["authorization_code"],
        "token_endpoint_auth_methods_supported": ["none"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["launch", "launch/patient", "openid", "fhirUser",
                             "patient/DocumentReference.rs", "patient/Observation.rs",
                             "patient/Condition.rs"],
        "response_types_supported": ["code"],
        "capabilities": ["launch-ehr", "launch-standalone", "client-public",
                         "context-ehr-patient", "context-standalone-patient",
                         "context-banner", "context-style", "permission-v2"],
    }


@well_known_bp.get("/fhir/.well-known/smart-configuration")
def smart_configuration() -> Response:
    root, _ = _roots()
    response = jsonify(configuration(root))
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


def register_standin(app: Flask) -> None:
    app.extensions["smart_standin"] = StandInState()
    app.register_blueprint(bp)
    app.register_blueprint(well_known_bp)
