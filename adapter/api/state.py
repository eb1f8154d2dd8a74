"""What the Flask app holds: settings, the FHIR source, the job runner, and its runtime
(caches and loaded models, adapter.runtime)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app

from adapter.config import Settings
from adapter.fhir.source import FhirSource
from adapter.runtime import Runtime


@dataclass
class AppState:
    settings: Settings
    source: FhirSource
    jobs: Any = None  # adapter.jobs.JobRunner (owns its threads and connections)
    trusted_hosts: frozenset[str] = frozenset()  # adapter.api.hosts: Host headers answered
    runtime: Runtime | None = None  # set by create_app; the job runner ranks with it too


def state() -> AppState:
    return current_app.extensions["fhir_rerank"]


def state_of(app: Any) -> AppState:
    """The state of `app` outside a request (start-up, tests)."""
    return app.extensions["fhir_rerank"]
