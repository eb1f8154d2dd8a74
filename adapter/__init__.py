"""FHIR Rerank Adapter: search a patient's FHIR record by meaning.

`create_app(config=None)` builds the Flask app; nothing is read or loaded at import time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from flask import Flask

    from adapter.config import Settings
    from adapter.fhir.source import FhirSource

__version__ = "0.1.0"


def create_app(config: "Settings | Mapping[str, Any] | None" = None, *,
               source: "FhirSource | None" = None) -> "Flask":
    """Build the app from Settings (or a mapping of overrides on top of config/ and the env)."""
    from flask import Flask

    from adapter.api.async_routes import bp as async_bp
    from adapter.api.errors import register_error_handlers
    from adapter.api.ops import bp as ops_bp
    from adapter.api.hosts import check_host, trusted_hosts
    from adapter.api.observe import register_request_hooks
    from adapter.api.rerank_api import bp as rerank_api_bp
    from adapter.app import register as register_smart_app
    from adapter.api.routes import bp
    from adapter.api.state import AppState
    from adapter.config import Settings, load_settings
    from adapter.fhir import make_source
    from adapter.jobs import make_job_runner
    from adapter.runtime import Runtime

    settings = config if isinstance(config, Settings) else load_settings(config)
    runtime = Runtime(settings)  # this app's caches and models, shared with no other app
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # No redirects at all (werkzeug would 308 `//fhir//metadata` to a Location built from the
    # Host header): such paths are a plain 404 OperationOutcome.
    app.url_map.merge_slashes = False
    app.extensions["fhir_rerank"] = AppState(settings, source or make_source(settings),
                                             jobs=make_job_runner(settings, runtime),
                                             trusted_hosts=trusted_hosts(settings),
                                             runtime=runtime)
    register_request_hooks(app)
    app.before_request(check_host)
    register_error_handlers(app)
    app.register_blueprint(bp)
    app.register_blueprint(async_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(rerank_api_bp)
    register_smart_app(app)
    return app

