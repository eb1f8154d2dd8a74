"""Where the app and its SMART issuers are (the app's pages and the authorization stand-in
both ask)."""
from __future__ import annotations

from flask import request

from adapter.api.state import state


def app_root() -> str:
    """Where the adapter is served (no trailing slash): `public_base_url` without its `/fhir`,
    else the request's own root (the Host was checked against trusted_hosts)."""
    configured = state().settings.public_base_url.rstrip("/")
    if configured:
        return configured[:-len("/fhir")] if configured.endswith("/fhir") else configured
    return request.url_root.rstrip("/")


def allowed_issuers() -> list[str]:
    """`smart_issuers`, or when empty the one FHIR server this adapter talks to: `fhir_base_url`,
    or the adapter's own `/fhir` when it serves files."""
    settings = state().settings
    issuers = [i.rstrip("/") for i in settings.smart_issuers if i.strip()]
    if issuers:
        return issuers
    if settings.fhir_base_url:
        return [settings.fhir_base_url.rstrip("/")]
    return [app_root() + "/fhir"]
