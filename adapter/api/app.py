"""The Flask app: `create_app` wires the settings, the FHIR source, the runtime, the job runner
and the blueprints together (`adapter.create_app` is this)."""
from __future__ import annotations

from typing import Any, Mapping

from flask import Flask

from adapter.api.async_routes import bp as async_bp
from adapter.api.errors import register_error_handlers
from adapter.api.hosts import check_host, trusted_hosts
from adapter.api.observe import register_request_hooks
from adapter.api.ops import bp as ops_bp
from adapter.api.rerank_api import bp as rerank_api_bp
from adapter.api.routes import bp
from adapter.api.state import AppState
from adapter.app import register as register_smart_app
from adapter.config import Settings, load_settings
from adapter.fhir import make_source
from adapter.fhir.source import FhirSource
from adapter.jobs import make_job_runner
from adapter.runtime import Runtime


def create_app(config: Settings | Mapping[str, Any] | None = None, *,
               source: FhirSource | None = None) -> Flask:
    """Build the app from Settings (or a mapping of overrides on top of config/ and the env)."""
    settings = config if isinstance(config, Settings) else load_settings(config)
    runtime = Runtime(settings)  # this app's caches and models, shared with no other app
    app = Flask("adapter")  # the package: its logger and root path, as before
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

