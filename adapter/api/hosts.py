"""Links come from configuration, never from whatever Host header a caller sends.

Bundle links, fullUrls and the async Content-Location are built from (there are no redirects:
the URL map does not merge slashes)
`public_base_url` when set, else from the request's Host, which must then be one of
`trusted_hosts` (default: localhost, 127.0.0.1 and [::1], bare or on the served `port`).
Any other Host is a 400 before a route runs.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import request

from adapter.api.state import state
from adapter.config import Settings
from adapter.errors import BadRequest

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


def trusted_hosts(settings: Settings) -> frozenset[str]:
    """Host header values answered (lower case, exact match on "host" or "host:port")."""
    names = [h.strip().lower() for h in settings.trusted_hosts if h.strip()]
    if not names:
        names = [n for name in LOCAL_NAMES for n in (name, f"{name}:{settings.port}")]
        if settings.host and settings.host not in ("0.0.0.0", "::", "localhost", "127.0.0.1"):
            names += [settings.host.lower(), f"{settings.host.lower()}:{settings.port}"]
    if settings.public_base_url:
        names.append(urlsplit(settings.public_base_url).netloc.lower())
    return frozenset(names)


def check_host() -> None:
    """before_request: refuse a Host that is not trusted (it would otherwise write links)."""
    if request.blueprint == "ops":  # /healthz, /readyz, /metrics write no links
        return
    settings = state().settings
    allowed = state().trusted_hosts
    host = request.headers.get("Host")
    if host is None:  # HTTP/1.0 without Host: links fall back to the listening address
        return
    if host.strip().lower() not in allowed:
        raise BadRequest("the Host header names a host this server does not answer for; add it "
                         "to `trusted_hosts` or set `public_base_url`" +
                         ("" if settings.trusted_hosts else
                          f" (default: localhost or 127.0.0.1 on port {settings.port})"),
                         expression="Host")


def api_base() -> str:
    """The FHIR base URL used in every link this server writes."""
    configured = state().settings.public_base_url
    return configured.rstrip("/") if configured else request.url_root.rstrip("/") + "/fhir"

